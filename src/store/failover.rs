//! Rebuilding the database connections after a failover.
//!
//! After an Aurora/RDS failover the old primary (now a reader) answers writes with SQLSTATE
//! 25006 ("cannot execute INSERT in a read-only transaction"), a hot standby says "cannot
//! execute LISTEN during recovery", and a connection may just drop. A connection keeps
//! answering from the server it reached, whatever the DNS name points at now: only new
//! connections (which resolve the host again) reach the new primary.
//!
//! sqlx's pool is cloned everywhere and cannot be swapped, so the pool is rebuilt in place:
//! when a store error says the server is read-only, in recovery, or gone ([`observe`], called
//! where every `sqlx::Error` becomes a [`StoreError`](super::StoreError)), the moment is
//! recorded, and the pool's `before_acquire` and `after_release` hooks close every
//! connection opened before it ([`is_current`]): each is replaced by a fresh one as the
//! loops ask for it. The listener, whose connection is taken for good, watches
//! [`rebuilds`] and reconnects. Leases and fencing are untouched: a write that failed was
//! not made, and the loops retry it as they retry any database error.
//!
//! The marker is process-wide, not per pool: the error conversion cannot know which pool a
//! connection came from, and a process talks to one database server (`database.url`, or the
//! embedded one), so a read-only answer on one connection says the same of the others. A
//! process with several pools (tests, `agentd bench`) at worst reconnects them all.
//!
//! Rebuilds back off: a server that stays read-only (the failover is not over) makes every
//! new connection fail again, so a rebuild is done at most once per [`BACKOFF`] window (the
//! store's retry policy, growing while the condition lasts). Each rebuild is logged once and
//! counted (`agentd_database_rebuilds_total`); errors inside a window are only counted as
//! the database errors they are.

use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::retry::{Backoff, Retry};

/// The waits between two rebuilds while the condition lasts: from a second up to 30 s.
pub const BACKOFF: Backoff = Backoff {
    first: Duration::from_secs(1),
    max: Duration::from_secs(30),
};

/// A rebuild this long after the previous one starts the backoff over: a new event.
const QUIET: Duration = Duration::from_secs(60);

/// Why the connections are rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// SQLSTATE 25006 on a write: the server is read-only (an old primary, a reader).
    ReadOnly,
    /// SQLSTATE 25006 "during recovery": the server is a standby.
    Recovery,
    /// The connection broke, or the server is shutting down (I/O errors, SQLSTATE 57P01-03,
    /// class 08).
    ConnectionLost,
}

impl Reason {
    /// The metric label and log field.
    pub fn label(self) -> &'static str {
        match self {
            Reason::ReadOnly => "read_only",
            Reason::Recovery => "recovery",
            Reason::ConnectionLost => "connection_lost",
        }
    }

    /// What a database error says about the server, if it calls for new connections.
    pub fn of(error: &sqlx::Error) -> Option<Reason> {
        match error {
            sqlx::Error::Database(error) => {
                let code = error.code()?;
                if code == "25006" {
                    // Both come with 25006; only the text tells a standby's refusal apart.
                    Some(if error.message().contains("during recovery") {
                        Reason::Recovery
                    } else {
                        Reason::ReadOnly
                    })
                } else if matches!(&*code, "57P01" | "57P02" | "57P03") || code.starts_with("08") {
                    Some(Reason::ConnectionLost)
                } else {
                    None
                }
            }
            // Only a connection cut off: not a refused certificate (InvalidData) nor a
            // server that cannot be reached (connecting again is the pool's business).
            sqlx::Error::Io(io) => matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::BrokenPipe
                    | ErrorKind::TimedOut
            )
            .then_some(Reason::ConnectionLost),
            _ => None,
        }
    }
}

/// When connections became stale, and when the next rebuild may come: pure, `now` given.
#[derive(Debug)]
struct State {
    /// Connections opened before this instant are closed instead of used.
    stale_before: Option<Instant>,
    /// The previous rebuild.
    last: Option<Instant>,
    /// No rebuild before this instant (the backoff).
    next_allowed: Option<Instant>,
    retry: Retry,
}

impl State {
    fn new() -> State {
        State {
            stale_before: None,
            last: None,
            next_allowed: None,
            retry: Retry::new(BACKOFF),
        }
    }

    /// Makes every connection opened before `now` stale, unless the backoff forbids a
    /// rebuild yet; returns the wait before the next one may come when it rebuilt.
    fn rebuild(&mut self, now: Instant) -> Option<Duration> {
        if self.next_allowed.is_some_and(|allowed| now < allowed) {
            return None;
        }
        if self.last.is_none_or(|last| now - last > QUIET) {
            self.retry.succeeded();
        }
        let wait = self.retry.failed();
        self.stale_before = Some(now);
        self.last = Some(now);
        self.next_allowed = Some(now + wait);
        Some(wait)
    }

    /// Whether a connection `age` old at `now` was opened after the last rebuild.
    fn is_current(&self, now: Instant, age: Duration) -> bool {
        match self.stale_before {
            None => true,
            Some(stale_before) => now
                .checked_sub(age)
                .is_none_or(|opened| opened >= stale_before),
        }
    }
}

static STATE: LazyLock<Mutex<State>> = LazyLock::new(|| Mutex::new(State::new()));

/// How many rebuilds this process did; the listener waits on it.
static REBUILDS: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::Sender::new(0));

fn state() -> std::sync::MutexGuard<'static, State> {
    // The state is a few instants: a panic elsewhere cannot leave it half written.
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Looks at a failed operation's error: when it says the server is read-only, in recovery
/// or gone, marks every connection opened until now as stale (at most once per backoff
/// window), logs it and counts it.
pub fn observe(error: &sqlx::Error) {
    let Some(reason) = Reason::of(error) else {
        return;
    };
    let Some(next_after) = state().rebuild(Instant::now()) else {
        return;
    };
    crate::measure::database_rebuilt(reason.label());
    tracing::warn!(
        reason = reason.label(),
        next_rebuild_after_ms = next_after.as_millis() as u64,
        "{}; rebuilding the database connections",
        match reason {
            Reason::ReadOnly =>
                "the database refused a write as read-only (a failover, or a read replica)",
            Reason::Recovery => "the database is in recovery (a standby, not the primary)",
            Reason::ConnectionLost => "a database connection was lost",
        }
    );
    REBUILDS.send_modify(|count| *count += 1);
}

/// Whether a pooled connection `age` old was opened after the last rebuild (the pool's
/// hooks close it otherwise).
pub fn is_current(age: Duration) -> bool {
    state().is_current(Instant::now(), age)
}

/// Connections lost (dropped by the server, found dead, or closed as stale after a
/// rebuild) that no new connection has replaced yet.
static LOST: AtomicU64 = AtomicU64::new(0);

/// A connection was lost, or closed because it can no longer be used: the next connection
/// opened replaces it.
pub fn connection_lost() {
    LOST.fetch_add(1, Ordering::Relaxed);
}

/// A connection was opened: one that replaces a lost connection counts as a reconnect
/// (`agentd_database_reconnects_total`).
pub fn connection_opened() {
    if LOST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |lost| {
            lost.checked_sub(1)
        })
        .is_ok()
    {
        crate::measure::database_reconnected();
    }
}

/// Changes with every rebuild: a holder of a long-lived connection (the listener) opens a
/// new one when it does.
pub fn rebuilds() -> watch::Receiver<u64> {
    REBUILDS.subscribe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuilds_mark_older_connections_and_back_off() {
        let mut state = State::new();
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        assert!(state.is_current(at(0), Duration::from_secs(3600)));

        assert!(state.rebuild(at(1000)).is_some());
        assert!(
            !state.is_current(at(1010), Duration::from_millis(20)),
            "opened before"
        );
        assert!(
            state.is_current(at(1010), Duration::from_millis(5)),
            "opened after"
        );

        // Within the window: no new rebuild, the fresh connection stays.
        assert_eq!(state.rebuild(at(1100)), None);
        assert!(state.is_current(at(1110), Duration::from_millis(100)));

        // After the window: rebuilt again, with a longer window.
        let second = state.rebuild(at(3000)).unwrap();
        assert!(second >= BACKOFF.first, "{second:?}");
        assert!(!state.is_current(at(3010), Duration::from_millis(20)));

        // Long quiet: a new event starts from the shortest window again.
        let fresh = state
            .rebuild(at(3000) + QUIET + Duration::from_secs(60))
            .unwrap();
        assert!(fresh <= BACKOFF.first, "{fresh:?}");
    }

    #[test]
    fn only_failover_errors_call_for_new_connections() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert_eq!(Reason::of(&io), Some(Reason::ConnectionLost));
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::InvalidData));
        assert_eq!(Reason::of(&refused), None);
        assert_eq!(Reason::of(&sqlx::Error::RowNotFound), None);
        assert_eq!(Reason::of(&sqlx::Error::PoolTimedOut), None);
    }
}
