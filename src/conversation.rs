//! The pure rules of a conversation turn (docs/conversations.md): which history the
//! executor receives, what text a reply holds, and the statuses a reply goes through.
//! No I/O: the store reads the rows, the runner writes the reply.

use serde_json::Value;
use uuid::Uuid;

use crate::domain::ChatMessage;

/// Most bytes of a reply's text; longer text is cut (on a character boundary) and marked.
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;

/// Most bytes of one history message's `attachments` handed to an executor; larger ones
/// are replaced by `{"omitted": true, "bytes": …}`.
pub const MAX_ATTACHMENTS_BYTES: usize = 16 * 1024;

/// Most characters of `conversations.last_message`.
pub const LAST_MESSAGE_CHARS: usize = 1000;

/// A reply's `attachments.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    /// Text is still arriving.
    Streaming,
    Completed,
    Failed,
    /// A newer message stopped the turn (`conversations.multitask = "interrupt"`).
    Interrupted,
    /// Its run was cancelled (`cancel_run`).
    Cancelled,
}

impl ReplyStatus {
    /// The value of `attachments.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyStatus::Streaming => "streaming",
            ReplyStatus::Completed => "completed",
            ReplyStatus::Failed => "failed",
            ReplyStatus::Interrupted => "interrupted",
            ReplyStatus::Cancelled => "cancelled",
        }
    }
}

/// A message of the history as read, before the cut. The store reads the text of a message
/// over the byte budget by itself only when the turn covers it, and then only its end.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub message: ChatMessage,
    /// Bytes of the whole stored text (`content` may hold only its end).
    pub bytes: usize,
    /// The turn covers it: it is always kept.
    pub own: bool,
}

/// The history handed to the executor: `messages` (oldest first) cut from the oldest end
/// to `max_messages` and `max_bytes` of text, always keeping the turn's own messages; when
/// those alone are over `max_bytes`, the older ones are dropped and the oldest kept one is
/// cut from its start, so the newest text survives.
pub fn cut_history(
    messages: Vec<StoredMessage>,
    max_messages: usize,
    max_bytes: usize,
) -> Vec<ChatMessage> {
    let own_bytes: usize = messages.iter().filter(|m| m.own).map(|m| m.bytes).sum();
    let own_count = messages.iter().filter(|m| m.own).count();
    if own_bytes >= max_bytes {
        return cut_own(messages, max_bytes);
    }
    let mut bytes_left = max_bytes - own_bytes;
    let mut count_left = max_messages.saturating_sub(own_count);
    // Newest first: a message is kept while it fits, and nothing older once one does not.
    let mut keep = vec![false; messages.len()];
    let mut full = false;
    for (index, stored) in messages.iter().enumerate().rev() {
        if stored.own {
            keep[index] = true;
            continue;
        }
        if full {
            continue;
        }
        if count_left > 0 && stored.bytes <= bytes_left {
            keep[index] = true;
            bytes_left -= stored.bytes;
            count_left -= 1;
        } else {
            full = true;
        }
    }
    messages
        .into_iter()
        .zip(keep)
        .filter(|(_, keep)| *keep)
        .map(|(stored, _)| stored.message)
        .collect()
}

/// Only the turn's own messages, newest text first within `max_bytes`.
fn cut_own(messages: Vec<StoredMessage>, max_bytes: usize) -> Vec<ChatMessage> {
    let mut kept: Vec<ChatMessage> = Vec::new();
    let mut bytes_left = max_bytes;
    for stored in messages.into_iter().rev().filter(|m| m.own) {
        if bytes_left == 0 {
            break;
        }
        let mut message = stored.message;
        let text = std::mem::take(&mut message.content);
        message.content = if text.len() <= bytes_left {
            text
        } else {
            let mut start = text.len() - bytes_left;
            while !text.is_char_boundary(start) {
                start += 1;
            }
            text[start..].to_string()
        };
        bytes_left -= message.content.len();
        kept.push(message);
    }
    kept.reverse();
    kept
}

/// A history message's attachments as handed on: at most [`MAX_ATTACHMENTS_BYTES`] of JSON.
pub fn bounded_attachments(json: Option<&str>, bytes: usize) -> Option<Value> {
    let json = json?;
    if bytes > MAX_ATTACHMENTS_BYTES {
        return Some(serde_json::json!({"omitted": true, "bytes": bytes}));
    }
    // The database's jsonb text always parses; the worker's depth limit may not.
    Some(
        serde_json::from_str(json)
            .unwrap_or_else(|_| serde_json::json!({"omitted": true, "bytes": bytes})),
    )
}

/// The reply text an executor's output stands for: a string as is; an object's `reply`,
/// `text`, `content` or `output` string (the first present); anything else as JSON.
pub fn reply_text(output: &Value) -> String {
    match output {
        Value::String(text) => text.clone(),
        Value::Object(fields) => ["reply", "text", "content", "output"]
            .iter()
            .find_map(|name| fields.get(*name).and_then(Value::as_str))
            .map_or_else(|| output.to_string(), str::to_string),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `text` cut to at most [`MAX_REPLY_BYTES`] on a character boundary, marked when cut.
pub fn bounded_reply(mut text: String) -> String {
    if text.len() > MAX_REPLY_BYTES {
        let marker = " … [reply cut at 1 MiB]";
        let mut end = MAX_REPLY_BYTES - marker.len();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(marker);
    }
    text
}

/// The ids of a turn's messages as JSON, for the run's input.
pub fn turn_input(conversation_id: Uuid, message_ids: &[Uuid]) -> Value {
    serde_json::json!({
        "trigger": "message",
        "conversation_id": conversation_id,
        "message_ids": message_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ChatRole;

    fn stored(text: &str, own: bool) -> StoredMessage {
        StoredMessage {
            message: ChatMessage {
                id: Uuid::new_v4(),
                role: if own {
                    ChatRole::User
                } else {
                    ChatRole::Assistant
                },
                content: text.to_string(),
                attachments: None,
                created_at: None,
            },
            bytes: text.len(),
            own,
        }
    }

    fn texts(history: &[ChatMessage]) -> Vec<&str> {
        history.iter().map(|m| m.content.as_str()).collect()
    }

    #[test]
    fn history_is_cut_from_the_oldest_end_by_count() {
        let messages = vec![
            stored("a", false),
            stored("b", false),
            stored("c", false),
            stored("d", true),
        ];
        assert_eq!(texts(&cut_history(messages, 3, 1000)), ["b", "c", "d"]);
    }

    #[test]
    fn history_is_cut_by_bytes_and_nothing_older_than_a_message_that_does_not_fit() {
        let messages = vec![
            stored("small", false),
            stored(&"x".repeat(50), false),
            stored("newer", false),
            stored("question", true),
        ];
        assert_eq!(texts(&cut_history(messages, 50, 40)), ["newer", "question"]);
    }

    #[test]
    fn the_turns_own_messages_are_kept_beyond_the_count() {
        let messages = vec![stored("old", false), stored("1", true), stored("2", true)];
        assert_eq!(texts(&cut_history(messages, 1, 1000)), ["1", "2"]);
    }

    #[test]
    fn own_messages_over_the_budget_are_cut_from_their_start() {
        let messages = vec![
            stored("old", false),
            stored("first question", true),
            stored("ééé second", true),
        ];
        let history = cut_history(messages, 50, 12);
        // The newest text is kept: "ééé second" (13 bytes) loses its start, cut on a
        // character boundary, and one byte is left for the end of the older question.
        assert_eq!(texts(&history), ["n", "éé second"]);
        let messages = vec![stored("abcdef", true), stored("ghij", true)];
        assert_eq!(texts(&cut_history(messages, 50, 6)), ["ef", "ghij"]);
    }

    #[test]
    fn a_message_too_big_to_read_stops_the_history_there() {
        let mut huge = stored("", false);
        huge.bytes = 10_000_000;
        let messages = vec![stored("older", false), huge, stored("q", true)];
        assert_eq!(texts(&cut_history(messages, 50, 1000)), ["q"]);
    }

    #[test]
    fn reply_text_takes_the_outputs_text() {
        assert_eq!(reply_text(&serde_json::json!("hi")), "hi");
        assert_eq!(reply_text(&serde_json::json!({"text": "t", "x": 1})), "t");
        assert_eq!(
            reply_text(&serde_json::json!({"reply": "r", "text": "t"})),
            "r"
        );
        assert_eq!(reply_text(&serde_json::json!({"n": 1})), r#"{"n":1}"#);
        assert_eq!(reply_text(&serde_json::json!(null)), "");
        let long = bounded_reply("é".repeat(MAX_REPLY_BYTES));
        assert!(long.len() <= MAX_REPLY_BYTES && long.ends_with("[reply cut at 1 MiB]"));
    }

    #[test]
    fn large_attachments_are_omitted() {
        assert_eq!(bounded_attachments(None, 0), None);
        assert_eq!(
            bounded_attachments(Some(r#"{"a":1}"#), 7),
            Some(serde_json::json!({"a": 1}))
        );
        assert_eq!(
            bounded_attachments(Some("{}"), MAX_ATTACHMENTS_BYTES + 1),
            Some(serde_json::json!({"omitted": true, "bytes": MAX_ATTACHMENTS_BYTES + 1}))
        );
    }
}
