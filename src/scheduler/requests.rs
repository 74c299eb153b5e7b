//! The request loop: claims the runs the application and the CLI ask for (`request_run`),
//! in batches, users taking turns ([`claim_requests`]).
//!
//! It wakes on the `agentd_requests` notification, when the schedule loop's look finds
//! requests waiting (the safety net for a lost notification), and, while requests wait for
//! room, when a run ends. It never waits for the schedule loop's claims, nor they for it;
//! the runner's slots are shared between the two ([`crate::runner::slots`]).

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::queue::{Claimed, QueueLoop};
use crate::runner::Runner;
use crate::runner::slots::Source;
use crate::store::conversations::LOCKED_ELSEWHERE_RELOOK;
use crate::store::runs::{claim_requests, requests_waiting};

/// The request loop's service.
#[derive(Clone)]
pub struct RequestClaimer {
    pub pool: PgPool,
    pub runner: Runner,
    pub worker_id: String,
    pub lease_ttl: Duration,
    /// Most requests claimed in one statement (`scheduler.batch_size`).
    pub batch_size: usize,
    pub max_backoff: Duration,
    /// Notified when requests may be waiting.
    pub wake: Arc<Notify>,
}

impl RequestClaimer {
    /// Claims until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        let queue = QueueLoop {
            name: "claim_requests",
            source: Source::Requests,
            runner: &self.runner,
            batch_size: self.batch_size,
            max_backoff: self.max_backoff,
            wake: &self.wake,
        };
        let this = &self;
        queue
            .run(shutdown, |limit| async move {
                let runs =
                    claim_requests(&this.pool, limit, &this.worker_id, this.lease_ttl).await?;
                for run in &runs {
                    tracing::info!(run_id = %run.run_id, kind = run.kind.as_str(), target_id = %run.target_id, "request claimed");
                }
                // Requests left over were locked by another replica's claim, which may
                // never commit (its replica died mid-claim): look again soon.
                let look_in = if runs.len() < limit && requests_waiting(&this.pool).await? {
                    Some(LOCKED_ELSEWHERE_RELOOK)
                } else {
                    None
                };
                Ok(Claimed { runs, look_in })
            })
            .await;
        tracing::info!("request loop stopped claiming");
    }
}
