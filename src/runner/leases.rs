//! The heartbeat: renews the leases of every run in flight in one statement every
//! `lease.ttl / 3`, and tells the runner which runs were cancelled or lost. A cancellation
//! notification makes it renew at once (at most every [`MIN_RENEW_GAP`]): a run stops only
//! on the database's word that its owner asked.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Runner;
use crate::store::workers::renew_leases;

/// Shortest time between two renewals that notifications asked for.
pub const MIN_RENEW_GAP: Duration = Duration::from_millis(100);

/// The lease keeper service. Stops when `stop` fires (after the runs have ended: leases
/// must be kept alive during the shutdown grace period).
#[derive(Clone)]
pub struct LeaseKeeper {
    pub pool: PgPool,
    pub runner: Runner,
    pub worker_id: String,
    pub ttl: Duration,
    pub interval: Duration,
    /// Notified when a run may have been cancelled: renew now.
    pub renew: Arc<Notify>,
}

impl LeaseKeeper {
    /// Renews until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.renew.notified() => {
                    tokio::time::sleep_until(last + MIN_RENEW_GAP).await;
                }
                _ = stop.cancelled() => return,
            }
            last = Instant::now();
            let asked = self.runner.active_ids();
            if asked.is_empty() {
                // Nothing to renew; the scheduler's look at the database marks us as seen.
                continue;
            }
            let sent_at = Instant::now();
            match renew_leases(&self.pool, &self.worker_id, &asked, self.ttl).await {
                Ok(held) => self.runner.leases_renewed(&asked, &held, sent_at),
                Err(error) => {
                    crate::measure::database_error("heartbeat");
                    tracing::warn!(error = %error, runs = asked.len(), "lease renewal failed");
                }
            }
            self.runner.expire_overdue();
        }
    }
}
