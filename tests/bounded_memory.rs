//! Memory stays bounded whatever a tenant's program or endpoint sends: real `agentd run`
//! replicas get a 2 GiB artifact file and answers that never end a line (openai, webhook);
//! the artifact is refused without being read, each run fails with an error naming the cap
//! long before its timeout, and the replica's peak resident memory stays under 100 MiB.

mod support;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::response::Response;
use axum::routing::post;
use support::{Daemon, TestDb, create_agent, create_user, replica};
use uuid::Uuid;

/// The bound on a replica's peak resident memory (VmHWM).
const MAX_PEAK_RSS_KIB: u64 = 100 * 1024;

/// A run's timeout in these tests: far longer than any of them may take.
const RUN_TIMEOUT: &str = "120s";

/// What a finished run left in the database, and what its replica used.
#[derive(Debug)]
struct Finished {
    run: support::RunRecord,
    elapsed: Duration,
    peak_rss_kib: u64,
    read_bytes: u64,
}

/// One field (in kB or bytes) of a /proc file of `pid`.
fn proc_figure(pid: nix::unistd::Pid, file: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|figure| figure.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/{file}: {text}"))
}

/// Runs one agent run on a fresh `agentd run` replica with `settings`; returns how it ended
/// with the replica's peak RSS and the bytes it read from files and pipes (`rchar`).
async fn run_on_replica(settings: &[(&str, &str)]) -> Finished {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let mut all = vec![("AGENTD__EXECUTION__TIMEOUT", RUN_TIMEOUT)];
    all.extend_from_slice(settings);
    let mut daemon: Daemon = replica(&db.url, "bounded", &all);
    daemon.wait_for("worker started", Duration::from_secs(30));
    let started = Instant::now();
    let run_id: Uuid = support::request_agent_run(&db.pool, agent).await;
    let run = support::finished_run(&db.pool, run_id, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    let peak_rss_kib = proc_figure(daemon.pid(), "status", "VmHWM:");
    let read_bytes = proc_figure(daemon.pid(), "io", "rchar:");
    drop(daemon);
    Finished {
        run,
        elapsed,
        peak_rss_kib,
        read_bytes,
    }
}

/// Serves, on a free loopback port, a POST route at `path` that answers 200 with `content_type`
/// and a body of `x` bytes that never ends (no line end, ever); returns the URL.
async fn endless_server(path: &str, content_type: &'static str) -> String {
    let router = Router::new().route(
        path,
        post(move || async move {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let body =
                futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
            Response::builder()
                .header("content-type", content_type)
                .body(Body::from_stream(body))
                .unwrap()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    format!("http://{address}{path}")
}

fn assert_bounded(run: &Finished) {
    assert!(
        run.peak_rss_kib < MAX_PEAK_RSS_KIB,
        "the replica's peak RSS was {} KiB: {run:?}",
        run.peak_rss_kib
    );
    assert!(run.elapsed < Duration::from_secs(60), "{run:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_2_gib_artifact_is_refused_unread_and_a_small_one_stored() {
    let program = serde_json::to_string(&[
        "sh",
        "-c",
        "truncate -s 2G \"$AGENTD_ARTIFACTS_DIR/big.bin\" && \
         printf 'small' > \"$AGENTD_ARTIFACTS_DIR/small.txt\"",
    ])
    .unwrap();
    let run = run_on_replica(&[
        ("AGENTD__EXECUTION__DEFAULT", "command"),
        ("AGENTD__EXECUTORS__COMMAND__PROGRAM", &program),
    ])
    .await;
    assert_eq!(run.run.status, "completed", "{run:?}");
    let stored: Vec<&str> = run
        .run
        .artifacts
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(stored, ["small.txt"]);
    assert!(
        run.run.stored.contains(r#""size": 5"#),
        "{}",
        run.run.stored
    );
    assert!(
        run.run.logs.iter().any(|(level, message)| level == "warn"
            && message.starts_with(
                "artifact \"big.bin\" not stored: 2147483648 bytes is over the limit"
            )),
        "{:?}",
        run.run.logs
    );
    // The file was not read: all the replica read from files is far less than it.
    assert!(run.read_bytes < 16 << 20, "read {} bytes", run.read_bytes);
    assert_bounded(&run);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_stream_without_a_line_end_fails_the_run_at_the_event_cap() {
    let url = endless_server("/v1/chat/completions", "text/event-stream").await;
    let base_url = url.trim_end_matches("/chat/completions").to_string();
    let run = run_on_replica(&[
        ("AGENTD__EXECUTION__DEFAULT", "openai"),
        ("AGENTD__EXECUTORS__OPENAI__BASE_URL", &base_url),
    ])
    .await;
    assert_eq!(run.run.status, "failed", "{run:?}");
    assert_eq!(
        run.run.error.as_deref(),
        Some(
            "the model sent a stream event over 1048576 bytes, the limit of one event; \
             stopped after 0 characters"
        )
    );
    assert_bounded(&run);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_stream_without_a_line_end_fails_the_run_at_the_line_cap() {
    let url = endless_server("/hook", "application/x-ndjson").await;
    let run = run_on_replica(&[
        ("AGENTD__EXECUTION__DEFAULT", "webhook"),
        ("AGENTD__EXECUTORS__WEBHOOK__URL", &url),
        (
            "AGENTD__EXECUTORS__WEBHOOK__SECRET_ENV",
            "TEST_WEBHOOK_SECRET",
        ),
        ("TEST_WEBHOOK_SECRET", "whsec-test"),
    ])
    .await;
    assert_eq!(run.run.status, "failed", "{run:?}");
    let error = run.run.error.as_deref().unwrap_or_default();
    // artifacts.max_bytes (10 MiB) in base64, plus 64 KiB.
    assert!(
        error.starts_with(
            "the webhook sent an event line over 14046552 bytes, the limit of one event"
        ),
        "{error}"
    );
    assert_bounded(&run);
}
