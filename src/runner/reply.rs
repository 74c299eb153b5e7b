//! A turn's reply: its text streamed into `messages` while the executor runs (inserted at
//! the first text, then rewritten at most once per `conversations.stream_interval`), and
//! made final when the turn ends, with its status and artifacts. Every write is fenced by
//! the run's lease; the streamed writes of all turns on a replica share one statement.

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::batch::Batcher;
use super::control::{RunControl, StopReason};
use crate::conversation::{bounded_reply, reply_text};
use crate::executor::{Outcome, ReplySink};
use crate::store::conversations::{FinalReply, ReplyText};
use crate::store::runs::{Fenced, storable_text};

/// Streamed writes of every turn on this replica, grouped.
pub type ReplyWriter = Batcher<ReplyText, Fenced>;

/// Most replies in one streamed write.
pub const MAX_GROUP: usize = 500;

/// Writes `sink`'s text into the reply of `run_id` as it grows, until `done` fires or the
/// lease is lost. `waited` is how long the turn's oldest message had waited when the turn
/// was claimed at `claimed` (for the first-text metric).
pub async fn stream(
    writer: ReplyWriter,
    run_id: Uuid,
    sink: ReplySink,
    control: RunControl,
    interval: Duration,
    first_text: (Duration, Instant),
    done: CancellationToken,
) {
    let mut written_bytes = 0;
    let mut first = true;
    let mut last_write: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = sink.changed() => {}
            _ = done.cancelled() => return,
        }
        if let Some(at) = last_write {
            tokio::select! {
                _ = tokio::time::sleep_until(at + interval) => {}
                _ = done.cancelled() => return,
            }
        }
        if control.lease_lost() {
            return;
        }
        let Some(text) = sink.text() else { continue };
        if text.len() == written_bytes {
            continue;
        }
        let bytes = text.len();
        last_write = Some(Instant::now());
        match writer
            .call(ReplyText {
                run_id,
                content: storable_text(text),
            })
            .await
        {
            Ok(Fenced::Written) => {
                if first {
                    first = false;
                    crate::measure::turn_first_text(first_text.0 + first_text.1.elapsed());
                }
                written_bytes = bytes;
            }
            // The lease is gone, or the conversation was deleted: nothing more to write.
            Ok(Fenced::LeaseLost) => return,
            Err(error) => {
                crate::measure::database_error("write_reply");
                tracing::warn!(error = %error, "writing the streaming reply failed; trying again at the next interval");
                // The next change (or the final write) brings the text.
                sink.wake();
            }
        }
    }
}

/// The final reply for how the turn ended: the streamed text (or, when the executor
/// streamed none, the text its output stands for), the status, and the error when it
/// failed.
pub fn final_reply(
    run_id: Uuid,
    outcome: &Outcome,
    streamed: Option<String>,
    reason: Option<StopReason>,
) -> FinalReply {
    let text_of = |output: Option<&Value>| streamed.clone().or_else(|| output.map(reply_text));
    let (content, status, error) = match outcome {
        Outcome::Completed { output } => (text_of(Some(output)), "completed", None),
        Outcome::Failed { output, .. } if reason == Some(StopReason::Cancelled) => {
            (text_of(output.as_ref()), "cancelled", None)
        }
        Outcome::Failed { error, output } => (
            text_of(output.as_ref()),
            "failed",
            Some(storable_text(error.clone())),
        ),
    };
    FinalReply {
        run_id,
        content: storable_text(bounded_reply(content.unwrap_or_default())),
        status,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_reply_says_how_the_turn_ended() {
        let id = Uuid::nil();
        let done = Outcome::Completed {
            output: json!({"text": "hello"}),
        };
        let reply = final_reply(id, &done, None, None);
        assert_eq!(
            (reply.content.as_str(), reply.status),
            ("hello", "completed")
        );
        assert_eq!(reply.error, None);
        // Streamed text wins over the output.
        let reply = final_reply(id, &done, Some("streamed".into()), None);
        assert_eq!(reply.content, "streamed");

        let failed = Outcome::Failed {
            error: "the model's stream was cut".into(),
            output: Some(json!({"text": "partial\u{0}"})),
        };
        let reply = final_reply(id, &failed, None, None);
        assert_eq!(
            (reply.content.as_str(), reply.status),
            ("partial", "failed")
        );
        assert_eq!(reply.error.as_deref(), Some("the model's stream was cut"));

        let cancelled = Outcome::Failed {
            error: "cancelled".into(),
            output: None,
        };
        let reply = final_reply(
            id,
            &cancelled,
            Some("so far".into()),
            Some(StopReason::Cancelled),
        );
        assert_eq!(
            (reply.content.as_str(), reply.status),
            ("so far", "cancelled")
        );
        assert_eq!(reply.error, None);
        let reply = final_reply(id, &cancelled, None, Some(StopReason::ShuttingDown));
        assert_eq!((reply.content.as_str(), reply.status), ("", "failed"));
    }
}
