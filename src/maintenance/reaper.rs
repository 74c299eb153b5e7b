//! The reaper: marks runs whose worker stopped renewing their lease as failed ("worker
//! lost") and ends those leases. It sleeps until the earliest lease expires (at most
//! `interval`), so a dead replica's runs are settled moments after their leases expire.

use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;

use crate::store::workers::{next_lease_expiry, reap_expired_leases};

/// Most leases reaped per statement; more are taken at once in further statements.
const REAP_BATCH: usize = 500;
/// Margin after a lease's expiry before looking, so the look finds it expired.
const EXPIRY_MARGIN: Duration = Duration::from_millis(50);

/// The reaper service.
pub struct Reaper {
    pub pool: PgPool,
    /// Longest sleep between two looks.
    pub interval: Duration,
}

impl Reaper {
    /// Reaps until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        let mut sleep_for = Duration::ZERO;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(sleep_for) => {}
                _ = stop.cancelled() => return,
            }
            self.reap().await;
            sleep_for = match next_lease_expiry(&self.pool).await {
                Ok(Some(until)) => (until + EXPIRY_MARGIN).min(self.interval),
                Ok(None) => self.interval,
                Err(error) => {
                    crate::measure::database_error("reap");
                    tracing::warn!(error = %error, "reading lease expiries failed");
                    self.interval
                }
            };
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
