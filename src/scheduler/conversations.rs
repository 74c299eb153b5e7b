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
use tokio_util::sync::CancellationToken;

use super::queue::{Claimed, QueueLoop};
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
        let queue = QueueLoop {
            name: "claim_turns",
            source: Source::Conversations,
            runner: &self.runner,
            batch_size: self.batch_size,
            max_backoff: self.max_backoff,
            wake: &self.wake,
        };
        let this = &self;
        queue
            .run(shutdown, |limit| async move {
                let claim = claim_turns(
                    &this.pool,
                    limit,
                    &this.worker_id,
                    this.lease_ttl,
                    this.rules,
                )
                .await?;
                if claim.interrupted > 0 {
                    tracing::info!(
                        turns = claim.interrupted,
                        "running turns interrupted by newer messages"
                    );
                }
                for (run, turn) in claim
                    .runs
                    .iter()
                    .filter_map(|run| run.turn.as_ref().map(|turn| (run, turn)))
                {
                    crate::measure::turn_started(turn.waited);
                    tracing::info!(
                        run_id = %run.run_id,
                        conversation_id = %turn.conversation_id,
                        messages = turn.message_ids.len(),
                        "turn claimed"
                    );
                }
                Ok(Claimed {
                    runs: claim.runs,
                    look_in: claim.next_ready,
                })
            })
            .await;
        tracing::info!("conversation loop stopped claiming");
    }
}
