//! The reaper: marks runs whose worker stopped renewing their lease as failed ("worker
//! lost") and ends those leases.
//!
//! It follows the earliest lease expiry of all replicas: it sleeps until then, reaps what
//! has expired, and looks up the next one, so a dead replica's runs are settled moments
//! after their leases expire. With no lease anywhere it sleeps until a replica takes one
//! (the `agentd_leases` notification), so an idle fleet costs nothing. A lease taken while
//! it follows an expiry cannot expire before that one (every lease lasts at most `ttl`), so
//! notifications are ignored then.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::conversations::end_orphaned_turns;
use crate::store::workers::{next_lease_expiry, reap_expired_leases};

/// Most leases reaped per statement; more are taken at once in further statements.
const REAP_BATCH: usize = 500;
/// Margin after a lease's expiry before looking, so the look finds it expired.
const EXPIRY_MARGIN: Duration = Duration::from_millis(50);
/// With no lease known, look anyway this often (a safety net for lost notifications).
const IDLE_LOOK: Duration = Duration::from_secs(600);

/// Shortest time between two looks that notifications asked for (any role may NOTIFY).
const MIN_NOTIFIED_GAP: Duration = Duration::from_millis(100);

/// The reaper service.
#[derive(Clone)]
pub struct Reaper {
    pub pool: PgPool,
    /// Wait before looking again after a failed look.
    pub retry: Duration,
    /// Notified when some replica took leases.
    pub leases: Arc<Notify>,
}

impl Reaper {
    /// Reaps until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        // Look once at start: a replica that died before this one started left leases.
        let mut next: Option<Duration> = Some(Duration::ZERO);
        loop {
            match next {
                Some(after) => tokio::select! {
                    _ = tokio::time::sleep(after) => {}
                    _ = stop.cancelled() => return,
                },
                None => tokio::select! {
                    _ = self.leases.notified() => tokio::time::sleep(MIN_NOTIFIED_GAP).await,
                    _ = tokio::time::sleep(IDLE_LOOK) => {}
                    _ = stop.cancelled() => return,
                },
            }
            self.reap().await;
            self.end_orphaned_turns().await;
            next = match next_lease_expiry(&self.pool).await {
                Ok(Some(until)) => Some(until + EXPIRY_MARGIN),
                Ok(None) => None,
                Err(error) => {
                    crate::measure::database_error("reap");
                    tracing::warn!(error = %error, "reading lease expiries failed");
                    Some(self.retry)
                }
            };
        }
    }

    /// Ends the conversation turns whose lease is gone without a final reply (their worker
    /// was lost, or failed to write it): each reply says so, and the conversation's next
    /// turn may start.
    async fn end_orphaned_turns(&self) {
        loop {
            match end_orphaned_turns(&self.pool, REAP_BATCH).await {
                Ok(ended) => {
                    if ended > 0 {
                        tracing::warn!(
                            turns = ended,
                            "turns ended without their worker; their replies say so"
                        );
                    }
                    if ended < REAP_BATCH as u64 {
                        return;
                    }
                }
                Err(error) => {
                    crate::measure::database_error("end_orphaned_turns");
                    tracing::warn!(error = %error, "ending orphaned turns failed");
                    return;
                }
            }
        }
    }

    async fn reap(&self) {
        loop {
            match reap_expired_leases(&self.pool, REAP_BATCH).await {
                Ok(reaped) => {
                    crate::measure::leases_reaped(reaped.len());
                    for run in &reaped {
                        tracing::warn!(
                            run_id = %run.run_id,
                            lost_worker_id = %run.worker_id,
                            expired_at = %run.expired_at,
                            "run failed: its worker was lost"
                        );
                    }
                    if reaped.len() < REAP_BATCH {
                        return;
                    }
                }
                Err(error) => {
                    crate::measure::database_error("reap");
                    tracing::warn!(error = %error, "reaping expired leases failed");
                    return;
                }
            }
        }
    }
}
