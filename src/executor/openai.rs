//! The `openai` executor: an OpenAI-compatible `/chat/completions` endpoint with
//! `stream: true` (OpenAI, vLLM, Ollama, llama.cpp's server, LiteLLM).
//!
//! The system message is the agent's instructions with its variables substituted, the user
//! message the run's input. Streamed text goes into the run's logs line by line as it
//! arrives; the output is the text plus the model and the finish reason; token usage goes
//! to `resource_usage`. Connection errors, 429 and 5xx answers are retried with backoff
//! before the first token; a stream cut after tokens arrived fails the run with a clear
//! error and keeps the partial text in the logs and the output.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::builtin::{input_text, render};
use super::http::excerpt;
use super::{BoxFuture, Executor, Level, Outcome, RunContext};
use crate::config::OpenAiExecutorSettings;

/// Attempts before the first token (the first plus three retries).
const ATTEMPTS: u32 = 4;

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
    /// Worth another attempt (connection error, 429, 5xx).
    Retry(String),
    /// Not worth one (4xx other than 429).
    Fatal(String),
}

impl OpenAiExecutor {
    async fn complete(&self, run: &RunContext) -> Outcome {
        let (system, model) = match &run.agent {
            Some(agent) => {
                let variables: Vec<(String, String)> = agent
                    .variables
                    .iter()
                    .map(|v| (v.name.clone(), v.value.clone().unwrap_or_default()))
                    .collect();
                let input = input_text(run.run.input.as_ref());
                (
                    render(
                        agent.instructions.as_deref().unwrap_or_default(),
                        &variables,
                        &input,
                    ),
                    self.settings
                        .model_by_category
                        .get(&agent.category)
                        .cloned()
                        .unwrap_or_else(|| self.settings.model.clone()),
                )
            }
            None => (String::new(), self.settings.model.clone()),
        };
        let body = json!({
            "model": model,
            "stream": true,
            "stream_options": { "include_usage": true },
            "messages": [
                { "role": "system", "content": system },
                { "role": "user", "content": input_text(run.run.input.as_ref()) },
            ],
        });
        let url = format!("{}/chat/completions", self.settings.base_url);
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            match self.send(&url, &body).await {
                Ok(response) => break response,
                Err(AttemptError::Fatal(error)) => return failed(error, None),
                Err(AttemptError::Retry(error)) if attempt < ATTEMPTS => {
                    let delay = Duration::from_millis(250 * 2u64.pow(attempt - 1));
                    run.logs
                        .log(
                            Level::Warn,
                            format!("{error}; retrying in {} ms", delay.as_millis()),
                        )
                        .await;
                    tokio::time::sleep(delay).await;
                }
                Err(AttemptError::Retry(error)) => {
                    return failed(format!("{error} (gave up after {ATTEMPTS} attempts)"), None);
                }
            }
        };

        let mut events = response.bytes_stream().eventsource();
        let mut text = String::new();
        let mut line = String::new();
        let mut finish_reason: Option<String> = None;
        let mut model_used = model.clone();
        let mut done = false;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    flush(run, &mut line).await;
                    return failed(
                        format!(
                            "the model's stream was cut after {} characters: {error}",
                            text.chars().count()
                        ),
                        partial(&text, &model_used),
                    );
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
                    return failed(
                        format!(
                            "the model sent a malformed stream event: {}",
                            excerpt(&event.data, 200)
                        ),
                        partial(&text, &model_used),
                    );
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
                text.push_str(delta);
                for piece in delta.split_inclusive('\n') {
                    line.push_str(piece.trim_end_matches('\n'));
                    if piece.ends_with('\n') {
                        run.logs.info(std::mem::take(&mut line)).await;
                    }
                }
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish_reason = Some(reason.to_string());
            }
        }
        flush(run, &mut line).await;
        if !done && finish_reason.is_none() {
            return failed(
                format!(
                    "the model's stream ended early after {} characters",
                    text.chars().count()
                ),
                partial(&text, &model_used),
            );
        }
        Outcome::Completed {
            output: json!({
                "text": text,
                "model": model_used,
                "finish_reason": finish_reason,
            }),
        }
    }

    async fn send(&self, url: &str, body: &Value) -> Result<reqwest::Response, AttemptError> {
        let mut request = self.client.post(url).json(body);
        if let Some(key) = &self.settings.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|error| {
            AttemptError::Retry(format!("cannot reach the model endpoint: {error}"))
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let message = format!(
            "the model endpoint answered {status}: {}",
            excerpt(&text, 200)
        );
        if status.as_u16() == 429 || status.is_server_error() {
            Err(AttemptError::Retry(message))
        } else {
            Err(AttemptError::Fatal(message))
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

/// Picks a `route` team's member by asking the model (`executor.team_router = "openai"`).
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
        members: &[super::AgentDefinition],
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
            .map_err(|error| format!("cannot reach the model: {error}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|error| format!("reading the model's answer failed: {error}"))?;
        if !status.is_success() {
            return Err(format!(
                "the model endpoint answered {status}: {}",
                excerpt(&text, 200)
            ));
        }
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
