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
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::listener::MIN_NOTIFIED_GAP;
use crate::retry::Retry;
use crate::runner::Runner;
use crate::runner::slots::Source;
use crate::store::runs::claim_requests;

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
        let slots = self.runner.slots();
        let mut freed = slots.subscribe();
        let mut retry = Retry::up_to(self.max_backoff);
        let mut waiting_for_room = false;
        let mut retry_in: Option<Duration> = None;
        // Requests may be waiting already (left by a stopped replica, or asked for while no
        // replica listened).
        let mut look_now = true;
        let mut last_look = Instant::now();
        while !shutdown.is_cancelled() {
            if !look_now {
                tokio::select! {
                    _ = self.wake.notified() => {
                        tokio::time::sleep_until(last_look + MIN_NOTIFIED_GAP).await;
                    }
                    _ = freed.changed(), if waiting_for_room => {}
                    _ = tokio::time::sleep(retry_in.unwrap_or_default()), if retry_in.is_some() => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            look_now = false;
            retry_in = None;
            last_look = Instant::now();
            freed.borrow_and_update();
            let mut reservation = slots.reserve(Source::Requests, self.batch_size);
            if reservation.is_empty() {
                slots.set_waiting(Source::Requests, true);
                waiting_for_room = true;
                continue;
            }
            waiting_for_room = false;
            let limit = reservation.len();
            let sent_at = Instant::now();
            match claim_requests(&self.pool, limit, &self.worker_id, self.lease_ttl).await {
                Ok(runs) => {
                    retry.succeeded();
                    let claimed = runs.len();
                    crate::measure::claim_batch(claimed);
                    for run in runs {
                        tracing::info!(run_id = %run.run_id, kind = run.kind.as_str(), target_id = %run.target_id, "request claimed");
                        self.runner.start(run, sent_at, &mut reservation);
                    }
                    drop(reservation);
                    // A full batch: more are likely waiting.
                    let more = claimed == limit;
                    slots.set_waiting(Source::Requests, more);
                    look_now = more;
                }
                Err(error) => {
                    drop(reservation);
                    crate::measure::database_error("claim_requests");
                    let delay = retry.failed();
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "claiming requests failed; retrying");
                    retry_in = Some(delay);
                }
            }
        }
        slots.set_waiting(Source::Requests, false);
        tracing::info!("request loop stopped claiming");
    }
}
