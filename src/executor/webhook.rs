//! The `webhook` executor: POSTs the run as JSON to an agent runtime and reads back a
//! stream of newline-delimited JSON events.
//!
//! Signature: header `X-Agentd-Timestamp` carries the Unix time in seconds and
//! `X-Agentd-Signature` carries `sha256=<hex>`, the HMAC-SHA256 (key: the secret from the
//! environment variable `executors.webhook.secret_env` names) of `<timestamp>.<body>`. A
//! receiver recomputes it over the raw body and rejects stale timestamps.
//!
//! Events, one JSON object a line:
//! `{"type":"log","level":"info","message":…}`,
//! `{"type":"artifact","name":…,"content_type":…,"data_base64":…}`,
//! `{"type":"output","output":…}`, `{"type":"error","message":…}`.
//! A line that is not such an event is logged as a warning and skipped; an `error` event
//! fails the run; a non-2xx answer fails it with the status and the start of the body (read
//! within [`ERROR_BODY_BYTES`](super::http::ERROR_BODY_BYTES)).
//!
//! The runtime is driven by a tenant, so a line is at most [`max_event_bytes`]: room for an
//! artifact of `artifacts.max_bytes` in base64. A longer line fails the run at once instead
//! of being buffered or skipped forever.

use base64::Engine;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use super::http::{describe, error_excerpt, excerpt};
use super::{ArtifactFile, BoxFuture, Executor, Level, Outcome, RunContext};
use crate::config::WebhookExecutorSettings;

/// Room in an event line beyond an artifact's base64 data: the JSON around it, its name and
/// content type.
pub const EVENT_SLACK_BYTES: u64 = 64 * 1024;

/// Longest event line read: an artifact of `artifact_max_bytes` (`artifacts.max_bytes`) in
/// base64 (4 bytes for every 3) plus [`EVENT_SLACK_BYTES`].
pub fn max_event_bytes(artifact_max_bytes: u64) -> usize {
    let line = artifact_max_bytes
        .div_ceil(3)
        .saturating_mul(4)
        .saturating_add(EVENT_SLACK_BYTES);
    usize::try_from(line).unwrap_or(usize::MAX)
}

/// A buffer that held a line longer than this is given back rather than kept for the next.
const KEPT_BUFFER_BYTES: usize = 64 * 1024;

/// See the module documentation.
pub struct WebhookExecutor {
    settings: WebhookExecutorSettings,
    client: reqwest::Client,
    max_event_bytes: usize,
}

impl WebhookExecutor {
    /// An executor posting to `settings.url`, reading event lines long enough for an
    /// artifact of `artifact_max_bytes`.
    pub fn new(
        settings: WebhookExecutorSettings,
        client: reqwest::Client,
        artifact_max_bytes: u64,
    ) -> WebhookExecutor {
        WebhookExecutor {
            settings,
            client,
            max_event_bytes: max_event_bytes(artifact_max_bytes),
        }
    }
}

/// `sha256=<hex>` of `timestamp.body` under `secret`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256={hex}")
}

impl Executor for WebhookExecutor {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn execute<'a>(&'a self, run: &'a RunContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            match self.call(run).await {
                Ok(outcome) => outcome,
                Err(error) => Outcome::Failed {
                    error,
                    output: None,
                },
            }
        })
    }
}

impl WebhookExecutor {
    async fn call(&self, run: &RunContext) -> Result<Outcome, String> {
        let agent = run.target.agent().map(|agent| {
            json!({
                "id": agent.id,
                "name": agent.name,
                "description": agent.description,
                "category": agent.category,
                "instructions": agent.instructions,
                "variables": agent.variables.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
            })
        });
        let body = json!({
            "run_id": run.run.run_id,
            "type": run.run.kind.as_str(),
            "target_id": run.run.target_id,
            "schedule_id": run.run.schedule_id,
            "input": run.run.input,
            "agent": agent,
            "conversation": run.conversation.as_ref().map(|c| c.id),
            "messages": run.conversation.as_ref().map(|c| &c.messages),
        })
        .to_string();
        let timestamp = chrono::Utc::now().timestamp();
        let secret = self.settings.secret.as_deref().unwrap_or_default();
        let response = self
            .client
            .post(&self.settings.url)
            .header("content-type", "application/json")
            .header("x-agentd-timestamp", timestamp.to_string())
            .header(
                "x-agentd-signature",
                signature(secret, timestamp, body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .map_err(|error| format!("webhook request failed: {}", describe(&error)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!(
                "webhook answered {status}: {}",
                error_excerpt(response).await
            ));
        }
        let mut stream = response.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        let mut output: Option<Value> = None;
        let mut failure: Option<String> = None;
        loop {
            let chunk = match stream.next().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(error)) => {
                    return Err(format!(
                        "the webhook's event stream broke off: {}",
                        describe(&error)
                    ));
                }
                None => break,
            };
            let mut rest: &[u8] = &chunk;
            while !rest.is_empty() {
                let end = rest.iter().position(|byte| *byte == b'\n');
                let piece = &rest[..end.unwrap_or(rest.len())];
                if buffer.len() + piece.len() > self.max_event_bytes {
                    return Ok(Outcome::Failed {
                        error: format!(
                            "the webhook sent an event line over {} bytes, the limit of one \
                             event (an artifact of artifacts.max_bytes in base64 and {EVENT_SLACK_BYTES} bytes more)",
                            self.max_event_bytes
                        ),
                        output,
                    });
                }
                buffer.extend_from_slice(piece);
                let Some(end) = end else {
                    break;
                };
                self.event(run, &buffer, &mut output, &mut failure).await;
                if buffer.capacity() > KEPT_BUFFER_BYTES {
                    buffer = Vec::new();
                } else {
                    buffer.clear();
                }
                rest = &rest[end + 1..];
            }
        }
        if !buffer.is_empty() {
            self.event(run, &buffer, &mut output, &mut failure).await;
        }
        Ok(match failure {
            Some(error) => Outcome::Failed { error, output },
            None => Outcome::Completed {
                output: output.unwrap_or(Value::Null),
            },
        })
    }

    async fn event(
        &self,
        run: &RunContext,
        line: &[u8],
        output: &mut Option<Value>,
        failure: &mut Option<String>,
    ) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        let malformed = |why: &str| {
            format!(
                "webhook sent a malformed event ({why}): {}",
                excerpt(text, 200)
            )
        };
        let event: Value = match serde_json::from_str(text) {
            Ok(Value::Object(object)) => Value::Object(object),
            _ => {
                run.logs
                    .log(Level::Warn, malformed("not a JSON object"))
                    .await;
                return;
            }
        };
        match event["type"].as_str() {
            Some("log") => {
                let level = match event["level"].as_str() {
                    Some("debug") => Level::Debug,
                    Some("warn") => Level::Warn,
                    Some("error") => Level::Error,
                    _ => Level::Info,
                };
                match event["message"].as_str() {
                    Some(message) => run.logs.log(level, message).await,
                    None => {
                        run.logs
                            .log(Level::Warn, malformed("a log event without a message"))
                            .await
                    }
                }
            }
            Some("artifact") => {
                let name = event["name"].as_str();
                let data = event["data_base64"]
                    .as_str()
                    .and_then(|data| base64::engine::general_purpose::STANDARD.decode(data).ok());
                match (name, data) {
                    (Some(name), Some(data)) => {
                        run.artifacts
                            .save(ArtifactFile::bytes(
                                name,
                                event["content_type"].as_str().map(str::to_string),
                                data,
                            ))
                            .await
                    }
                    _ => {
                        run.logs
                            .log(
                                Level::Warn,
                                malformed("an artifact needs a name and valid data_base64"),
                            )
                            .await
                    }
                }
            }
            Some("output") => *output = Some(event["output"].clone()),
            Some("error") => {
                let message = event["message"]
                    .as_str()
                    .unwrap_or("the agent runtime reported an error");
                run.logs.log(Level::Error, message).await;
                *failure = Some(format!("the agent runtime reported an error: {message}"));
            }
            _ => run.logs.log(Level::Warn, malformed("unknown type")).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_line_has_room_for_the_largest_artifact_in_base64() {
        let data = vec![0xa5_u8; 10 * 1024 * 1024 + 1];
        let encoded = base64::engine::general_purpose::STANDARD.encode(&data);
        let event = json!({"type": "artifact", "name": "x".repeat(1000), "data_base64": encoded});
        assert!(event.to_string().len() <= max_event_bytes(data.len() as u64));
        assert!(max_event_bytes(data.len() as u64) < data.len() * 2);
        assert_eq!(max_event_bytes(0), EVENT_SLACK_BYTES as usize);
        assert_eq!(max_event_bytes(u64::MAX), usize::MAX);
    }
}
