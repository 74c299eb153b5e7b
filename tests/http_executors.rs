//! The `openai` and `webhook` executors against real HTTP servers on 127.0.0.1 (axum),
//! started by each test.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd::store::runs::{RunKind, request_run};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use serde_json::{Value, json};
use support::{InProcessWorker, TestDb, count, create_agent, create_user, eventually};
use uuid::Uuid;

/// Serves `router` on a free loopback port; returns its base URL.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    format!("http://{address}")
}

/// A body that sends `chunks` with a short pause between them, then optionally breaks.
fn streamed(chunks: Vec<String>, break_at_end: bool) -> Body {
    let stream = async_stream(chunks, break_at_end);
    Body::from_stream(stream)
}

fn async_stream(
    chunks: Vec<String>,
    break_at_end: bool,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let mut items: Vec<Result<Bytes, std::io::Error>> =
        chunks.into_iter().map(|c| Ok(Bytes::from(c))).collect();
    if break_at_end {
        items.push(Err(std::io::Error::other("connection cut")));
    }
    futures_util::stream::iter(items).then(|item| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        item
    })
}

use futures_util::StreamExt;

fn sse(data: &[&str]) -> Vec<String> {
    data.iter().map(|d| format!("data: {d}\n\n")).collect()
}

struct Finished {
    status: String,
    error: Option<String>,
    output: Option<Value>,
    usage: Value,
    logs: Vec<(String, String)>,
}

async fn run_once(overrides: &[(&str, &str)], instructions: &str, input: Value) -> Finished {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    sqlx::query("UPDATE agents SET instructions = $2 WHERE id = $1")
        .bind(agent)
        .bind(instructions)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO agent_variables (agent_id, name, description, value) VALUES ($1, 'CITY', 'd', 'Oslo')")
        .bind(agent)
        .execute(&db.pool)
        .await
        .unwrap();
    let artifacts = tempfile::tempdir().unwrap();
    let mut all = overrides.to_vec();
    let artifacts_dir = artifacts.path().to_string_lossy().to_string();
    all.push(("AGENTD__ARTIFACTS__DIR", &artifacts_dir));
    let worker = InProcessWorker::start_configured(&db, "w1", &all).await;
    let run_id: Uuid = request_run(&db.pool, RunKind::Agent, agent, Some(&input))
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "the run ends", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE id = '{run_id}' AND status <> 'running'"),
        )
        .await
            == 1
    })
    .await;
    worker.stop().await;
    let (status, error, output, usage): (String, Option<String>, Option<Value>, Option<Value>) =
        sqlx::query_as("SELECT status, error, output, resource_usage FROM runs WHERE id = $1")
            .bind(run_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let logs = sqlx::query_as(
        "SELECT level, message FROM run_logs WHERE run_id = $1 ORDER BY timestamp, id",
    )
    .bind(run_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    Finished {
        status,
        error,
        output,
        usage: usage.unwrap_or(Value::Null),
        logs,
    }
}

/// A fake OpenAI-compatible server: answers each request with the next behaviour in
/// `script` (the last one repeats), recording the requests.
#[derive(Clone)]
struct FakeModel {
    script: Arc<Vec<(u16, Vec<String>, bool)>>,
    calls: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
}

async fn fake_model(script: Vec<(u16, Vec<String>, bool)>) -> (String, FakeModel) {
    let fake = FakeModel {
        script: Arc::new(script),
        calls: Arc::new(Mutex::new(Vec::new())),
    };
    let state = fake.clone();
    let router = Router::new().route(
        "/v1/chat/completions",
        post(move |headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move {
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let index = {
                    let mut calls = state.calls.lock().unwrap();
                    calls.push((headers, request));
                    calls.len() - 1
                };
                let (status, chunks, cut) = state.script[index.min(state.script.len() - 1)].clone();
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::from_u16(status).unwrap())
                        .header("content-type", "text/event-stream")
                        .body(streamed(chunks, cut))
                        .unwrap(),
                )
            }
        }),
    );
    (serve(router).await, fake)
}

fn openai_settings(base: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AGENTD__EXECUTION__DEFAULT", "openai".to_string()),
        ("AGENTD__EXECUTORS__OPENAI__BASE_URL", format!("{base}/v1")),
        ("AGENTD__EXECUTORS__OPENAI__MODEL", "fake-1".to_string()),
        (
            "AGENTD__EXECUTORS__OPENAI__API_KEY_ENV",
            "TEST_MODEL_KEY".to_string(),
        ),
        ("TEST_MODEL_KEY", "sk-test-key".to_string()),
    ]
}

fn borrowed<'a>(settings: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    settings.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

const GOOD_STREAM: [&str; 5] = [
    r#"{"model":"fake-1","choices":[{"delta":{"content":"Hel"}}]}"#,
    r#"{"choices":[{"delta":{"content":"lo\nWor"}}]}"#,
    r#"{"choices":[{"delta":{"content":"ld"},"finish_reason":"stop"}]}"#,
    r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#,
    "[DONE]",
];

#[tokio::test]
async fn openai_streams_tokens_into_ordered_logs_and_records_usage() {
    let (base, fake) = fake_model(vec![(200, sse(&GOOD_STREAM), false)]).await;
    let settings = openai_settings(&base);
    let run = run_once(
        &borrowed(&settings),
        "You forecast for {{CITY}}.",
        json!("tomorrow"),
    )
    .await;
    assert_eq!(run.status, "completed", "{:?}", run.error);
    assert_eq!(
        run.logs,
        vec![
            ("info".into(), "Hello".into()),
            ("info".into(), "World".into())
        ]
    );
    assert_eq!(
        run.output.unwrap(),
        json!({"text": "Hello\nWorld", "model": "fake-1", "finish_reason": "stop"})
    );
    assert_eq!(run.usage["prompt_tokens"], 12);
    assert_eq!(run.usage["completion_tokens"], 3);
    // Reported figures win: nothing is estimated.
    assert!(run.usage.get("tokens_estimated").is_none(), "{}", run.usage);
    let calls = fake.calls.lock().unwrap();
    let (headers, request) = &calls[0];
    assert_eq!(headers["authorization"], "Bearer sk-test-key");
    assert_eq!(request["stream"], true);
    assert_eq!(request["model"], "fake-1");
    assert_eq!(
        request["messages"][0],
        json!({"role": "system", "content": "You forecast for Oslo."})
    );
    assert_eq!(
        request["messages"][1],
        json!({"role": "user", "content": "tomorrow"})
    );
}

#[tokio::test]
async fn without_reported_usage_tokens_are_estimated_and_marked_so() {
    // GOOD_STREAM without its usage event.
    let events: Vec<&str> = GOOD_STREAM
        .iter()
        .copied()
        .filter(|event| !event.contains("usage"))
        .collect();
    let (base, _) = fake_model(vec![(200, sse(&events), false)]).await;
    let settings = openai_settings(&base);
    let run = run_once(
        &borrowed(&settings),
        "You forecast for {{CITY}}.",
        json!("tomorrow"),
    )
    .await;
    assert_eq!(run.status, "completed", "{:?}", run.error);
    assert_eq!(run.usage["tokens_estimated"], true, "{}", run.usage);
    // "fake-1" is no OpenAI model: counted with o200k_base.
    assert_eq!(run.usage["tokenizer"], "o200k_base");
    let bpe = tiktoken_rs::o200k_base_singleton();
    assert_eq!(
        run.usage["completion_tokens"],
        bpe.count_ordinary("Hello\nWorld")
    );
    let prompt = 3
        + bpe.count_ordinary("system")
        + bpe.count_ordinary("You forecast for Oslo.")
        + 3
        + bpe.count_ordinary("user")
        + bpe.count_ordinary("tomorrow")
        + 3;
    assert_eq!(run.usage["prompt_tokens"], prompt);
    assert_eq!(
        run.usage["total_tokens"],
        prompt + bpe.count_ordinary("Hello\nWorld")
    );
}

#[tokio::test]
async fn openai_retries_429_before_the_first_token() {
    let (base, fake) = fake_model(vec![
        (429, vec!["slow down".into()], false),
        (200, sse(&GOOD_STREAM), false),
    ])
    .await;
    let settings = openai_settings(&base);
    let run = run_once(&borrowed(&settings), "x", json!("y")).await;
    assert_eq!(run.status, "completed", "{:?}", run.error);
    assert_eq!(fake.calls.lock().unwrap().len(), 2);
    assert!(
        run.logs[0]
            .1
            .starts_with("the model endpoint answered 429 Too Many Requests: slow down; retrying"),
        "{:?}",
        run.logs
    );
}

#[tokio::test]
async fn openai_retries_a_stream_that_breaks_off_before_the_first_token() {
    // A 200 whose body breaks before any text, then one that ends without any: both are
    // tried again; the third streams.
    let (base, fake) = fake_model(vec![
        (200, Vec::new(), true),
        (200, Vec::new(), false),
        (200, sse(&GOOD_STREAM), false),
    ])
    .await;
    let settings = openai_settings(&base);
    let run = run_once(&borrowed(&settings), "x", json!("y")).await;
    assert_eq!(run.status, "completed", "{:?}", run.error);
    assert_eq!(fake.calls.lock().unwrap().len(), 3);
    assert_eq!(run.logs.len(), 4, "{:?}", run.logs);
    assert_eq!(run.logs[0].0, "warn");
    assert!(
        run.logs[0]
            .1
            .starts_with("the model's stream was cut after 0 characters: "),
        "{:?}",
        run.logs
    );
    assert!(run.logs[0].1.contains("; retrying in "), "{:?}", run.logs);
    assert!(
        run.logs[1]
            .1
            .starts_with("the model's stream ended early after 0 characters; retrying in "),
        "{:?}",
        run.logs
    );
    assert_eq!(run.output.unwrap()["text"], "Hello\nWorld");
}

#[tokio::test]
async fn openai_stream_cut_midway_fails_and_keeps_the_partial_text() {
    let (base, _) = fake_model(vec![(200, sse(&GOOD_STREAM[..2]), true)]).await;
    let settings = openai_settings(&base);
    let run = run_once(&borrowed(&settings), "x", json!("y")).await;
    assert_eq!(run.status, "failed");
    assert!(
        run.error
            .as_deref()
            .unwrap()
            .starts_with("the model's stream was cut after 9 characters"),
        "{:?}",
        run.error
    );
    assert_eq!(
        run.logs,
        vec![
            ("info".into(), "Hello".into()),
            ("info".into(), "Wor".into())
        ]
    );
    assert_eq!(run.output.unwrap()["text"], "Hello\nWor");
}

#[tokio::test]
async fn openai_malformed_events_fail_with_a_clear_error() {
    let (base, _) = fake_model(vec![(200, sse(&[GOOD_STREAM[0], "{not json"]), false)]).await;
    let settings = openai_settings(&base);
    let run = run_once(&borrowed(&settings), "x", json!("y")).await;
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some("the model sent a malformed stream event: {not json")
    );
    // A fatal 4xx is not retried.
    let (base, fake) = fake_model(vec![(401, vec!["bad key".into()], false)]).await;
    let settings = openai_settings(&base);
    let run = run_once(&borrowed(&settings), "x", json!("y")).await;
    assert_eq!(
        run.error.as_deref(),
        Some("the model endpoint answered 401 Unauthorized: bad key")
    );
    assert_eq!(fake.calls.lock().unwrap().len(), 1);
}

const SECRET: &str = "whsec-test-secret";

/// A webhook receiver that verifies the signature and answers with `events` (or hangs).
async fn fake_runtime(events: Vec<String>, hang: bool) -> (String, Arc<Mutex<Vec<bool>>>) {
    let verified = Arc::new(Mutex::new(Vec::new()));
    let record = verified.clone();
    let router = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: Bytes| {
            let record = record.clone();
            let events = events.clone();
            async move {
                let timestamp: i64 = headers["x-agentd-timestamp"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let expected = agentd::executor::webhook::signature(SECRET, timestamp, &body);
                let valid = headers["x-agentd-signature"] == expected.as_str()
                    && (chrono::Utc::now().timestamp() - timestamp).abs() < 60;
                record.lock().unwrap().push(valid);
                if hang {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                if !valid {
                    return Response::builder()
                        .status(401)
                        .body(Body::from("bad signature"))
                        .unwrap();
                }
                Response::builder()
                    .header("content-type", "application/x-ndjson")
                    .body(streamed(
                        events.iter().map(|e| format!("{e}\n")).collect(),
                        false,
                    ))
                    .unwrap()
            }
        }),
    );
    (format!("{}/hook", serve(router).await), verified)
}

fn webhook_settings(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AGENTD__EXECUTION__DEFAULT", "webhook".to_string()),
        ("AGENTD__EXECUTORS__WEBHOOK__URL", url.to_string()),
        (
            "AGENTD__EXECUTORS__WEBHOOK__SECRET_ENV",
            "TEST_WEBHOOK_SECRET".to_string(),
        ),
        ("TEST_WEBHOOK_SECRET", SECRET.to_string()),
    ]
}

#[tokio::test]
async fn webhook_events_become_logs_artifacts_and_output_with_a_verifiable_signature() {
    let (url, verified) = fake_runtime(
        vec![
            json!({"type": "log", "level": "info", "message": "thinking"}).to_string(),
            "this is not json".to_string(),
            json!({"type": "log", "level": "warn", "message": "careful"}).to_string(),
            json!({"type": "artifact", "name": "notes.txt", "content_type": "text/plain", "data_base64": "aGVsbG8="}).to_string(),
            json!({"type": "output", "output": {"answer": "yes"}}).to_string(),
        ],
        false,
    )
    .await;
    let settings = webhook_settings(&url);
    let run = run_once(&borrowed(&settings), "x", json!({"q": 1})).await;
    assert_eq!(
        verified.lock().unwrap().as_slice(),
        &[true],
        "the receiver could not verify the signature"
    );
    assert_eq!(run.status, "completed", "{:?}", run.error);
    assert_eq!(run.output.unwrap(), json!({"answer": "yes"}));
    assert_eq!(run.logs[0], ("info".into(), "thinking".into()));
    assert_eq!(run.logs[1].0, "warn");
    assert!(
        run.logs[1]
            .1
            .starts_with("webhook sent a malformed event (not a JSON object): this is not json")
    );
    assert_eq!(run.logs[2], ("warn".into(), "careful".into()));
    assert_eq!(run.usage["artifacts"], 1);
    assert_eq!(run.usage["artifact_bytes"], 5);

    let (url, _) = fake_runtime(
        vec![json!({"type": "error", "message": "quota exceeded"}).to_string()],
        false,
    )
    .await;
    let settings = webhook_settings(&url);
    let run = run_once(&borrowed(&settings), "x", json!(null)).await;
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some("the agent runtime reported an error: quota exceeded")
    );
}

#[tokio::test]
async fn a_webhook_that_never_answers_times_out() {
    let (url, _) = fake_runtime(vec![], true).await;
    let mut settings = webhook_settings(&url);
    settings.push(("AGENTD__EXECUTION__TIMEOUT", "1s".to_string()));
    let started = std::time::Instant::now();
    let run = run_once(&borrowed(&settings), "x", json!(null)).await;
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some("timed out: the run took longer than 1s")
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Serves POST `path` answering `status` with a body of `chunk` repeated forever.
async fn endless_answer(path: &str, status: u16, chunk: &'static str) -> String {
    let router = Router::new().route(
        path,
        post(move || async move {
            let body = futures_util::stream::repeat_with(move || {
                Ok::<_, std::io::Error>(Bytes::from_static(chunk.as_bytes()))
            });
            Response::builder()
                .status(status)
                .body(Body::from_stream(body))
                .unwrap()
        }),
    );
    format!("{}{path}", serve(router).await)
}

/// Accepts connections on a free loopback port and never answers (nor reads); returns its
/// base URL.
async fn silent_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    format!("http://{address}")
}

#[tokio::test]
async fn openai_reply_past_max_reply_bytes_fails_and_keeps_the_text_it_had() {
    let event = r#"{"choices":[{"delta":{"content":"abcdefghi\n"}}]}"#;
    let (base, _) = fake_model(vec![(200, sse(&[event; 150]), false)]).await;
    let mut settings = openai_settings(&base);
    settings.push(("AGENTD__EXECUTORS__OPENAI__MAX_REPLY_BYTES", "1005".into()));
    let run = run_once(&borrowed(&settings), "x", json!("y")).await;
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some(
            "the model's reply passed executors.openai.max_reply_bytes (1005 bytes); \
             stopped after 1005 characters"
        )
    );
    let output = run.output.unwrap();
    assert_eq!(output["partial"], true);
    assert_eq!(output["text"].as_str().unwrap().len(), 1005);
    assert_eq!(run.logs.len(), 101, "{:?}", run.logs.last());
    assert_eq!(run.logs[100], ("info".into(), "abcde".into()));
}

#[tokio::test]
async fn endless_error_bodies_are_cut() {
    let url = endless_answer("/v1/chat/completions", 400, "no no no ").await;
    let base = url.trim_end_matches("/chat/completions");
    let settings = openai_settings(base.trim_end_matches("/v1"));
    let run = run_once(&borrowed(&settings), "x", json!("y")).await;
    let expected = format!(
        "the model endpoint answered 400 Bad Request: {}…",
        &"no no no ".repeat(23)[..200]
    );
    assert_eq!(run.error.as_deref(), Some(expected.as_str()));

    let url = endless_answer("/hook", 500, "oops ").await;
    let settings = webhook_settings(&url);
    let run = run_once(&borrowed(&settings), "x", json!(null)).await;
    let expected = format!(
        "webhook answered 500 Internal Server Error: {}…",
        "oops ".repeat(40)
    );
    assert_eq!(run.error.as_deref(), Some(expected.as_str()));
}

#[tokio::test]
async fn a_server_that_never_answers_fails_the_run_after_the_read_timeout() {
    let base = silent_server().await;
    let mut settings = webhook_settings(&format!("{base}/hook"));
    settings.push(("AGENTD__EXECUTORS__HTTP__READ_TIMEOUT", "1s".into()));
    let started = std::time::Instant::now();
    let run = run_once(&borrowed(&settings), "x", json!(null)).await;
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some("webhook request failed: no data within executors.http.read_timeout")
    );
    assert!(started.elapsed() >= Duration::from_secs(1));

    // A model that sends a token and then nothing more.
    let stalled = Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            let first = futures_util::stream::once(async {
                Ok::<_, std::io::Error>(Bytes::from(sse(&[GOOD_STREAM[0]]).concat()))
            });
            let body = first.chain(futures_util::stream::pending());
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(body))
                .unwrap()
        }),
    );
    let base = serve(stalled).await;
    let mut settings = openai_settings(&base);
    settings.push(("AGENTD__EXECUTORS__HTTP__READ_TIMEOUT", "1s".into()));
    let run = run_once(&borrowed(&settings), "x", json!("y")).await;
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some(
            "the model's stream was cut after 3 characters: no data within \
             executors.http.read_timeout"
        )
    );
    assert_eq!(run.output.unwrap()["text"], "Hel");
}

#[tokio::test]
async fn a_webhook_line_may_hold_the_largest_artifact_and_no_more() {
    use base64::Engine as _;
    let max_bytes = 3000;
    let largest = base64::engine::general_purpose::STANDARD.encode(vec![7u8; max_bytes]);
    let (url, _) = fake_runtime(
        vec![
            json!({"type": "artifact", "name": "largest.bin", "data_base64": largest}).to_string(),
            json!({"type": "log", "level": "info", "message": "x".repeat(80_000)}).to_string(),
            json!({"type": "output", "output": "never read"}).to_string(),
        ],
        false,
    )
    .await;
    let mut settings = webhook_settings(&url);
    settings.push(("AGENTD__ARTIFACTS__MAX_BYTES", max_bytes.to_string()));
    let run = run_once(&borrowed(&settings), "x", json!(null)).await;
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some(
            "the webhook sent an event line over 69536 bytes, the limit of one event (an \
             artifact of artifacts.max_bytes in base64 and 65536 bytes more)"
        )
    );
    assert_eq!(run.usage["artifacts"], 1);
    assert_eq!(run.usage["artifact_bytes"], max_bytes);
    assert_eq!(run.output, None);
}
