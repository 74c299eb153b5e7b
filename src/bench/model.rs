//! The model of the `chat` scenario: an OpenAI-compatible chat-completions server on
//! 127.0.0.1 inside the bench process, streaming a fixed answer at a fixed pace to every
//! request, and remembering when it sent each request's first chunk, so that the delay to
//! the reply's first visible text can be measured on the bench's own clock. Like OpenAI's
//! API, it reports token usage in a last chunk when the request asks for it
//! (`stream_options.include_usage`, which agentd sends), so the replicas count no tokens
//! themselves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The variable the replicas read the model's key from: a fixed name of the bench's own,
/// so that a real key in the bench's environment is never sent to the fake model.
const KEY_VARIABLE: &str = "AGENTD_BENCH_MODEL_KEY";

/// What the server streams and what it saw.
struct Shared {
    chunks: usize,
    chunk_interval: Duration,
    /// Requests received.
    requests: AtomicUsize,
    /// When each request's first chunk was handed to the connection, by the text of the
    /// request's last user message.
    first_chunks: Mutex<HashMap<String, Instant>>,
}

/// The running server; dropping it stops it.
pub struct FakeModel {
    base_url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl FakeModel {
    /// Starts the server on a free port of 127.0.0.1: every request is answered with
    /// `chunks` pieces of text (see [`chunk_text`]), one every `chunk_interval` (the first
    /// one `chunk_interval` after the request, as a model takes a while to start), then the
    /// finish event, the usage when asked for, and `[DONE]`.
    pub async fn start(chunks: usize, chunk_interval: Duration) -> anyhow::Result<FakeModel> {
        let shared = Arc::new(Shared {
            chunks,
            chunk_interval,
            requests: AtomicUsize::new(0),
            first_chunks: Mutex::new(HashMap::new()),
        });
        let router = axum::Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::warn!(error = %error, "the bench's model server stopped");
            }
        });
        Ok(FakeModel {
            base_url: format!("http://{address}/v1"),
            shared,
            server,
        })
    }

    /// The base URL for `executors.openai.base_url`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The settings (`AGENTD__…` variables, and the key's variable) that make a replica
    /// run every agent with the openai executor on this server.
    pub fn replica_settings(&self) -> Vec<(String, String)> {
        [
            ("AGENTD__EXECUTION__DEFAULT", "openai"),
            ("AGENTD__EXECUTORS__OPENAI__BASE_URL", self.base_url()),
            ("AGENTD__EXECUTORS__OPENAI__API_KEY_ENV", KEY_VARIABLE),
            (KEY_VARIABLE, "bench"),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// When the first chunk went out, by the text of the request's last user message.
    pub fn first_chunks(&self) -> HashMap<String, Instant> {
        self.shared
            .first_chunks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The text of chunk `index`: the whole answer is every chunk's text in order.
pub fn chunk_text(index: usize) -> String {
    format!("w{index} ")
}

/// The whole answer the server streams.
pub fn answer(chunks: usize) -> String {
    (0..chunks).map(chunk_text).collect()
}

/// Token counts for the usage chunk: a word a token, as a model's are not the point here.
fn usage(request: &Value, chunks: usize) -> Value {
    let prompt_tokens: usize = request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|message| message["content"].as_str())
        .map(|content| content.split_whitespace().count())
        .sum();
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": chunks,
        "total_tokens": prompt_tokens + chunks,
    })
}

/// The text of the request's last user message (empty when there is none).
fn last_user_message(request: &Value) -> String {
    request["messages"]
        .as_array()
        .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|message| message["content"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Where one answer's stream stands.
struct Answering {
    shared: Arc<Shared>,
    asked: Instant,
    /// The next chunk.
    index: usize,
    /// The request's key, until its first chunk is recorded.
    key: Option<String>,
    /// The usage chunk, when the request asked for one.
    usage: Option<Value>,
}

/// `POST /v1/chat/completions`: the streamed answer.
async fn complete(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let answering = Answering {
        key: Some(last_user_message(&request)),
        usage: (request["stream_options"]["include_usage"] == true)
            .then(|| usage(&request, shared.chunks)),
        shared,
        asked: Instant::now(),
        index: 0,
    };
    let events = futures_util::stream::unfold(answering, |mut state| async move {
        let chunks = state.shared.chunks;
        if state.index > chunks {
            return None;
        }
        let event = if state.index < chunks {
            // Each chunk at its own instant from the request, so the pace does not drift.
            let due = state.asked + state.shared.chunk_interval * (state.index as u32 + 1);
            tokio::time::sleep_until(due).await;
            if let Some(key) = state.key.take() {
                state
                    .shared
                    .first_chunks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(key)
                    .or_insert_with(Instant::now);
            }
            format!(
                "data: {}\n\n",
                json!({"choices": [{"delta": {"content": chunk_text(state.index)}}]})
            )
        } else {
            let mut end = format!(
                "data: {}\n\n",
                json!({"choices": [{"delta": {}, "finish_reason": "stop"}]})
            );
            if let Some(usage) = state.usage.take() {
                end.push_str(&format!(
                    "data: {}\n\n",
                    json!({"choices": [], "usage": usage})
                ));
            }
            end.push_str("data: [DONE]\n\n");
            end
        };
        state.index += 1;
        Some((Ok::<_, std::io::Error>(Bytes::from(event)), state))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(events),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_the_last_user_message() {
        let request = json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "w0 "},
            {"role": "user", "content": "second"},
        ]});
        assert_eq!(last_user_message(&request), "second");
        assert_eq!(last_user_message(&Value::Null), "");
        assert_eq!(answer(3), "w0 w1 w2 ");
        assert_eq!(usage(&request, 3)["total_tokens"], 8);
    }
}
