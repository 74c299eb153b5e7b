//! The conversation loop: claims turns (user messages waiting for an answer) in batches
//! and hands them to the runner ([`claim_turns`]).
//!
//! It wakes on the `agentd_messages` notification (sent by the trigger on `messages`, and
//! when a turn ends while messages wait for the conversation's next one), when the schedule
//! loop's look finds messages waiting (the safety net for a lost notification), when a
//! conversation's debounce runs out, and, while turns wait for room, when a run ends.

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
use crate::store::conversations::{TurnRules, claim_turns};

/// The conversation loop's service.
#[derive(Clone)]
pub struct TurnClaimer {
    pub pool: PgPool,
    pub runner: Runner,
    pub worker_id: String,
    pub lease_ttl: Duration,
    /// Most turns claimed in one transaction (`scheduler.batch_size`).
    pub batch_size: usize,
    pub rules: TurnRules,
    pub max_backoff: Duration,
    /// Notified when messages may be waiting.
    pub wake: Arc<Notify>,
}

impl TurnClaimer {
    /// Claims until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = self.runner.slots();
        let mut freed = slots.subscribe();
        let mut retry = Retry::up_to(self.max_backoff);
        let mut waiting_for_room = false;
        // Sleep at most this long (a debounce running out, or a retry).
        let mut look_in: Option<Duration> = None;
        // Messages may be waiting already (left by a stopped replica, or written while no
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
            let mut reservation = slots.reserve(Source::Conversations, self.batch_size);
            if reservation.is_empty() {
                slots.set_waiting(Source::Conversations, true);
                waiting_for_room = true;
                continue;
            }
            waiting_for_room = false;
            let limit = reservation.len();
            let sent_at = Instant::now();
            match claim_turns(
                &self.pool,
                limit,
                &self.worker_id,
                self.lease_ttl,
                self.rules,
            )
            .await
            {
                Ok(claim) => {
                    retry.succeeded();
                    let claimed = claim.runs.len();
                    crate::measure::claim_batch(claimed);
                    if claim.interrupted > 0 {
                        tracing::info!(
                            turns = claim.interrupted,
                            "running turns interrupted by newer messages"
                        );
                    }
                    for run in claim.runs {
                        if let Some(turn) = &run.turn {
                            crate::measure::turn_started(turn.waited);
                            tracing::info!(
                                run_id = %run.run_id,
                                conversation_id = %turn.conversation_id,
                                messages = turn.message_ids.len(),
                                "turn claimed"
                            );
                        }
                        self.runner.start(run, sent_at, &mut reservation);
                    }
                    drop(reservation);
                    // A full batch: more are likely waiting.
                    let more = claimed == limit;
                    slots.set_waiting(Source::Conversations, more);
                    look_now = more;
                    look_in = claim.next_ready.map(|ready| ready.max(MIN_NOTIFIED_GAP));
                }
                Err(error) => {
                    drop(reservation);
                    crate::measure::database_error("claim_turns");
                    let delay = retry.failed();
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "claiming turns failed; retrying");
                    look_in = Some(delay);
                }
            }
        }
        slots.set_waiting(Source::Conversations, false);
        tracing::info!("conversation loop stopped claiming");
    }
}
