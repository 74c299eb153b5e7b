//! The loop shared by the sources that claim from a queue (requests, conversation turns):
//! sleep until woken (a notification, room in the slots, a time the claim asked for, or a
//! retry), reserve slots, claim at most that many, start the runs, repeat until shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::listener::MIN_NOTIFIED_GAP;
use crate::domain::ClaimedRun;
use crate::retry::Retry;
use crate::runner::Runner;
use crate::runner::slots::Source;
use crate::store::StoreError;

/// What one claim found.
pub struct Claimed {
    pub runs: Vec<ClaimedRun>,
    /// Look again after this long at the latest (a debounce running out).
    pub look_in: Option<Duration>,
}

/// A queue's loop: `claim(limit)` takes at most `limit` runs (and logs them); the loop
/// starts them in the runner's slots of `source`.
pub struct QueueLoop<'a> {
    pub name: &'static str,
    pub source: Source,
    pub runner: &'a Runner,
    pub batch_size: usize,
    pub max_backoff: Duration,
    /// Notified when work may be waiting.
    pub wake: &'a Arc<Notify>,
}

impl QueueLoop<'_> {
    /// Claims until `shutdown` fires.
    pub async fn run<F, Fut>(self, shutdown: CancellationToken, mut claim: F)
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = Result<Claimed, StoreError>>,
    {
        let slots = self.runner.slots();
        let mut freed = slots.subscribe();
        let mut retry = Retry::up_to(self.max_backoff);
        let mut waiting_for_room = false;
        let mut look_in: Option<Duration> = None;
        // Work may be waiting already (left by a stopped replica, or written while no
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
                    _ = tokio::time::sleep(look_in.unwrap_or_default()), if look_in.is_some() => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            look_now = false;
            look_in = None;
            last_look = Instant::now();
            freed.borrow_and_update();
            let mut reservation = slots.reserve(self.source, self.batch_size);
            if reservation.is_empty() {
                slots.set_waiting(self.source, true);
                waiting_for_room = true;
                continue;
            }
            waiting_for_room = false;
            let limit = reservation.len();
            let sent_at = Instant::now();
            match claim(limit).await {
                Ok(claimed) => {
                    retry.succeeded();
                    let count = claimed.runs.len();
                    crate::measure::claim_batch(count);
                    for run in claimed.runs {
                        self.runner.start(run, sent_at, &mut reservation);
                    }
                    drop(reservation);
                    // A full batch: more are likely waiting.
                    let more = count == limit;
                    slots.set_waiting(self.source, more);
                    look_now = more;
                    look_in = claimed.look_in.map(|after| after.max(MIN_NOTIFIED_GAP));
                }
                Err(error) => {
                    drop(reservation);
                    crate::measure::database_error(self.name);
                    let delay = retry.failed();
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "{} failed; retrying", self.name);
                    look_in = Some(delay);
                }
            }
        }
        slots.set_waiting(self.source, false);
    }
}
