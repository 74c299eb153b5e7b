//! Concurrency that fits each executor: a replica claims no more runs than its executors
//! may run (`executors.<name>.concurrency`, within `worker.max_runs`), an agent routed to a
//! slower executor waits for that executor's room only, and the former single limit
//! `worker.concurrency` keeps its meaning.

mod support;

use std::time::Duration;

use support::{InProcessWorker, TestDb, count, create_agent, create_user, request_agent_run};
use uuid::Uuid;

/// Waits until every run of `runs` ended, then returns the most of them that executed at
/// once: each run executes from its first log line to its last (the executor writes them;
/// the runs' rows say `running` a little longer, while their outcome is written after
/// their slot is free).
async fn most_executing_at_once(db: &TestDb, runs: &[Uuid], limit: Duration) -> i64 {
    support::eventually(limit, "every run ends", || async {
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE id = ANY($1) AND status <> 'running'",
        )
        .bind(runs)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        ended == runs.len() as i64
    })
    .await;
    sqlx::query_scalar(
        "WITH spans AS (SELECT run_id, min(timestamp) AS first, max(timestamp) AS last \
                          FROM run_logs WHERE run_id = ANY($1) GROUP BY run_id) \
         SELECT max((SELECT count(*) FROM spans o WHERE o.first <= s.first AND o.last > s.first)) \
           FROM spans s",
    )
    .bind(runs)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn request(db: &TestDb, agent: Uuid, n: usize) -> Vec<Uuid> {
    let mut runs = Vec::new();
    for _ in 0..n {
        runs.push(request_agent_run(&db.pool, agent).await);
    }
    runs
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_claims_no_more_runs_than_its_executor_may_run() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let runs = request(&db, agent, 6).await;
    let worker = InProcessWorker::start_configured(
        &db,
        "w1",
        &[
            ("AGENTD__EXECUTORS__BUILTIN__CONCURRENCY", "2"),
            ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "100ms"),
        ],
    )
    .await;
    let most = most_executing_at_once(&db, &runs, Duration::from_secs(30)).await;
    assert_eq!(most, 2, "most runs executing at once");
    // And the replica claimed no more than that: the other four runs started (their rows
    // were created) only once a first run's executor had ended.
    let claimed_late: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs r WHERE id = ANY($1) AND r.start_time >= \
           (SELECT min(last) FROM (SELECT max(timestamp) AS last FROM run_logs \
                                    WHERE run_id = ANY($1) GROUP BY run_id) l)",
    )
    .bind(&runs)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        claimed_late >= 4,
        "{claimed_late} runs started after the first ended"
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status = 'completed'"
        )
        .await,
        6
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_former_worker_concurrency_still_limits_every_run() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let runs = request(&db, agent, 6).await;
    // The builtin executor allows 500 by default; the old single limit wins, as before.
    let worker = InProcessWorker::start_configured(
        &db,
        "w1",
        &[
            ("AGENTD__WORKER__CONCURRENCY", "3"),
            ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "100ms"),
        ],
    )
    .await;
    let most = most_executing_at_once(&db, &runs, Duration::from_secs(30)).await;
    assert_eq!(most, 3, "most runs executing at once");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_on_a_slower_executor_wait_for_its_room_and_no_one_elses() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let fast = create_agent(&db.pool, user).await;
    let slow = create_agent(&db.pool, user).await;
    sqlx::query("UPDATE agents SET category = 'slow' WHERE id = $1")
        .bind(slow)
        .execute(&db.pool)
        .await
        .unwrap();
    let folder = tempfile::tempdir().unwrap();
    let artifacts = folder.path().join("artifacts").display().to_string();
    // Each program says when it starts and ends, with half a second between.
    let program = r#"["sh", "-c", "echo start; sleep 0.5; echo end"]"#;
    let mut runs = request(&db, slow, 3).await;
    runs.extend(request(&db, fast, 4).await);
    let worker = InProcessWorker::start_configured(
        &db,
        "w1",
        &[
            ("AGENTD__EXECUTION__BY_CATEGORY", r#"{ slow = "command" }"#),
            ("AGENTD__EXECUTORS__COMMAND__PROGRAM", program),
            ("AGENTD__EXECUTORS__COMMAND__CONCURRENCY", "1"),
            ("AGENTD__EXECUTORS__BUILTIN__CONCURRENCY", "4"),
            ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "50ms"),
            ("AGENTD__ARTIFACTS__DIR", artifacts.as_str()),
        ],
    )
    .await;
    let most = most_executing_at_once(&db, &runs, Duration::from_secs(60)).await;
    assert!(most <= 5, "{most} runs executing at once");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status = 'completed'"
        )
        .await,
        7
    );
    let spans: Vec<(Uuid, f64, f64)> = sqlx::query_as(
        "SELECT run_id, \
                extract(epoch FROM min(timestamp) FILTER (WHERE message = 'start'))::float8, \
                extract(epoch FROM max(timestamp) FILTER (WHERE message = 'end'))::float8 \
           FROM run_logs WHERE run_id = ANY($1) GROUP BY run_id ORDER BY 2",
    )
    .bind(&runs[..3])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(spans.len(), 3, "{spans:?}");
    for pair in spans.windows(2) {
        assert!(
            pair[1].1 >= pair[0].2,
            "two programs ran at once (executors.command.concurrency = 1): {spans:?}"
        );
    }
    // The fast agent's runs did not queue behind the programs: all of them ended before
    // the last program started.
    let fast_ended: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(end_time))::float8 FROM runs WHERE id = ANY($1)",
    )
    .bind(&runs[3..])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        fast_ended < spans[2].1,
        "the builtin runs waited for the programs: {fast_ended} >= {}",
        spans[2].1
    );
    worker.stop().await;
}
