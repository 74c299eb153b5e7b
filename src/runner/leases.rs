//! The heartbeat: renews the leases of every run in flight in one statement every
//! `lease.ttl / 3`, and tells the runner which runs were cancelled or lost.

use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Runner;
use crate::store::workers::renew_leases;

/// The lease keeper service. Stops when `stop` fires (after the runs have ended: leases
/// must be kept alive during the shutdown grace period).
pub struct LeaseKeeper {
    pub pool: PgPool,
    pub runner: Runner,
    pub worker_id: String,
    pub ttl: Duration,
    pub interval: Duration,
}

impl LeaseKeeper {
    /// Renews until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
            }
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
