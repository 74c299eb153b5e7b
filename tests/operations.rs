//! Operations: the health, readiness and metrics endpoints of a real `agentd run`, the JSON
//! log lines of a run, retention, and `agentd status`.

mod support;

use std::time::Duration;

use agentd::artifact_store::ArtifactStore;
use agentd::config::Settings;
use agentd::embedded_pg::EmbeddedPostgres;
use agentd::maintenance::retention::{Deleted, Retention};
use nix::sys::signal::Signal;
use serde_json::Value;
use support::{
    Daemon, InProcessWorker, SleepyExecutor, TestDb, agentd, count, create_agent, create_user,
    eventually, private_server, replica, request_agent_run, server_pool,
};
use uuid::Uuid;

/// An HTTP client for the tests' requests to the endpoints.
fn client() -> reqwest::Client {
    agentd::executor::http::client(agentd::config::HttpClientSettings {
        connect_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(10),
    })
    .unwrap()
}

/// GET `url`: status code and body.
async fn get(url: &str) -> (u16, String) {
    let client = client();
    let response = client
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// GET `url` with an `Authorization` header when given: status code, the
/// `WWW-Authenticate` header, and body.
async fn get_with(url: &str, authorization: Option<&str>) -> (u16, Option<String>, String) {
    let client = client();
    let mut request = client.get(url).timeout(Duration::from_secs(10));
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|value| value.to_str().unwrap().to_string());
    (status, challenge, response.text().await.unwrap())
}

/// The endpoints' base URL, from the daemon's "listening" line.
fn endpoints_of(daemon: &mut Daemon) -> String {
    let line = daemon.wait_for("operations endpoints listening", Duration::from_secs(20));
    format!("http://{}", line["addr"].as_str().unwrap())
}

/// The value of a sample line of the Prometheus text (`name{labels} value`), summed over
/// the lines whose name and labels contain every one of `parts`.
fn sample(metrics: &str, name: &str, parts: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.split([' ', '{']).next() == Some(name)
                && parts.iter().all(|part| line.contains(part))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_status(url: &str, status: u16, what: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (got, body) = get(url).await;
        if got == status {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {url} still answers {got}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_follow_the_database_and_metrics_move_with_runs() {
    let folder = tempfile::tempdir().unwrap();
    let (options, server, url) = private_server(folder.path()).await;
    let pool = server_pool(&server).await;
    let user = create_user(&pool).await;
    let agent = create_agent(&pool, user).await;
    sqlx::query(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) \
         VALUES ($1, true, 'cron', 1, '* * * * * *', 'UTC')",
    )
    .bind(agent)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let mut daemon = replica(
        &url,
        "ops-1",
        &[
            ("AGENTD__DATABASE__MAX_BACKOFF", "500ms"),
            ("AGENTD__SHUTDOWN__GRACE", "10s"),
            // Runs of a few seconds, fired every second: some are in flight when SIGTERM
            // comes, so the process stays (within the grace period) long enough to be seen
            // not ready. Instant runs let it exit within milliseconds, between two looks.
            ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "1s"),
        ],
    );
    let base = endpoints_of(&mut daemon);
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    let ready = wait_status(&format!("{base}/readyz"), 200, "ready once serving").await;
    assert_eq!(
        serde_json::from_str::<Value>(&ready).unwrap()["status"],
        "ready"
    );

    // Metrics are there and move as runs complete.
    let finished = |text: &str| {
        sample(
            text,
            "agentd_runs_finished_total",
            &["type=\"agent\"", "status=\"completed\""],
        )
    };
    let first = wait_status(&format!("{base}/metrics"), 200, "metrics").await;
    assert!(
        first.contains("agentd_worker_info{") && first.contains("worker_id=\"ops-1\""),
        "{first}"
    );
    let mut later = first.clone();
    for _ in 0..100 {
        later = get(&format!("{base}/metrics")).await.1;
        if finished(&later) >= finished(&first) + 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        finished(&later) >= finished(&first) + 2.0,
        "runs finished did not move: {later}"
    );
    for name in [
        "agentd_schedules_fired_total",
        "agentd_runs_started_total",
        "agentd_scheduling_lag_seconds_bucket",
        "agentd_run_duration_seconds_bucket",
        "agentd_log_lines_written_total",
        "agentd_log_bytes_written_total",
        "agentd_artifacts_stored_total",
        "agentd_claim_batch_size_bucket",
    ] {
        assert!(
            sample(&later, name, &[]) > 0.0,
            "{name} not moving: {later}"
        );
    }
    assert!(later.contains("agentd_runs_in_flight"), "{later}");
    assert!(
        later.contains("# HELP agentd_scheduling_lag_seconds"),
        "{later}"
    );

    // The database goes away: not ready (with a reason of ours, not the database's error
    // text), still alive; back: ready.
    server.stop().await;
    let body = wait_status(
        &format!("{base}/readyz"),
        503,
        "not ready without the database",
    )
    .await;
    let expected = serde_json::json!({"status": "not ready", "reason": "database unreachable"});
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), expected);
    // Many requests during the outage: the same answer, and the error logged once.
    for _ in 0..50 {
        let (status, body) = get(&format!("{base}/readyz")).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), expected);
    }
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    let warnings: Vec<Value> = daemon
        .drain()
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|line| line["message"] == "readiness check: not ready")
        .collect();
    assert!(
        !warnings.is_empty() && warnings.len() <= 2,
        "one warn line per change, not per request: {warnings:#?}"
    );
    for warning in &warnings {
        assert_eq!(warning["level"], "warn", "{warning}");
        assert!(
            !warning["error"].as_str().unwrap_or("").is_empty(),
            "the log has the error: {warning}"
        );
    }
    let server = EmbeddedPostgres::start(&options).await.unwrap();
    wait_status(&format!("{base}/readyz"), 200, "ready again").await;
    let metrics = get(&format!("{base}/metrics")).await.1;
    assert!(
        sample(&metrics, "agentd_database_errors_total", &[]) > 0.0,
        "{metrics}"
    );

    // Shutdown: not ready at once, alive until the process ends.
    daemon.signal(Signal::SIGTERM);
    let body = wait_status(&format!("{base}/readyz"), 503, "not ready while stopping").await;
    assert!(body.contains("shutting down"), "{body}");
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runs_json_log_lines_carry_run_id_worker_id_level_message_and_timestamp() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let mut daemon = replica(&db.url, "json-1", &[("AGENTD__HTTP__LISTEN", "")]);
    daemon.wait_for("worker started", Duration::from_secs(20));
    let run_id = request_agent_run(&db.pool, agent).await;
    daemon.wait_for("run finished", Duration::from_secs(20));
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    let run_lines: Vec<Value> = daemon
        .seen
        .iter()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
        })
        .filter(|line| line["run_id"] == run_id.to_string())
        .collect();
    assert!(run_lines.len() >= 3, "{run_lines:#?}");
    for line in &run_lines {
        assert_eq!(line["worker_id"], "json-1", "{line}");
        assert!(
            ["info", "warn", "error", "debug"].contains(&line["level"].as_str().unwrap()),
            "{line}"
        );
        assert!(!line["message"].as_str().unwrap().is_empty(), "{line}");
        let timestamp = line["timestamp"].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(timestamp)
            .unwrap_or_else(|e| panic!("timestamp {timestamp}: {e}"));
    }
    assert!(
        run_lines
            .iter()
            .any(|line| line["message"] == "run started")
    );
}

/// A finished run (`ended_days_ago`), with `logs` log lines and one artifact file.
async fn history(
    db: &TestDb,
    agent: Uuid,
    user: Uuid,
    ended_days_ago: i64,
    logs: i64,
    artifacts: &std::path::Path,
) -> (Uuid, std::path::PathBuf) {
    let run: Uuid = sqlx::query_scalar(
        "INSERT INTO runs (type, target_id, status, start_time, end_time, triggered_by_id, created_at) \
         VALUES ('agent', $1, 'completed', now() - make_interval(days => $2::int) - interval '1 minute', \
                 now() - make_interval(days => $2::int), $3, now() - make_interval(days => $2::int)) RETURNING id",
    )
    .bind(agent)
    .bind(ended_days_ago as i32)
    .bind(user)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO run_logs (run_id, message, timestamp) \
         SELECT $1, 'line ' || g, now() - make_interval(days => $2::int) FROM generate_series(1, $3) g",
    )
    .bind(run)
    .bind(ended_days_ago as i32)
    .bind(logs)
    .execute(&db.pool)
    .await
    .unwrap();
    let folder = artifacts.join(run.to_string());
    std::fs::create_dir_all(&folder).unwrap();
    let file = folder.join("result.md");
    std::fs::write(&file, "# result").unwrap();
    sqlx::query(
        "INSERT INTO run_artifacts (run_id, name, type, size, url, created_at) \
         VALUES ($1, 'result.md', 'text/markdown', 8, $2, now() - make_interval(days => $3::int))",
    )
    .bind(run)
    .bind(format!("file://{}", file.display()))
    .bind(ended_days_ago as i32)
    .execute(&db.pool)
    .await
    .unwrap();
    (run, file)
}

fn retention(db: &TestDb, worker_id: &str, settings: &[(&str, &str)], dir: &str) -> Retention {
    let mut env: std::collections::HashMap<String, String> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.insert("AGENTD__ARTIFACTS__DIR".into(), dir.into());
    let settings = Settings::load(None, &env).unwrap();
    Retention {
        pool: db.pool.clone(),
        worker_id: worker_id.into(),
        artifacts: ArtifactStore::from_settings(&settings.artifacts, Duration::from_secs(1)),
        settings: settings.retention,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_only_older_history_in_batches_from_one_replica() {
    let db = TestDb::migrated().await;
    let folder = tempfile::tempdir().unwrap();
    let artifacts = folder.path().canonicalize().unwrap();
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let mut old = Vec::new();
    for _ in 0..3 {
        old.push(history(&db, agent, user, 40, 10, &artifacts).await);
    }
    let recent = history(&db, agent, user, 1, 10, &artifacts).await;
    // A run still running since long ago is never deleted, nor are its lines of today.
    let running: Uuid = sqlx::query_scalar(
        "INSERT INTO runs (type, target_id, status, start_time, triggered_by_id) \
         VALUES ('agent', $1, 'running', now() - interval '50 days', $2) RETURNING id",
    )
    .bind(agent)
    .bind(user)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO run_logs (run_id, message) VALUES ($1, 'still going')")
        .bind(running)
        .execute(&db.pool)
        .await
        .unwrap();

    let settings = [
        ("AGENTD__RETENTION__RUN_LOGS", "30d"),
        ("AGENTD__RETENTION__ARTIFACTS", "30d"),
        ("AGENTD__RETENTION__RUNS", "30d"),
        ("AGENTD__RETENTION__BATCH_SIZE", "4"),
    ];
    let dir = artifacts.to_str().unwrap();
    let one = retention(&db, "r1", &settings, dir);
    let two = retention(&db, "r2", &settings, dir);
    let stop = tokio_util::sync::CancellationToken::new();
    let (a, b) = tokio::join!(one.pass(&stop), two.pass(&stop));
    let passes: Vec<Deleted> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert_eq!(passes.len(), 1, "exactly one replica does the pass");
    let deleted = passes[0];
    assert_eq!(deleted.run_logs, 30);
    assert_eq!(deleted.artifacts, 3);
    assert_eq!(deleted.runs, 3);
    assert_eq!(deleted.files_not_removed, 0);
    // 30 old lines in 8 statements of at most 4, the 3 artifacts in one, the (no longer
    // any) lines of the old runs in one, the 3 runs in one.
    assert_eq!(deleted.batches, 8 + 1 + 1 + 1, "{deleted:?}");

    for (run, file) in &old {
        assert!(!file.exists(), "{} still there", file.display());
        assert_eq!(
            count(
                &db.pool,
                &format!("SELECT count(*) FROM runs WHERE id = '{run}'")
            )
            .await,
            0
        );
    }
    assert!(recent.1.exists());
    assert_eq!(
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM run_logs WHERE run_id = '{}'",
                recent.0
            )
        )
        .await,
        10
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM run_artifacts").await,
        1
    );
    assert_eq!(
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM runs WHERE id IN ('{}', '{running}')",
                recent.0
            )
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM run_logs WHERE run_id = '{running}'")
        )
        .await,
        1
    );

    // Done for this interval, whichever replica asks.
    let (a, b) = tokio::join!(one.pass(&stop), two.pass(&stop));
    assert!(a.unwrap().is_none() && b.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn each_retention_age_applies_to_its_own_kind_only() {
    let db = TestDb::migrated().await;
    let folder = tempfile::tempdir().unwrap();
    let artifacts = folder.path().canonicalize().unwrap();
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let (run, file) = history(&db, agent, user, 40, 5, &artifacts).await;
    let dir = artifacts.to_str().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();

    // Logs only: the run and its artifact stay.
    let logs_only = retention(&db, "r1", &[("AGENTD__RETENTION__RUN_LOGS", "30d")], dir);
    let deleted = logs_only.pass(&stop).await.unwrap().unwrap();
    assert_eq!(
        (deleted.run_logs, deleted.artifacts, deleted.runs),
        (5, 0, 0)
    );
    assert!(file.exists());

    // Artifacts only (a fresh interval: the task's record is per database).
    sqlx::query("UPDATE agentd.maintenance SET last_finished_at = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    let artifacts_only = retention(&db, "r1", &[("AGENTD__RETENTION__ARTIFACTS", "30d")], dir);
    let deleted = artifacts_only.pass(&stop).await.unwrap().unwrap();
    assert_eq!(
        (deleted.run_logs, deleted.artifacts, deleted.runs),
        (0, 1, 0)
    );
    assert!(!file.exists());
    assert_eq!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE id = '{run}'")
        )
        .await,
        1
    );

    // A longer age keeps what is younger than it.
    sqlx::query("UPDATE agentd.maintenance SET last_finished_at = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    let runs_60d = retention(&db, "r1", &[("AGENTD__RETENTION__RUNS", "60d")], dir);
    let deleted = runs_60d.pass(&stop).await.unwrap().unwrap();
    assert_eq!(deleted.runs, 0);

    // An artifact URL outside artifacts.dir is not agentd's to delete; its row goes, the
    // file stays, and the pass says so.
    let outside = tempfile::tempdir().unwrap();
    let stray = outside.path().join("keep.txt");
    std::fs::write(&stray, "x").unwrap();
    sqlx::query(
        "INSERT INTO run_artifacts (run_id, name, type, size, url, created_at) \
         VALUES ($1, 'keep.txt', 'text/plain', 1, $2, now() - interval '40 days')",
    )
    .bind(run)
    .bind(format!("file://{}", stray.display()))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE agentd.maintenance SET last_finished_at = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    let deleted = artifacts_only.pass(&stop).await.unwrap().unwrap();
    assert_eq!((deleted.artifacts, deleted.files_not_removed), (1, 1));
    assert!(stray.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_with_retention_log_one_pass_with_counts() {
    let db = TestDb::migrated().await;
    let folder = tempfile::tempdir().unwrap();
    let artifacts = folder.path().canonicalize().unwrap();
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    history(&db, agent, user, 40, 3, &artifacts).await;
    let settings = [
        ("AGENTD__RETENTION__RUNS", "30d"),
        ("AGENTD__ARTIFACTS__DIR", artifacts.to_str().unwrap()),
        ("AGENTD__HTTP__LISTEN", ""),
    ];
    let mut replicas = [
        replica(&db.url, "keep-1", &settings),
        replica(&db.url, "keep-2", &settings),
    ];
    eventually(
        Duration::from_secs(20),
        "the old run is deleted",
        || async { count(&db.pool, "SELECT count(*) FROM runs").await == 0 },
    )
    .await;
    // Both replicas had their chance (first attempts are spread over 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut finished = Vec::new();
    for daemon in replicas.iter_mut() {
        daemon.signal(Signal::SIGTERM);
        assert!(daemon.wait_exit(Duration::from_secs(30)).success());
        for line in &daemon.seen {
            let line: Value = serde_json::from_str(line).unwrap();
            if line["message"] == "retention pass finished" {
                finished.push(line);
            }
        }
    }
    assert_eq!(finished.len(), 1, "{finished:#?}");
    assert_eq!(finished[0]["runs"], 1);
    assert_eq!(finished[0]["run_logs"], 3);
    assert_eq!(finished[0]["artifacts"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_workers_runs_in_flight_backlog_invalid_schedules_and_the_last_hour() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let sleepy = || {
        std::sync::Arc::new(SleepyExecutor {
            delay: Duration::from_secs(60),
        })
    };
    let one_at_a_time = [
        ("AGENTD__WORKER__CONCURRENCY", "1"),
        ("AGENTD__SHUTDOWN__GRACE", "100ms"),
    ];
    let workers = vec![
        InProcessWorker::start(&db, "status-a", &one_at_a_time, sleepy()).await,
        InProcessWorker::start(&db, "status-b", &one_at_a_time, sleepy()).await,
    ];
    // An invalid schedule, reported by a worker (a failed run of the last hour).
    sqlx::query(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) \
         VALUES ($1, true, 'daily', 1, '09:00', 'Mars/Olympus')",
    )
    .bind(agent)
    .execute(&db.pool)
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the invalid schedule reported",
        || async {
            count(
                &db.pool,
                "SELECT count(*) FROM runs WHERE status = 'failed'",
            )
            .await
                == 1
        },
    )
    .await;
    // A run completed in the last hour.
    sqlx::query(
        "INSERT INTO runs (type, target_id, status, start_time, end_time, triggered_by_id) \
         VALUES ('agent', $1, 'completed', now() - interval '10 minutes', now() - interval '9 minutes', $2)",
    )
    .bind(agent)
    .bind(user)
    .execute(&db.pool)
    .await
    .unwrap();
    // One long run on each worker; then both are full, so a third request waits and a due
    // schedule stays due.
    for _ in 0..2 {
        request_agent_run(&db.pool, agent).await;
    }
    eventually(Duration::from_secs(10), "both runs in flight", || async {
        count(&db.pool, "SELECT count(*) FROM agentd.leases").await == 2
    })
    .await;
    request_agent_run(&db.pool, agent).await;
    sqlx::query(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone, next_run) \
         VALUES ($1, true, 'daily', 1, '09:00', 'UTC', now() - interval '90 seconds')",
    )
    .bind(agent)
    .execute(&db.pool)
    .await
    .unwrap();

    let output = agentd()
        .args(["status", "--format", "json"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: Value = serde_json::from_slice(&output.stdout).unwrap();
    let workers_seen = status["workers"].as_array().unwrap();
    assert_eq!(workers_seen.len(), 2, "{status:#}");
    for worker in workers_seen {
        assert!(["status-a", "status-b"].contains(&worker["id"].as_str().unwrap()));
        assert_eq!(worker["runs_in_flight"], 1, "{worker}");
        assert_eq!(worker["stale"], false, "{worker}");
        assert_eq!(worker["version"], env!("CARGO_PKG_VERSION"));
    }
    let in_flight = status["runs_in_flight_by_worker"].as_array().unwrap();
    assert_eq!(in_flight.len(), 2, "{status:#}");
    assert!(
        in_flight
            .iter()
            .all(|row| row["runs"] == 1 && row["registered"] == true)
    );
    assert_eq!(status["schedules"]["due_now"], 1, "{status:#}");
    assert!(status["schedules"]["backlog_seconds"].as_f64().unwrap() >= 89.0);
    assert_eq!(status["schedules"]["invalid"], 1, "{status:#}");
    assert_eq!(
        status["invalid_schedules"][0]["error"],
        "invalid schedule: timezone: unknown time zone \"Mars/Olympus\"",
        "{status:#}"
    );
    assert_eq!(status["requests"]["waiting"], 1, "{status:#}");
    assert_eq!(status["runs"]["running"], 2, "{status:#}");
    assert_eq!(status["runs"]["last_hour"]["completed"], 1, "{status:#}");
    assert_eq!(status["runs"]["last_hour"]["failed"], 1, "{status:#}");

    let table = agentd()
        .arg("status")
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("Workers: 2"), "{table}");
    assert!(
        table.contains("status-a") && table.contains("status-b"),
        "{table}"
    );
    assert!(table.contains("due now: 1 (oldest next_run"), "{table}");
    assert!(table.contains("requested runs waiting: 1"), "{table}");
    assert!(
        table.contains("unknown time zone \"Mars/Olympus\""),
        "{table}"
    );
    assert!(
        table.contains("last hour: 1 completed, 1 failed"),
        "{table}"
    );

    for worker in workers {
        worker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_counts_as_waiting_only_the_schedules_a_worker_will_plan() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let worker = InProcessWorker::start_configured(&db, "status-plan", &[]).await;
    // An invalid schedule, and a `once` whose slot has passed: it fires, and is used up.
    sqlx::query(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) \
         VALUES ($1, true, 'daily', 1, '09:00', 'Mars/Olympus')",
    )
    .bind(agent)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, timezone, next_run) \
         VALUES ($1, true, 'once', 1, 'UTC', date_trunc('second', now()) - interval '1 second')",
    )
    .bind(agent)
    .execute(&db.pool)
    .await
    .unwrap();
    eventually(
        Duration::from_secs(20),
        "the invalid schedule reported and the once fired and used up",
        || async {
            count(
                &db.pool,
                "SELECT count(*) FROM agentd.schedule_states WHERE state = 'invalid'",
            )
            .await
                == 1
                && count(
                    &db.pool,
                    "SELECT count(*) FROM agentd.schedule_states WHERE state = 'exhausted'",
                )
                .await
                    == 1
                && count(
                    &db.pool,
                    // The invalid one's report and the once's run.
                    "SELECT count(*) FROM runs WHERE input->>'trigger' = 'schedule'",
                )
                .await
                    == 2
        },
    )
    .await;
    worker.stop().await;
    // A new schedule, with no worker running to plan it.
    sqlx::query(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) \
         VALUES ($1, true, 'daily', 1, '09:00', 'UTC')",
    )
    .bind(agent)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM agent_schedules WHERE enabled AND next_run IS NULL"
        )
        .await,
        3
    );

    let status = status_json(&db, &[]);
    let schedules = &status["schedules"];
    assert_eq!(schedules["unplanned"], 1, "{schedules:#}");
    assert_eq!(schedules["invalid"], 1, "{schedules:#}");
    assert_eq!(schedules["used_up"], 1, "{schedules:#}");
    assert_eq!(schedules["due_now"], 0, "{schedules:#}");
    let table = agentd()
        .arg("status")
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains("waiting for their first next_run: 1\n"),
        "{table}"
    );
    assert!(
        table.contains("used up (a once that has come): 1\n"),
        "{table}"
    );
    assert!(table.contains("invalid: 1\n"), "{table}");
}

/// `agentd status` with the budget settings of a fleet of 10 in 60 connections
/// (docs/operations.md): its JSON document.
fn status_json(db: &TestDb, settings: &[(&str, &str)]) -> Value {
    let mut command = agentd();
    command
        .args(["status", "--format", "json"])
        .env("DATABASE_URL", &db.url);
    for (name, value) in settings {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_names_the_connection_budget_and_what_a_replica_holds() {
    let db = TestDb::migrated().await;
    let small_pool = [("AGENTD__DATABASE__MAX_CONNECTIONS", "4")];
    // A replica with its endpoints on (pool, listener, readiness check).
    let mut worker = replica(&db.url, "budget", &small_pool);
    worker.wait_for("worker started", Duration::from_secs(30));
    let (max_connections, reserved): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT setting::bigint FROM pg_settings WHERE name = 'max_connections'), \
                (SELECT coalesce(sum(setting::bigint), 0)::bigint FROM pg_settings \
                  WHERE name IN ('superuser_reserved_connections', 'reserved_connections'))",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();

    // (4 + 1 + 1) per replica: 10 replicas in 60 connections.
    let mut status = status_json(&db, &small_pool);
    let connections = &status["connections"];
    assert_eq!(connections["pool"], 4, "{connections:#}");
    assert_eq!(connections["listener"], 1, "{connections:#}");
    assert_eq!(connections["readiness_check"], 1, "{connections:#}");
    assert_eq!(connections["per_replica_max"], 6, "{connections:#}");
    assert_eq!(connections["server_max_connections"], max_connections);
    assert_eq!(connections["reserved"], reserved);
    assert_eq!(connections["available"], max_connections - reserved);
    assert_eq!(
        connections["replicas_fit"],
        (max_connections - reserved) / 6,
        "{connections:#}"
    );
    // What the replica holds: its listener, its readiness check and some of its pool,
    // never more than its budget.
    // (A previous `agentd status`'s connection may linger a moment after its exit.)
    for _ in 0..50 {
        let by = &status["connections"]["by_agentd_application"];
        if by["agentd listener"] == 1
            && by["agentd readiness"] == 1
            && by["agentd"].as_i64().is_some_and(|pool| pool <= 4)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        status = status_json(&db, &small_pool);
    }
    let connections = &status["connections"];
    let by = &connections["by_agentd_application"];
    assert_eq!(by["agentd listener"], 1, "{connections:#}");
    assert_eq!(by["agentd readiness"], 1, "{connections:#}");
    let pool = by["agentd"].as_i64().unwrap();
    assert!((1..=4).contains(&pool), "{connections:#}");
    assert_eq!(connections["by_agentd"], pool + 2, "{connections:#}");
    assert!(connections["in_use"].as_i64().unwrap() >= pool + 2);

    // Polling and no endpoints: the pool alone.
    let table = agentd()
        .arg("status")
        .env("DATABASE_URL", &db.url)
        .env("AGENTD__DATABASE__MAX_CONNECTIONS", "4")
        .env("AGENTD__DATABASE__NOTIFY", "poll")
        .env("AGENTD__HTTP__LISTEN", "")
        .output()
        .unwrap();
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains("per replica at most: 4 (pool 4 + listener 0 + readiness check 0)"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "server allows: {} (max_connections {max_connections} - {reserved} reserved)",
            max_connections - reserved
        )),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "replicas that fit: {} ",
            (max_connections - reserved) / 4
        )),
        "{table}"
    );
    assert!(table.contains("agentd listener 1"), "{table}");

    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_leaves_agentd_workers_and_status_within_the_documented_bound() {
    let db = TestDb::migrated().await;
    // Stale after max(lease.ttl, poll_interval) + lease.ttl = 4s; deleted once not seen for
    // twice that, 8s, by the survivor's next heartbeat (within a poll_interval more).
    let short = [
        ("AGENTD__LEASE__TTL", "2s"),
        ("AGENTD__SCHEDULER__POLL_INTERVAL", "1s"),
        ("AGENTD__HTTP__LISTEN", ""),
    ];
    let bound = Duration::from_secs(8 + 1);
    let mut survivor = replica(&db.url, "survivor", &short);
    let mut doomed = replica(&db.url, "doomed", &short);
    survivor.wait_for("worker started", Duration::from_secs(30));
    doomed.wait_for("worker started", Duration::from_secs(30));
    let registered = |id: &'static str| {
        let pool = db.pool.clone();
        async move {
            count(
                &pool,
                &format!("SELECT count(*) FROM agentd.workers WHERE id = '{id}'"),
            )
            .await
        }
    };
    assert_eq!(registered("doomed").await, 1);

    doomed.signal(Signal::SIGKILL);
    doomed.wait_exit(Duration::from_secs(10));
    let killed_at = std::time::Instant::now();
    // Within the bound, it is still listed, as stale.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = status_json(&db, &short);
    let listed: Vec<&Value> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|worker| worker["id"] == "doomed")
        .collect();
    assert_eq!(listed.len(), 1, "{status:#}");
    assert_eq!(listed[0]["stale"], true, "{status:#}");
    // Then gone, from the table and from status, while the survivor stays.
    eventually(
        bound + Duration::from_secs(3) - killed_at.elapsed(),
        "the killed replica's row deleted",
        || async { registered("doomed").await == 0 },
    )
    .await;
    let status = status_json(&db, &short);
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{status:#}");
    assert_eq!(workers[0]["id"], "survivor", "{status:#}");
    assert_eq!(workers[0]["stale"], false, "{status:#}");
    // The survivor says whom it removed.
    let line = survivor.wait_for(
        "worker not seen for too long: removed from agentd.workers",
        Duration::from_secs(5),
    );
    assert_eq!(line["forgotten_worker_id"], "doomed", "{line}");
    // A replica removed while alive (cut off for that long) registers again.
    sqlx::query("DELETE FROM agentd.workers WHERE id = 'survivor'")
        .execute(&db.pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "the survivor registered again",
        || async { registered("survivor").await == 1 },
    )
    .await;

    survivor.signal(Signal::SIGTERM);
    assert!(survivor.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_replica_exports_every_documented_metric_at_zero() {
    let db = TestDb::migrated().await;
    let mut daemon = replica(&db.url, "fresh", &[("AGENTD__HTTP__LISTEN", "127.0.0.1:0")]);
    let base = endpoints_of(&mut daemon);
    daemon.wait_for("worker started", Duration::from_secs(30));
    let metrics = wait_status(&format!("{base}/metrics"), 200, "metrics").await;
    // Each sample line as (name, labels, value).
    let samples: Vec<(&str, &str, f64)> = metrics
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            (name, labels, value.parse::<f64>().unwrap())
        })
        .collect();
    for (name, _) in agentd::measure::CATALOG {
        let histogram = name.ends_with("_seconds") || *name == agentd::measure::CLAIM_BATCH;
        let sampled = if histogram {
            format!("{name}_count")
        } else {
            name.to_string()
        };
        let series: Vec<&(&str, &str, f64)> =
            samples.iter().filter(|(n, _, _)| *n == sampled).collect();
        assert!(!series.is_empty(), "{sampled} missing:\n{metrics}");
        let expected = if *name == agentd::measure::WORKER_INFO {
            1.0
        } else {
            0.0
        };
        for (_, labels, value) in series {
            assert_eq!(*value, expected, "{sampled}{{{labels}}}");
        }
    }
    // Labelled ones with each documented value, the drop counter's reasons among them.
    for (name, label) in [
        ("agentd_log_lines_dropped_total", "reason=\"limit\""),
        ("agentd_log_lines_dropped_total", "reason=\"outage\""),
        ("agentd_log_lines_dropped_total", "reason=\"lease_lost\""),
        ("agentd_log_lines_dropped_total", "reason=\"refused\""),
        ("agentd_schedules_skipped_total", "reason=\"misfire\""),
        ("agentd_runs_started_total", "trigger=\"message\""),
        ("agentd_runs_finished_total", "status=\"failed\""),
        ("agentd_run_duration_seconds_count", "status=\"completed\""),
        (
            "agentd_database_errors_total",
            "operation=\"end_orphaned_turns\"",
        ),
        (
            "agentd_database_rebuilds_total",
            "reason=\"connection_lost\"",
        ),
        ("agentd_worker_loop_restarts_total", "loop=\"lease keeper\""),
        (
            "agentd_worker_loop_restarts_total",
            "loop=\"readiness check\"",
        ),
        ("agentd_retention_deleted_total", "kind=\"run_logs\""),
        ("agentd_turns_finished_total", "status=\"interrupted\""),
    ] {
        assert!(
            samples
                .iter()
                .any(|(n, labels, value)| *n == name && labels.contains(label) && *value == 0.0),
            "{name}{{{label}}} missing:\n{metrics}"
        );
    }
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_dropped_by_the_server_and_opened_again_count_as_reconnects() {
    let db = TestDb::migrated().await;
    let mut daemon = replica(
        &db.url,
        "reconnects",
        &[
            ("AGENTD__HTTP__LISTEN", "127.0.0.1:0"),
            // The pool is used every second, so a dropped connection is soon found dead.
            ("AGENTD__SCHEDULER__POLL_INTERVAL", "1s"),
        ],
    );
    let base = endpoints_of(&mut daemon);
    daemon.wait_for("worker started", Duration::from_secs(30));
    let connections = |application: &'static str| {
        let pool = db.pool.clone();
        async move {
            count(
                &pool,
                &format!(
                    "SELECT count(*) FROM pg_stat_activity \
                      WHERE datname = current_database() AND application_name = '{application}'"
                ),
            )
            .await
        }
    };
    eventually(
        Duration::from_secs(20),
        "the pool and the listener connected",
        || async { connections("agentd").await >= 1 && connections("agentd listener").await == 1 },
    )
    .await;
    let reconnects = || async {
        let metrics = wait_status(&format!("{base}/metrics"), 200, "metrics").await;
        sample(&metrics, "agentd_database_reconnects_total", &[])
    };
    assert_eq!(reconnects().await, 0.0);

    // The server drops the pool's connections; the next statements open new ones at once.
    let terminate = |application: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                  WHERE datname = current_database() AND application_name = $1",
            )
            .bind(application)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    let counted_above = |floor: f64, what: &'static str| {
        let reconnects = &reconnects;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let counted = reconnects().await;
                if counted > floor {
                    return counted;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: agentd_database_reconnects_total still {counted}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    terminate("agentd").await;
    let after_pool = counted_above(0.0, "pool connections replaced").await;
    // Then the listener's: it listens again on a new connection.
    terminate("agentd listener").await;
    eventually(
        Duration::from_secs(20),
        "the listener connected again",
        || async { connections("agentd listener").await == 1 },
    )
    .await;
    counted_above(after_pool, "the listener reconnected").await;

    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
}

/// Sends `concurrency` GET requests to `url` at once, and again as each one is answered,
/// until `stop` fires or each sender has sent `rounds`; returns how many answers had each
/// status (0: no answer).
async fn flood(
    url: &str,
    concurrency: usize,
    rounds: usize,
    stop: &tokio_util::sync::CancellationToken,
) -> std::collections::BTreeMap<u16, usize> {
    let client = client();
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(concurrency));
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, start, stop) =
            (client.clone(), url.to_string(), start.clone(), stop.clone());
        senders.spawn(async move {
            let mut seen = Vec::new();
            start.wait().await;
            for _ in 0..rounds {
                if stop.is_cancelled() {
                    break;
                }
                let answer = client
                    .get(&url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let status = match answer {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.bytes().await;
                        status
                    }
                    Err(_) => 0,
                };
                seen.push(status);
            }
            seen
        });
    }
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(seen) = senders.join_next().await {
        for status in seen.unwrap() {
            *statuses.entry(status).or_insert(0) += 1;
        }
    }
    statuses
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_readyz_requests_do_not_delay_lease_renewals() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    // The database notes the time of every lease write (taken or renewed), so the test sees
    // each renewal however busy it is itself.
    support::execute_script(
        &db.pool,
        "CREATE TABLE lease_writes (run_id uuid, at timestamptz);
         CREATE FUNCTION note_lease_write() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO lease_writes VALUES (NEW.run_id, clock_timestamp());
           RETURN NEW;
         END $$;
         CREATE TRIGGER note_lease_write AFTER INSERT OR UPDATE OF expires_at ON agentd.leases
           FOR EACH ROW EXECUTE FUNCTION note_lease_write();",
    )
    .await;
    let mut daemon = replica(
        &db.url,
        "flooded-1",
        &[
            // Renewed every second.
            ("AGENTD__LEASE__TTL", "3s"),
            // The smallest pool that works (the listener holds one connection): the first
            // thing requests that queried through it would exhaust.
            ("AGENTD__DATABASE__MAX_CONNECTIONS", "2"),
            // Two pauses: a run of about 10 s, more than three leases long.
            ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "5s"),
        ],
    );
    let base = endpoints_of(&mut daemon);
    wait_status(&format!("{base}/readyz"), 200, "ready before the flood").await;
    let run = request_agent_run(&db.pool, agent).await;
    let has_lease = || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM agentd.leases WHERE run_id = '{run}'"),
        )
        .await
            == 1
    };
    eventually(
        Duration::from_secs(10),
        "the run holds its lease",
        has_lease,
    )
    .await;

    // The flood lasts as long as the run, with at most 100 requests per sender.
    let stop = tokio_util::sync::CancellationToken::new();
    let until_done = {
        let (pool, stop) = (db.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(40);
            while std::time::Instant::now() < deadline
                && count(
                    &pool,
                    &format!("SELECT count(*) FROM runs WHERE id = '{run}' AND status = 'running'"),
                )
                .await
                    == 1
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            stop.cancel();
        })
    };
    let statuses = tokio::time::timeout(
        Duration::from_secs(60),
        flood(&format!("{base}/readyz"), 1000, 100, &stop),
    )
    .await
    .expect("the flood ends within a minute");
    until_done.await.unwrap();

    let state: (String, Option<String>) =
        sqlx::query_as("SELECT status, error FROM runs WHERE id = $1")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(state, ("completed".to_string(), None), "{statuses:?}");
    let answered: usize = statuses.values().sum();
    assert!(answered >= 1000, "{statuses:?}");
    assert_eq!(
        statuses.get(&200),
        Some(&answered),
        "every answer ready: {statuses:?}"
    );
    // The lease keeper renews every ttl / 3 (1 s); a renewal that waited for the pool
    // behind the requests would come late.
    let gaps: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM at - lag(at) OVER (ORDER BY at))::float8 \
           FROM lease_writes WHERE run_id = $1 ORDER BY at OFFSET 1",
    )
    .bind(run)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(gaps.len() >= 7, "renewals {gaps:?}");
    assert!(
        gaps.iter().all(|gap| *gap < 1.25),
        "renewals came late: {gaps:?} ({statuses:?})"
    );
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    let lost: Vec<&String> = daemon
        .seen
        .iter()
        .filter(|line| line.contains("lease lost") || line.contains("worker lost"))
        .collect();
    assert!(lost.is_empty(), "{lost:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bearer_token_guards_readyz_and_metrics_and_healthz_stays_open() {
    let db = TestDb::migrated().await;
    let token = Uuid::new_v4().simple().to_string();
    let mut daemon = replica(
        &db.url,
        "guarded-1",
        &[
            ("AGENTD__HTTP__TOKEN_ENV", "OPS_BEARER_TOKEN"),
            ("OPS_BEARER_TOKEN", &token),
        ],
    );
    let base = endpoints_of(&mut daemon);
    let bearer = format!("Bearer {token}");
    daemon.wait_for("worker started", Duration::from_secs(20));
    eventually(Duration::from_secs(20), "ready with the token", || async {
        get_with(&format!("{base}/readyz"), Some(&bearer)).await.0 == 200
    })
    .await;

    assert_eq!(get_with(&format!("{base}/healthz"), None).await.0, 200);
    let refused = (
        401,
        Some("Bearer".to_string()),
        r#"{"status":"unauthorized"}"#.to_string(),
    );
    for path in ["/readyz", "/metrics"] {
        let url = format!("{base}{path}");
        let wrong = format!("Bearer {token}x");
        let basic = format!("Basic {token}");
        for authorization in [
            None,
            Some(wrong.as_str()),
            Some(basic.as_str()),
            Some("Bearer"),
        ] {
            assert_eq!(
                get_with(&url, authorization).await,
                refused,
                "{path} with {authorization:?}"
            );
        }
        let lower = format!("bearer {token}");
        for authorization in [&bearer, &lower] {
            let (status, _, body) = get_with(&url, Some(authorization)).await;
            assert_eq!(status, 200, "{path}: {body}");
        }
    }
    let metrics = get_with(&format!("{base}/metrics"), Some(&bearer)).await.2;
    assert!(metrics.contains("agentd_worker_info{"), "{metrics}");

    // `agentd healthcheck` sends the configured token.
    let healthcheck = |with_token: bool| {
        let mut command = agentd();
        command
            .args(["healthcheck", "--url", &format!("{base}/readyz")])
            .env("DATABASE_URL", &db.url);
        if with_token {
            command
                .env("AGENTD__HTTP__TOKEN_ENV", "OPS_BEARER_TOKEN")
                .env("OPS_BEARER_TOKEN", &token);
        }
        command.output().unwrap()
    };
    let checked = healthcheck(true);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let refused = healthcheck(false);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("HTTP 401"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    let leaked: Vec<&String> = daemon
        .seen
        .iter()
        .filter(|line| line.contains(&token))
        .collect();
    assert!(leaked.is_empty(), "the token is in the log: {leaked:#?}");

    // A token variable that is missing or empty stops start-up (exit status 2) with one
    // line naming the setting and the variable.
    for value in [None, Some("")] {
        let mut command = agentd();
        command
            .arg("run")
            .env("DATABASE_URL", &db.url)
            .env("AGENTD__HTTP__TOKEN_ENV", "OPS_BEARER_TOKEN")
            .env_remove("OPS_BEARER_TOKEN");
        if let Some(value) = value {
            command.env("OPS_BEARER_TOKEN", value);
        }
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{value:?}: {stderr}");
        assert_eq!(
            stderr.trim_end(),
            "config: http.token_env = \"OPS_BEARER_TOKEN\" (from environment variable \
             AGENTD__HTTP__TOKEN_ENV): the environment variable OPS_BEARER_TOKEN is not set or \
             empty",
            "{value:?}"
        );
    }
}

/// `agentd run` without `--migrate` on a database its migrations have not reached (a
/// deployment's migration step still to come) waits, not ready and saying why, then serves
/// once `agentd migrate` has run; it neither exits nor starts a worker on a missing schema.
#[tokio::test(flavor = "multi_thread")]
async fn run_waits_for_the_migrations_and_serves_once_they_are_applied() {
    let db = TestDb::new().await;
    let mut daemon = replica(&db.url, "waits-1", &[]);
    let base = endpoints_of(&mut daemon);
    let waiting = daemon.wait_for("waiting for migrations", Duration::from_secs(30));
    assert_eq!(waiting["level"], "warn");
    let every = agentd::store::migrator()
        .iter()
        .map(|migration| migration.version.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    assert_eq!(waiting["pending"], every.as_str());
    // Not ready, and once the readiness check has looked, saying why.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(&format!("{base}/readyz")).await;
        assert_eq!(status, 503, "{body}");
        if body.contains("migrations pending") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still waiting a few looks later, the worker not started.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "{:#?}",
        daemon.seen
    );
    assert!(
        !daemon
            .drain()
            .iter()
            .any(|line| line.contains("agentd running")),
        "{:#?}",
        daemon.seen
    );

    let migrated = agentd()
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");
    daemon.wait_for("migrations applied: starting", Duration::from_secs(20));
    daemon.wait_for("worker started", Duration::from_secs(20));
    wait_status(&format!("{base}/readyz"), 200, "ready once migrated").await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let run = request_agent_run(&db.pool, agent).await;
    let finished = support::finished_run(&db.pool, run, Duration::from_secs(20)).await;
    assert_eq!(finished.status, "completed");

    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(20)).success());

    // Stopped while waiting: a clean exit.
    let fresh = TestDb::new().await;
    let mut waiting = replica(&fresh.url, "waits-2", &[("AGENTD__HTTP__LISTEN", "")]);
    waiting.wait_for("waiting for migrations", Duration::from_secs(30));
    waiting.signal(Signal::SIGTERM);
    assert!(waiting.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(
        agentd::store::applied_versions(&fresh.pool).await.unwrap(),
        Vec::<i64>::new()
    );
}

/// `status`, `trigger`, `cancel` and `chat` on a database without agentd's schema say so in one
/// line naming the fix, not with the server's "relation … does not exist".
#[tokio::test]
async fn one_shot_commands_on_a_database_without_the_schema_name_the_fix() {
    let db = TestDb::new().await;
    let id = Uuid::new_v4().to_string();
    for args in [
        vec!["status"],
        vec!["cancel", id.as_str()],
        vec!["trigger", "agent", id.as_str()],
        vec!["chat", id.as_str()],
    ] {
        let output = agentd()
            .args(&args)
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().last(),
            Some(
                "error: the database holds no agentd schema (no migration applied): run \
                 `agentd migrate` first"
            ),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(
        agentd::store::applied_versions(&db.pool).await.unwrap(),
        Vec::<i64>::new(),
        "nothing was migrated"
    );
}
