//! Executing runs with real programs: the command executor (output, exit status, bad
//! output, huge lines and floods, stubborn and forking children, timeout, cancel), the
//! builtin executor, artifacts and their limits, and secrets kept out of agentd's logs.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentd::store::runs::{RunKind, request_run};
use serde_json::Value;
use support::{
    InProcessWorker, TestDb, count, create_agent, create_user, eventually, set_variables,
};
use uuid::Uuid;

/// What a finished run left in the database.
#[derive(Debug)]
struct Finished {
    status: String,
    error: Option<String>,
    output: Option<Value>,
    usage: Value,
    logs: Vec<(String, String)>,
    artifacts: Vec<(String, String, i32, String)>,
}

async fn finished(db: &TestDb, run_id: Uuid, limit: Duration) -> Finished {
    eventually(limit, "the run ends", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE id = '{run_id}' AND status <> 'running'"),
        )
        .await
            == 1
    })
    .await;
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
    let artifacts = sqlx::query_as(
        "SELECT name, type, size, url FROM run_artifacts WHERE run_id = $1 ORDER BY name",
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
        artifacts,
    }
}

/// A shell script written to a temporary folder (run as `sh script`, no shell by agentd).
fn script(folder: &Path, body: &str) -> PathBuf {
    let path = folder.join("agent.sh");
    std::fs::write(&path, body).unwrap();
    path
}

struct World {
    db: TestDb,
    agent: Uuid,
    folder: tempfile::TempDir,
}

async fn world(variables: &[(&str, &str)]) -> World {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    set_variables(&db.pool, agent, variables).await;
    World {
        db,
        agent,
        folder: tempfile::tempdir().unwrap(),
    }
}

impl World {
    /// Runs the agent once with the command executor running `body`, with extra settings.
    async fn run_command(
        &self,
        body: &str,
        settings: &[(&str, &str)],
        limit: Duration,
    ) -> (Uuid, Finished) {
        let path = script(self.folder.path(), body);
        let program = format!(r#"["sh", "{}"]"#, path.display());
        let artifacts = self.folder.path().join("artifacts");
        let artifacts = artifacts.to_string_lossy().to_string();
        let mut all = vec![
            ("AGENTD__EXECUTION__DEFAULT", "command"),
            ("AGENTD__EXECUTORS__COMMAND__PROGRAM", program.as_str()),
            ("AGENTD__ARTIFACTS__DIR", artifacts.as_str()),
        ];
        all.extend_from_slice(settings);
        let worker = InProcessWorker::start_configured(&self.db, "w1", &all).await;
        let run_id = request_run(
            &self.db.pool,
            RunKind::Agent,
            self.agent,
            Some(&serde_json::json!({"topic": "tides"})),
        )
        .await
        .unwrap();
        let result = finished(&self.db, run_id, limit).await;
        worker.stop().await;
        (run_id, result)
    }
}

#[tokio::test]
async fn a_successful_program_streams_logs_sets_output_and_stores_artifacts() {
    let world = world(&[("CITY", "Oslo")]).await;
    let (_, run) = world
        .run_command(
            r#"
input=$(cat)
echo "hello from $CITY"
echo "a warning" >&2
case "$input" in *'"topic":"tides"'*) echo "got the input";; esac
printf '# Report\n' > "$AGENTD_ARTIFACTS_DIR/report.md"
echo '{"output": {"answer": 42}}'
exit 0
"#,
            &[],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(run.status, "completed", "{run:?}");
    assert_eq!(run.output, Some(serde_json::json!({"answer": 42})));
    assert!(
        run.logs
            .contains(&("info".into(), "hello from Oslo".into())),
        "{run:?}"
    );
    assert!(
        run.logs.contains(&("warn".into(), "a warning".into())),
        "{run:?}"
    );
    assert!(
        run.logs.contains(&("info".into(), "got the input".into())),
        "{run:?}"
    );
    let (name, content_type, size, url) = &run.artifacts[0];
    assert_eq!(
        (name.as_str(), content_type.as_str(), *size),
        ("report.md", "text/markdown", 9)
    );
    let path = url.strip_prefix("file://").unwrap();
    assert_eq!(std::fs::read_to_string(path).unwrap(), "# Report\n");
    for figure in [
        "cpu_ms",
        "max_rss_kib",
        "duration_ms",
        "log_lines",
        "log_bytes",
        "artifacts",
        "artifact_bytes",
    ] {
        assert!(
            run.usage.get(figure).is_some(),
            "resource_usage lacks {figure}: {}",
            run.usage
        );
    }
    assert_eq!(run.usage["artifacts"], 1);
    assert_eq!(run.usage["exit_status"], 0);
}

#[tokio::test]
async fn a_failing_program_fails_the_run_with_its_status_and_last_error_line() {
    let world = world(&[]).await;
    let (_, run) = world
        .run_command(
            "echo 'working'\necho 'disk full' >&2\nexit 3\n",
            &[],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some("the program exited with status 3: disk full")
    );
    let (_, run) = world
        .run_command(
            "exit 0\n",
            &[(
                "AGENTD__EXECUTORS__COMMAND__PROGRAM",
                r#"["/nonexistent/program"]"#,
            )],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(run.status, "failed");
    assert!(
        run.error
            .unwrap()
            .starts_with("could not start \"/nonexistent/program\"")
    );
}

#[tokio::test]
async fn bad_output_is_cleaned_truncated_and_capped() {
    let world = world(&[]).await;
    let (_, run) = world
        .run_command(
            r#"
printf 'nul\000byte\n'
printf 'bad \377\376 utf8\n'
head -c 10485760 /dev/zero | tr '\0' 'x'; echo
echo after
"#,
            &[],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(run.status, "completed", "{:?}", run.error);
    assert_eq!(run.logs[0].1, "nulbyte");
    assert_eq!(run.logs[1].1, "bad \u{FFFD}\u{FFFD} utf8");
    assert!(run.logs[2].1.starts_with("xxxx") && run.logs[2].1.ends_with("[line truncated]"));
    assert!(
        run.logs[2].1.len() < 70_000,
        "a 10 MiB line is stored cut: {}",
        run.logs[2].1.len()
    );
    assert_eq!(run.logs[3].1, "after");

    // Two million lines: the first 1000 are stored, one warn line says what was dropped.
    let (_, run) = world
        .run_command(
            "seq 2000000\n",
            &[("AGENTD__RUN_LOGS__MAX_LINES_PER_RUN", "1000")],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(run.status, "completed", "{:?}", run.error);
    assert_eq!(run.logs.len(), 1001);
    let (level, message) = run.logs.last().unwrap();
    assert_eq!(level, "warn");
    assert!(message.contains("1999000 further lines"), "{message}");
    assert_eq!(run.usage["log_lines_dropped"], 1_999_000);
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|cmdline| {
            String::from_utf8_lossy(cmdline)
                .replace('\0', " ")
                .contains(marker)
        })
        .count()
}

#[tokio::test]
async fn a_child_ignoring_sigterm_is_killed_at_the_timeout_with_its_grandchildren() {
    let world = world(&[]).await;
    let started = std::time::Instant::now();
    let (_, run) = world
        .run_command(
            "trap '' TERM\nsleep 313 &\nsleep 313 &\necho started\nwhile true; do sleep 0.1; done\n",
            &[("AGENTD__EXECUTORS__COMMAND__TIMEOUT", "1s"), ("AGENTD__EXECUTORS__COMMAND__KILL_GRACE", "300ms")],
            Duration::from_secs(15),
        )
        .await;
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some("timed out: the run took longer than 1s")
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(processes_with("sleep 313"), 0, "grandchildren survived");
}

#[tokio::test]
async fn grandchildren_do_not_survive_a_finished_run() {
    let world = world(&[]).await;
    let (_, run) = world
        .run_command(
            "sleep 317 &\nsleep 317 &\necho done\nexit 0\n",
            &[],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(run.status, "completed", "{:?}", run.error);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(processes_with("sleep 317"), 0, "grandchildren survived");
}

#[tokio::test]
async fn cancel_stops_the_program() {
    let world = world(&[]).await;
    let path = script(world.folder.path(), "echo started\nsleep 319\n");
    let program = format!(r#"["sh", "{}"]"#, path.display());
    let worker = InProcessWorker::start_configured(
        &world.db,
        "w1",
        &[
            ("AGENTD__EXECUTION__DEFAULT", "command"),
            ("AGENTD__EXECUTORS__COMMAND__PROGRAM", &program),
        ],
    )
    .await;
    let run_id = request_run(&world.db.pool, RunKind::Agent, world.agent, None)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the program started", || async {
        count(
            &world.db.pool,
            &format!("SELECT count(*) FROM run_logs WHERE run_id = '{run_id}'"),
        )
        .await
            == 1
    })
    .await;
    assert!(
        agentd::store::runs::cancel_run(&world.db.pool, run_id)
            .await
            .unwrap()
    );
    let run = finished(&world.db, run_id, Duration::from_secs(5)).await;
    assert_eq!(
        (run.status.as_str(), run.error.as_deref()),
        ("failed", Some("cancelled"))
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(processes_with("sleep 319"), 0);
    worker.stop().await;
}

#[tokio::test]
async fn the_builtin_executor_renders_instructions_and_writes_a_markdown_artifact() {
    let world = world(&[("CITY", "Oslo")]).await;
    sqlx::query(
        "UPDATE agents SET instructions = 'Forecast for {{CITY}} about {{ input }}.' WHERE id = $1",
    )
    .bind(world.agent)
    .execute(&world.db.pool)
    .await
    .unwrap();
    let artifacts = world.folder.path().join("artifacts");
    let worker = InProcessWorker::start_configured(
        &world.db,
        "w1",
        &[("AGENTD__ARTIFACTS__DIR", &artifacts.to_string_lossy())],
    )
    .await;
    let run_id = request_run(
        &world.db.pool,
        RunKind::Agent,
        world.agent,
        Some(&Value::String("tides".into())),
    )
    .await
    .unwrap();
    let run = finished(&world.db, run_id, Duration::from_secs(10)).await;
    worker.stop().await;
    assert_eq!(run.status, "completed");
    assert_eq!(
        run.output.as_ref().unwrap()["text"],
        "Forecast for Oslo about tides."
    );
    assert_eq!(run.logs.first().unwrap().1, "starting Test agent");
    let (name, content_type, size, url) = &run.artifacts[0];
    assert_eq!(
        (name.as_str(), content_type.as_str()),
        ("result.md", "text/markdown")
    );
    let text = std::fs::read_to_string(url.strip_prefix("file://").unwrap()).unwrap();
    assert_eq!(text.len() as i32, *size);
    assert!(
        text.starts_with("# Test agent\n\nForecast for Oslo about tides."),
        "{text}"
    );
}

#[tokio::test]
async fn artifacts_over_the_limits_are_not_stored_and_say_so() {
    let world = world(&[]).await;
    let (_, run) = world
        .run_command(
            "head -c 100 /dev/zero > \"$AGENTD_ARTIFACTS_DIR/small.bin\"\nhead -c 5000 /dev/zero > \"$AGENTD_ARTIFACTS_DIR/large.bin\"\n",
            &[("AGENTD__ARTIFACTS__MAX_BYTES", "1000")],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(run.status, "completed");
    assert_eq!(run.artifacts.len(), 1);
    assert_eq!(run.artifacts[0].0, "small.bin");
    assert_eq!(run.artifacts[0].1, "application/octet-stream");
    assert!(
        run.logs.iter().any(|(level, message)| level == "warn"
            && message
                .starts_with("artifact \"large.bin\" not stored: 5000 bytes is over the limit")),
        "{:?}",
        run.logs
    );
    assert_eq!(run.usage["artifacts_rejected"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_variable_values_never_appear_in_agentds_own_logs() {
    let world = world(&[("API_KEY", "sk-live-7f3a9c2e-very-secret")]).await;
    let path = script(
        world.folder.path(),
        "echo \"using $API_KEY\" >&2\necho \"key=$API_KEY\"\nexit 1\n",
    );
    let program = format!(r#"["sh", "{}"]"#, path.display());
    let mut daemon = support::replica(
        &world.db.url,
        "r1",
        &[
            ("AGENTD__EXECUTION__DEFAULT", "command"),
            ("AGENTD__EXECUTORS__COMMAND__PROGRAM", &program),
            ("AGENTD__LOGGING__LEVEL", "debug"),
        ],
    );
    daemon.wait_for("worker started", Duration::from_secs(20));
    let run_id = request_run(&world.db.pool, RunKind::Agent, world.agent, None)
        .await
        .unwrap();
    let run = finished(&world.db, run_id, Duration::from_secs(10)).await;
    daemon.wait_for("run finished", Duration::from_secs(5));
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
    // The run's own record (which its owner sees) has what the program printed…
    assert_eq!(run.status, "failed");
    assert!(
        run.logs
            .iter()
            .any(|(_, message)| message.contains("sk-live-7f3a9c2e"))
    );
    // …but nothing agentd itself logged does.
    assert!(
        daemon
            .seen
            .iter()
            .any(|line| line.contains("the program exited with status 1"))
    );
    assert!(
        daemon
            .seen
            .iter()
            .all(|line| !line.contains("sk-live-7f3a9c2e")),
        "a secret leaked into agentd's logs"
    );
}

#[tokio::test]
async fn only_regular_files_become_artifacts_and_the_run_budget_is_checked_before_reading() {
    let world = world(&[]).await;
    let (_, run) = world
        .run_command(
            "cd \"$AGENTD_ARTIFACTS_DIR\"\n\
             head -c 1000 /dev/zero > a.bin\n\
             head -c 1000 /dev/zero > b.bin\n\
             printf 'ok' > c.txt\n\
             ln -s /etc/hostname link.txt\n\
             mkfifo pipe\n\
             mkdir folder\n",
            &[("AGENTD__ARTIFACTS__MAX_BYTES_PER_RUN", "1500")],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(run.status, "completed", "{:?}", run.error);
    let stored: Vec<(&str, i32)> = run
        .artifacts
        .iter()
        .map(|(name, _, size, _)| (name.as_str(), *size))
        .collect();
    assert_eq!(stored, vec![("a.bin", 1000), ("c.txt", 2)]);
    // The store's lines and the executor's may interleave either way.
    let mut warnings: Vec<&str> = run
        .logs
        .iter()
        .filter(|(level, _)| level == "warn")
        .map(|(_, message)| message.as_str())
        .collect();
    warnings.sort();
    assert_eq!(
        warnings,
        vec![
            "artifact \"b.bin\" not stored: 1000 bytes is over the limit (10485760 per artifact, \
             1500 per run, 1000 already used)",
            "artifact \"link.txt\" not stored: a symbolic link, which is not followed",
            "artifact \"pipe\" not stored: not a regular file",
        ]
    );
}
