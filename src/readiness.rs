//! The database's part of readiness, found by one background check on a connection of its
//! own, so that `/readyz` answers from memory: however many requests arrive, the database
//! sees at most one check a second, and the worker's pool sees none.
//!
//! The check asks which of this binary's migrations the database has not applied, once at
//! start, then only when a request needs a fresh answer: the last one is "not ready", or
//! older than [`MAX_AGE`]; or when the worker rebuilt its connections after a failover
//! (the check then reconnects too); never within [`MIN_INTERVAL`] of the previous check.
//! So an idle replica nobody probes sends the database nothing. A request that finds a ready
//! answer older than [`MAX_AGE`] waits (up to [`CHECK_TIMEOUT`]) for the fresh one; one
//! that finds "not ready" answers at once. A failed check drops the connection; the next
//! attempt reconnects after the store's backoff, and no sooner than [`MIN_INTERVAL`]. The
//! answer never carries the database's error text (whoever reaches `/readyz` reads it);
//! the error goes to the log, once each time the answer changes.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::retry::Retry;
use crate::store::{self, StoreError, failover};

/// Oldest ready answer given without a fresh check.
pub const MAX_AGE: Duration = Duration::from_secs(5);
/// The shortest time between the end of one check and the start of the next, whatever
/// asks for them.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest one check may take before the database counts as not answering.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// What the last check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseState {
    /// No check has finished yet.
    Connecting,
    /// Reached, and every migration of this binary is applied.
    Current,
    /// Reached, but these migrations of this binary are not applied.
    MigrationsPending(Vec<i64>),
    /// No connection could be made, or it broke.
    Unreachable,
    /// Connected, but the server answered the check with an error.
    Refused,
    /// The check took longer than [`CHECK_TIMEOUT`].
    NoAnswer,
}

impl DatabaseState {
    /// `Ok` when this state lets the process be ready; otherwise the reason `/readyz`
    /// gives, in our words only.
    pub fn verdict(&self) -> Result<(), String> {
        match self {
            DatabaseState::Current => Ok(()),
            DatabaseState::Connecting => Err("connecting to the database".into()),
            DatabaseState::MigrationsPending(versions) => {
                let versions: Vec<String> = versions.iter().map(i64::to_string).collect();
                Err(format!(
                    "migrations pending: {} (run `agentd migrate`)",
                    versions.join(", ")
                ))
            }
            DatabaseState::Unreachable => Err("database unreachable".into()),
            DatabaseState::Refused => Err("database refused the readiness check".into()),
            DatabaseState::NoAnswer => {
                Err(format!("database did not answer within {CHECK_TIMEOUT:?}"))
            }
        }
    }

    /// The state a failed connection or check leaves. A server that is shutting down, or
    /// whose connection broke (SQLSTATE classes 57P and 08), is unreachable; any other
    /// error the server sends is a refusal.
    fn after(error: &StoreError) -> DatabaseState {
        match error {
            StoreError::Sql(sqlx::Error::Database(error)) => match error.code() {
                Some(code) if code.starts_with("57P") || code.starts_with("08") => {
                    DatabaseState::Unreachable
                }
                _ => DatabaseState::Refused,
            },
            StoreError::Sql(_)
            | StoreError::BadUrl(_)
            | StoreError::Migrate(_)
            | StoreError::GaveUp { .. }
            | StoreError::Tls(_)
            | StoreError::ShutDown
            | StoreError::NeedsSession
            | StoreError::Corrupt(_) => DatabaseState::Unreachable,
        }
    }
}

/// The last answer of the check, shared by the check (which writes it) and the requests
/// (which read it and may ask for a fresh one).
#[derive(Clone)]
pub struct DatabaseReadiness {
    shared: Arc<Shared>,
}

struct Shared {
    /// The last answer and when its check finished.
    state: watch::Sender<(DatabaseState, Instant)>,
    wanted: Notify,
}

impl Default for DatabaseReadiness {
    fn default() -> DatabaseReadiness {
        DatabaseReadiness::new()
    }
}

impl DatabaseReadiness {
    /// "Connecting" until a check says otherwise.
    pub fn new() -> DatabaseReadiness {
        DatabaseReadiness {
            shared: Arc::new(Shared {
                state: watch::Sender::new((DatabaseState::Connecting, Instant::now())),
                wanted: Notify::new(),
            }),
        }
    }

    /// The answer, without touching the database. When the last one is "not ready", it is
    /// given at once and the check is asked to look again (at most once every
    /// [`MIN_INTERVAL`]), so a database that came back, or was migrated, is seen soon; when
    /// it is ready but older than [`MAX_AGE`], the fresh answer is awaited.
    pub async fn verdict(&self) -> Result<(), String> {
        let (state, checked_at) = self.shared.state.borrow().clone();
        let verdict = state.verdict();
        if verdict.is_err() {
            self.shared.wanted.notify_one();
            return verdict;
        }
        if checked_at.elapsed() <= MAX_AGE {
            return verdict;
        }
        let mut answers = self.shared.state.subscribe();
        self.shared.wanted.notify_one();
        let fresh = tokio::time::timeout(
            MIN_INTERVAL + CHECK_TIMEOUT,
            answers.wait_for(|(_, at)| *at > checked_at),
        )
        .await;
        match fresh {
            Ok(Ok(answer)) => answer.0.verdict(),
            Ok(Err(_)) | Err(_) => DatabaseState::NoAnswer.verdict(),
        }
    }

    /// The check that keeps this answer current, connecting with `options` (the worker's,
    /// under an application name of its own), at most `connect_timeout` per attempt and
    /// `max_backoff` between failed ones.
    pub fn check(
        &self,
        options: PgConnectOptions,
        connect_timeout: Duration,
        max_backoff: Duration,
    ) -> DatabaseCheck {
        DatabaseCheck {
            readiness: self.clone(),
            options: options.application_name("agentd readiness"),
            connect_timeout,
            max_backoff,
        }
    }

    /// Stores a check's answer; a change is logged once, with the error behind it.
    fn record(&self, state: DatabaseState, error: Option<&str>) {
        let mut changed = false;
        self.shared.state.send_modify(|current| {
            changed = current.0 != state;
            *current = (state.clone(), Instant::now());
        });
        if !changed {
            return;
        }
        match (state.verdict(), error) {
            (Ok(()), _) => {
                tracing::info!("readiness check: database reachable, migrations current")
            }
            (Err(reason), Some(error)) => {
                tracing::warn!(reason, error, "readiness check: not ready")
            }
            (Err(reason), None) => tracing::info!(reason, "readiness check: not ready"),
        }
    }
}

/// The background check: one connection of its own, one check at a time.
#[derive(Clone)]
pub struct DatabaseCheck {
    readiness: DatabaseReadiness,
    options: PgConnectOptions,
    connect_timeout: Duration,
    max_backoff: Duration,
}

impl DatabaseCheck {
    /// Checks until `stop` fires. When the worker rebuilds its connections (a failover,
    /// see [`failover`]), the check's own connection is dropped too and a check made on a
    /// new one, so the answer is about the server the pool reaches now.
    pub async fn run(self, stop: CancellationToken) {
        let mut connection = None;
        let mut retry = Retry::up_to(self.max_backoff);
        let mut rebuilds = failover::rebuilds();
        rebuilds.borrow_and_update();
        loop {
            if rebuilds.has_changed().unwrap_or(false) {
                rebuilds.borrow_and_update();
                connection = None;
            }
            let checked = tokio::select! {
                checked = self.check_once(&mut connection) => checked,
                _ = stop.cancelled() => return,
            };
            let finished = Instant::now();
            let next = match checked {
                Ok(state) => {
                    retry.succeeded();
                    self.readiness.record(state, None);
                    tokio::select! {
                        _ = self.readiness.shared.wanted.notified() => {}
                        Ok(()) = rebuilds.changed() => connection = None,
                        _ = stop.cancelled() => return,
                    }
                    finished + MIN_INTERVAL
                }
                Err((state, error)) => {
                    self.readiness.record(state, Some(&error));
                    finished + retry.failed().max(MIN_INTERVAL)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// One check, on `connection` (opened first when there is none). The connection is
    /// kept only when the check succeeds; a failure gives the state and the error to log.
    async fn check_once(
        &self,
        connection: &mut Option<PgConnection>,
    ) -> Result<DatabaseState, (DatabaseState, String)> {
        let mut open = match connection.take() {
            Some(open) => open,
            None => {
                match tokio::time::timeout(self.connect_timeout, store::connect_one(&self.options))
                    .await
                {
                    Ok(Ok(open)) => open,
                    Ok(Err(error)) => {
                        return Err((DatabaseState::after(&error), error.to_string()));
                    }
                    Err(_) => {
                        return Err((
                            DatabaseState::Unreachable,
                            format!("no connection within {:?}", self.connect_timeout),
                        ));
                    }
                }
            }
        };
        match tokio::time::timeout(CHECK_TIMEOUT, store::pending_migrations_on(&mut open)).await {
            Ok(Ok(pending)) => {
                *connection = Some(open);
                Ok(if pending.is_empty() {
                    DatabaseState::Current
                } else {
                    DatabaseState::MigrationsPending(pending)
                })
            }
            Ok(Err(error)) => Err((DatabaseState::after(&error), error.to_string())),
            Err(_) => Err((
                DatabaseState::NoAnswer,
                format!("no answer within {CHECK_TIMEOUT:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_ours_alone() {
        assert_eq!(DatabaseState::Current.verdict(), Ok(()));
        assert_eq!(
            DatabaseState::MigrationsPending(vec![20260101000008, 20260101000009]).verdict(),
            Err("migrations pending: 20260101000008, 20260101000009 (run `agentd migrate`)".into())
        );
        assert_eq!(
            DatabaseState::Unreachable.verdict(),
            Err("database unreachable".into())
        );
        assert_eq!(
            DatabaseState::NoAnswer.verdict(),
            Err("database did not answer within 3s".into())
        );
    }

    #[tokio::test]
    async fn a_request_finding_not_ready_asks_for_a_check_and_many_ask_once() {
        let readiness = DatabaseReadiness::new();
        for _ in 0..1000 {
            assert_eq!(
                readiness.verdict().await,
                Err("connecting to the database".into())
            );
        }
        // One stored permit, however many requests asked.
        readiness.shared.wanted.notified().await;
        let again = tokio::time::timeout(
            Duration::from_millis(50),
            readiness.shared.wanted.notified(),
        )
        .await;
        assert!(again.is_err(), "a second permit was stored");
        readiness.record(DatabaseState::Current, None);
        assert_eq!(readiness.verdict().await, Ok(()));
        let asked = tokio::time::timeout(
            Duration::from_millis(50),
            readiness.shared.wanted.notified(),
        )
        .await;
        assert!(asked.is_err(), "a fresh ready answer asks for nothing");
    }

    #[tokio::test]
    async fn a_ready_answer_past_its_age_waits_for_a_fresh_check() {
        let readiness = DatabaseReadiness::new();
        readiness.shared.state.send_modify(|current| {
            *current = (DatabaseState::Current, Instant::now() - MAX_AGE * 2);
        });
        let checker = readiness.clone();
        let check = tokio::spawn(async move {
            checker.shared.wanted.notified().await;
            checker.record(DatabaseState::MigrationsPending(vec![7]), None);
        });
        assert_eq!(
            readiness.verdict().await,
            Err("migrations pending: 7 (run `agentd migrate`)".into())
        );
        check.await.unwrap();
    }
}
