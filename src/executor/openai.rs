//! The `openai` executor: an OpenAI-compatible `/chat/completions` endpoint with
//! `stream: true` (OpenAI, vLLM, Ollama, llama.cpp's server, LiteLLM).
//!
//! The system message is the agent's instructions with its variables substituted, the user
//! message the run's input (for a conversation turn: the conversation's history, each
//! message with its role, and the streamed text is also the reply). Streamed text goes into the run's logs line by line as it
//! arrives; the output is the text plus the model and the finish reason; token usage goes
//! to `resource_usage` (estimated with the model family's tokenizer when the server reports
//! none, see [`super::tokens`]). Before the first token, connection errors, 429 and 5xx
//! answers, and a stream that breaks off or ends without any text, are retried with
//! backoff; a stream cut after tokens arrived fails the run with a clear error and keeps
//! the partial text in the logs and the output.
//!
//! The endpoint is driven by a tenant, so what it sends is bounded: one stream event at most
//! [`MAX_EVENT_BYTES`] (counted on the raw bytes, before the SSE parser buffers them), the
//! reply text at most `executors.openai.max_reply_bytes`, an error answer's body read within
//! [`ERROR_BODY_BYTES`](super::http::ERROR_BODY_BYTES), the router's answer within
//! [`MAX_ANSWER_BYTES`]. Past a cap the run fails with an error naming it, keeping the text
//! it had.

use std::time::Duration;

use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::builtin::render;
use super::http::{describe, error_excerpt, excerpt, read_capped};
use super::{BoxFuture, Executor, Level, Outcome, RunContext};
use crate::config::OpenAiExecutorSettings;
use crate::retry::{Backoff, Retry};

/// Most bytes of one stream event (the bytes between two blank lines).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Most bytes of the router's (non-streamed) answer.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Attempts before the first token (the first plus three retries).
const ATTEMPTS: u32 = 4;
/// Waits between those attempts: 250 ms, then doubling (with the usual jitter).
const BEFORE_FIRST_TOKEN: Backoff = Backoff {
    first: Duration::from_millis(250),
    max: Duration::from_secs(2),
};

/// See the module documentation.
pub struct OpenAiExecutor {
    settings: OpenAiExecutorSettings,
    client: reqwest::Client,
}

impl OpenAiExecutor {
    /// An executor calling `settings.base_url`.
    pub fn new(settings: OpenAiExecutorSettings, client: reqwest::Client) -> OpenAiExecutor {
        OpenAiExecutor { settings, client }
    }
}

impl Executor for OpenAiExecutor {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn execute<'a>(&'a self, run: &'a RunContext) -> BoxFuture<'a, Outcome> {
        Box::pin(self.complete(run))
    }
}

/// Why one attempt ended without a usable stream.
enum AttemptError {
    /// Worth another attempt (connection error, 429, 5xx, a stream cut before any text).
    Retry(String),
    /// Not worth one (4xx other than 429).
    Fatal(String),
}

impl OpenAiExecutor {
    async fn complete(&self, run: &RunContext) -> Outcome {
        let (system, model) = match run.target.agent() {
            Some(agent) => {
                let variables: Vec<(String, String)> = agent
                    .variables
                    .iter()
                    .map(|v| (v.name.clone(), v.value.clone().unwrap_or_default()))
                    .collect();
                let input = run.input_text();
                let system = match render(
                    agent.instructions.as_deref().unwrap_or_default(),
                    &variables,
                    &input,
                ) {
                    Ok(system) => system,
                    Err(error) => return failed(error, None),
                };
                (
                    system,
                    self.settings
                        .model_by_category
                        .get(&agent.category)
                        .cloned()
                        .unwrap_or_else(|| self.settings.model.clone()),
                )
            }
            None => (String::new(), self.settings.model.clone()),
        };
        // A turn: the instructions, then the conversation's history; otherwise the input.
        let messages: Vec<Value> = match &run.conversation {
            Some(conversation) => std::iter::once(json!({ "role": "system", "content": system }))
                .chain(
                    conversation
                        .messages
                        .iter()
                        .map(|message| json!({ "role": message.role, "content": message.content })),
                )
                .collect(),
            None => vec![
                json!({ "role": "system", "content": system }),
                json!({ "role": "user", "content": run.input_text() }),
            ],
        };
        let body = json!({
            "model": model,
            "stream": true,
            "stream_options": { "include_usage": true },
            "messages": &messages,
        });
        let outcome = self.stream(run, &body, model).await;
        estimate_tokens(run, &body, &outcome).await;
        outcome
    }

    /// Sends the request and reads the streamed reply. Before the first token, an attempt
    /// that fails for a reason worth another (no connection, 429, 5xx, a stream cut or
    /// silent before any text) is retried, [`ATTEMPTS`] in all.
    async fn stream(&self, run: &RunContext, body: &Value, model: String) -> Outcome {
        let url = format!("{}/chat/completions", self.settings.base_url);
        let mut retry = Retry::new(BEFORE_FIRST_TOKEN);
        loop {
            let error = match self.send(&url, body).await {
                Ok(response) => match self.read(run, response, &model).await {
                    Ok(outcome) => return outcome,
                    Err(cut) => AttemptError::Retry(cut),
                },
                Err(error) => error,
            };
            match error {
                AttemptError::Fatal(error) => return failed(error, None),
                AttemptError::Retry(error) if retry.failures() + 1 < ATTEMPTS => {
                    let delay = retry.failed();
                    run.logs
                        .log(
                            Level::Warn,
                            format!("{error}; retrying in {} ms", delay.as_millis()),
                        )
                        .await;
                    tokio::time::sleep(delay).await;
                }
                AttemptError::Retry(error) => {
                    return failed(format!("{error} (gave up after {ATTEMPTS} attempts)"), None);
                }
            }
        }
    }

    /// Reads one streamed reply to its outcome; `Err` when the stream broke off (or ended)
    /// before any text arrived, which is worth another attempt.
    async fn read(
        &self,
        run: &RunContext,
        response: reqwest::Response,
        model: &str,
    ) -> Result<Outcome, String> {
        let mut boundary = EventBoundary::default();
        let mut events = response
            .bytes_stream()
            .map(move |chunk| match chunk {
                Ok(chunk) => match boundary.admit(&chunk) {
                    Ok(()) => Ok(chunk),
                    Err(EventTooLong) => Err(StreamError::EventTooLong),
                },
                Err(error) => Err(StreamError::Transport(error)),
            })
            .eventsource();
        let max_reply_bytes = self.settings.max_reply_bytes;
        let mut text = String::new();
        let mut line = String::new();
        let mut finish_reason: Option<String> = None;
        let mut model_used = model.to_string();
        let mut done = false;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    flush(run, &mut line).await;
                    let characters = text.chars().count();
                    let error = match error {
                        EventStreamError::Transport(StreamError::EventTooLong) => format!(
                            "the model sent a stream event over {MAX_EVENT_BYTES} bytes, the limit \
                             of one event; stopped after {characters} characters"
                        ),
                        EventStreamError::Transport(StreamError::Transport(error)) => {
                            let error = format!(
                                "the model's stream was cut after {characters} characters: {}",
                                describe(&error)
                            );
                            if text.is_empty() {
                                return Err(error);
                            }
                            error
                        }
                        other => format!(
                            "the model's stream was cut after {characters} characters: {other}"
                        ),
                    };
                    return Ok(failed(error, partial(&text, &model_used)));
                }
            };
            if event.data.trim() == "[DONE]" {
                done = true;
                break;
            }
            let chunk: Value = match serde_json::from_str(&event.data) {
                Ok(chunk) => chunk,
                Err(_) => {
                    flush(run, &mut line).await;
                    return Ok(failed(
                        format!(
                            "the model sent a malformed stream event: {}",
                            excerpt(&event.data, 200)
                        ),
                        partial(&text, &model_used),
                    ));
                }
            };
            if let Some(model) = chunk["model"].as_str() {
                model_used = model.to_string();
            }
            if let Some(usage) = chunk.get("usage").filter(|usage| usage.is_object()) {
                for (name, value) in usage.as_object().into_iter().flatten() {
                    if value.is_number() {
                        run.usage.record(name, value.clone());
                    }
                }
            }
            let choice = &chunk["choices"][0];
            if let Some(delta) = choice["delta"]["content"].as_str() {
                let (kept, over) = within(delta, max_reply_bytes - text.len());
                text.push_str(kept);
                run.reply.push(kept);
                for piece in kept.split_inclusive('\n') {
                    line.push_str(piece.trim_end_matches('\n'));
                    if piece.ends_with('\n') {
                        run.logs.info(std::mem::take(&mut line)).await;
                    }
                }
                if over {
                    flush(run, &mut line).await;
                    return Ok(failed(
                        format!(
                            "the model's reply passed executors.openai.max_reply_bytes \
                             ({max_reply_bytes} bytes); stopped after {} characters",
                            text.chars().count()
                        ),
                        partial(&text, &model_used),
                    ));
                }
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish_reason = Some(reason.to_string());
            }
        }
        flush(run, &mut line).await;
        if !done && finish_reason.is_none() {
            let error = format!(
                "the model's stream ended early after {} characters",
                text.chars().count()
            );
            if text.is_empty() {
                return Err(error);
            }
            return Ok(failed(error, partial(&text, &model_used)));
        }
        Ok(Outcome::Completed {
            output: json!({
                "text": text,
                "model": model_used,
                "finish_reason": finish_reason,
            }),
        })
    }

    async fn send(&self, url: &str, body: &Value) -> Result<reqwest::Response, AttemptError> {
        let mut request = self.client.post(url).json(body);
        if let Some(key) = &self.settings.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|error| {
            AttemptError::Retry(format!(
                "cannot reach the model endpoint: {}",
                describe(&error)
            ))
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let message = format!(
            "the model endpoint answered {status}: {}",
            error_excerpt(response).await
        );
        if status.as_u16() == 429 || status.is_server_error() {
            Err(AttemptError::Retry(message))
        } else {
            Err(AttemptError::Fatal(message))
        }
    }
}

/// Records estimated token counts when the server reported none (and a reply, even a
/// partial one, arrived): see [`super::tokens`].
async fn estimate_tokens(run: &RunContext, body: &Value, outcome: &Outcome) {
    let output = match outcome {
        Outcome::Completed { output } => Some(output),
        Outcome::Failed { output, .. } => output.as_ref(),
    };
    let Some(reply) = output.and_then(|output| output["text"].as_str()) else {
        return;
    };
    if ["prompt_tokens", "completion_tokens", "total_tokens"]
        .iter()
        .any(|name| run.usage.contains(name))
    {
        return;
    }
    let model = output
        .and_then(|output| output["model"].as_str())
        .or_else(|| body["model"].as_str())
        .unwrap_or_default()
        .to_string();
    let messages: Vec<(String, String)> = body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|message| {
            (
                message["role"].as_str().unwrap_or_default().to_string(),
                message["content"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let reply = reply.to_string();
    let counted =
        tokio::task::spawn_blocking(move || super::tokens::estimate(&model, &messages, &reply))
            .await;
    if let Ok(estimate) = counted {
        for (name, value) in estimate.figures() {
            run.usage.record(name, value);
        }
    }
}

async fn flush(run: &RunContext, line: &mut String) {
    if !line.is_empty() {
        run.logs.info(std::mem::take(line)).await;
    }
}

fn partial(text: &str, model: &str) -> Option<Value> {
    (!text.is_empty()).then(|| json!({ "text": text, "model": model, "partial": true }))
}

fn failed(error: String, output: Option<Value>) -> Outcome {
    Outcome::Failed { error, output }
}

/// The longest start of `text` within `room` bytes (on a character boundary), and whether
/// anything was left out.
fn within(text: &str, room: usize) -> (&str, bool) {
    if text.len() <= room {
        (text, false)
    } else {
        (&text[..text.floor_char_boundary(room)], true)
    }
}

/// Why the byte stream under the SSE parser ended.
#[derive(Debug)]
enum StreamError {
    /// The connection broke, or was silent past `executors.http.read_timeout`.
    Transport(reqwest::Error),
    /// An event grew past [`MAX_EVENT_BYTES`] without ending.
    EventTooLong,
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Transport(error) => write!(f, "{error}"),
            StreamError::EventTooLong => write!(f, "a stream event over {MAX_EVENT_BYTES} bytes"),
        }
    }
}

/// The bytes since the last event boundary passed [`MAX_EVENT_BYTES`].
#[derive(Debug, PartialEq)]
struct EventTooLong;

/// Counts the raw bytes of the event being received, so the SSE parser (which buffers an
/// event until the blank line that ends it) never holds more than [`MAX_EVENT_BYTES`].
/// Lines end with LF, CR or CRLF; an empty line ends an event.
#[derive(Debug, Default)]
struct EventBoundary {
    /// Bytes since the last empty line.
    pending: usize,
    /// Bytes of the current line, without its end.
    line: usize,
    /// The previous byte was a CR (an LF right after it belongs to the same line end).
    after_cr: bool,
}

impl EventBoundary {
    /// Takes in the next bytes of the stream.
    fn admit(&mut self, bytes: &[u8]) -> Result<(), EventTooLong> {
        for &byte in bytes {
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    if self.line == 0 {
                        self.pending = 0;
                    } else {
                        self.pending += 1;
                    }
                    self.line = 0;
                    self.after_cr = byte == b'\r';
                }
                _ => {
                    self.line += 1;
                    self.pending += 1;
                    self.after_cr = false;
                }
            }
            if self.pending > MAX_EVENT_BYTES {
                return Err(EventTooLong);
            }
        }
        Ok(())
    }
}

/// Picks a `route` team's member by asking the model (`execution.team_router = "openai"`).
pub struct ModelRouter {
    settings: OpenAiExecutorSettings,
    client: reqwest::Client,
}

impl ModelRouter {
    /// A router using the `openai` executor's endpoint and model.
    pub fn new(settings: OpenAiExecutorSettings, client: reqwest::Client) -> ModelRouter {
        ModelRouter { settings, client }
    }

    /// The index of the member the model names for `input`, or why it could not choose.
    pub async fn choose(
        &self,
        members: &[crate::domain::AgentDefinition],
        input: &str,
    ) -> Result<usize, String> {
        let listing: Vec<String> = members
            .iter()
            .map(|member| {
                format!(
                    "- {} (category: {}): {}",
                    member.name,
                    member.category,
                    member.description.as_deref().unwrap_or("no description")
                )
            })
            .collect();
        let body = json!({
            "model": self.settings.model,
            "stream": false,
            "messages": [
                { "role": "system", "content": format!(
                    "You route a request to the one team member best suited to it. Members:\n{}\n\
                     Answer with the member's name only.", listing.join("\n")) },
                { "role": "user", "content": input },
            ],
        });
        let mut request = self
            .client
            .post(format!("{}/chat/completions", self.settings.base_url))
            .json(&body);
        if let Some(key) = &self.settings.api_key {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|error| format!("cannot reach the model: {}", describe(&error)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!(
                "the model endpoint answered {status}: {}",
                error_excerpt(response).await
            ));
        }
        let body = read_capped(response, MAX_ANSWER_BYTES).await;
        if let Some(error) = &body.error {
            return Err(format!(
                "reading the model's answer failed: {}",
                describe(error)
            ));
        }
        if body.truncated {
            return Err(format!(
                "the model's answer is over {MAX_ANSWER_BYTES} bytes, the limit of a routing answer"
            ));
        }
        let text = String::from_utf8_lossy(&body.bytes);
        let answer: Value = serde_json::from_str(&text)
            .map_err(|_| format!("the model's answer is not JSON: {}", excerpt(&text, 200)))?;
        let content = answer["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| "the model's answer has no message content".to_string())?;
        let named = content
            .trim()
            .trim_matches(|c: char| c == '"' || c == '.' || c == '\'')
            .to_lowercase();
        members
            .iter()
            .position(|member| member.name.to_lowercase() == named)
            .or_else(|| {
                members
                    .iter()
                    .position(|member| named.contains(&member.name.to_lowercase()))
            })
            .ok_or_else(|| {
                format!(
                    "the model answered {:?}, which names no member",
                    excerpt(content, 100)
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_may_be_long_but_not_longer_than_the_cap() {
        let mut boundary = EventBoundary::default();
        let line = format!("data: {}\n", "x".repeat(1000));
        // Many events, each well under the cap: far more than the cap in all.
        for _ in 0..3 * MAX_EVENT_BYTES / 1000 {
            assert_eq!(boundary.admit(line.as_bytes()), Ok(()));
            assert_eq!(boundary.admit(b"\n"), Ok(()));
        }
        // CRLF and CR line ends end events too.
        for ending in ["\r\n\r\n", "\r\r"] {
            let event = format!("data: {}{ending}", "y".repeat(MAX_EVENT_BYTES - 10));
            assert_eq!(boundary.admit(event.as_bytes()), Ok(()), "{ending:?}");
        }
        // One event of many data lines without a blank line between them is one event.
        let mut lines = EventBoundary::default();
        let result = (0..2 * MAX_EVENT_BYTES / line.len())
            .map(|_| lines.admit(line.as_bytes()))
            .find(Result::is_err);
        assert_eq!(result, Some(Err(EventTooLong)));
        // A stream without any line end.
        let mut endless = EventBoundary::default();
        assert_eq!(endless.admit(&vec![b'z'; MAX_EVENT_BYTES]), Ok(()));
        assert_eq!(endless.admit(b"z"), Err(EventTooLong));
    }

    #[test]
    fn reply_text_is_cut_on_a_character_boundary() {
        assert_eq!(within("hello", 10), ("hello", false));
        assert_eq!(within("hello", 5), ("hello", false));
        assert_eq!(within("hello", 3), ("hel", true));
        assert_eq!(within("héllo", 2), ("h", true));
        assert_eq!(within("héllo", 0), ("", true));
    }
}
