//! The fenced log writes: a batch sent again after a lost answer is stored once, the last
//! lines go with the outcome, and a worker without the lease writes nothing.

mod support;

use agentd::store::runs::{Fenced, LogLine, RunOutcome, finish_runs, insert_log_batches};
use chrono::Utc;
use support::{TestDb, count, create_agent, create_user};
use uuid::Uuid;

fn line(message: &str) -> LogLine {
    LogLine {
        id: Uuid::now_v7(),
        level: "info",
        message: message.to_string(),
        timestamp: Utc::now(),
    }
}

/// A running run leased to `worker`.
async fn leased_run(db: &TestDb, worker: &str) -> Uuid {
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let run: Uuid = sqlx::query_scalar(
        "INSERT INTO runs (type, target_id, status, start_time, triggered_by_id) \
         VALUES ('agent', $1, 'running', now(), $2) RETURNING id",
    )
    .bind(agent)
    .bind(user)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO agentd.leases (run_id, worker_id, expires_at) VALUES ($1, $2, now() + interval '1 minute')",
    )
    .bind(run)
    .bind(worker)
    .execute(&db.pool)
    .await
    .unwrap();
    run
}

#[tokio::test]
async fn a_batch_written_twice_is_stored_once_and_fencing_still_holds() {
    let db = TestDb::migrated().await;
    let run = leased_run(&db, "w1").await;
    let lines_of_run = format!("SELECT count(*) FROM run_logs WHERE run_id = '{run}'");

    let batch = vec![line("one"), line("two"), line("three")];
    let written = insert_log_batches(&db.pool, "w1", &[(run, batch.as_slice())])
        .await
        .unwrap();
    assert_eq!(written, vec![Fenced::Written]);
    // The same batch again (its first answer was lost): refused by the primary key, sent
    // again without the stored lines, and answered as written.
    let mut again = batch.clone();
    again.push(line("four"));
    let written = insert_log_batches(&db.pool, "w1", &[(run, again.as_slice())])
        .await
        .unwrap();
    assert_eq!(written, vec![Fenced::Written]);
    assert_eq!(count(&db.pool, &lines_of_run).await, 4);

    // Another worker holds no lease: nothing of its batch is stored.
    let written = insert_log_batches(&db.pool, "w2", &[(run, [line("stale")].as_slice())])
        .await
        .unwrap();
    assert_eq!(written, vec![Fenced::LeaseLost]);
    assert_eq!(count(&db.pool, &lines_of_run).await, 4);

    // The last lines go with the outcome; one of them was stored already.
    let outcome = RunOutcome {
        result: agentd::domain::RunResult::Completed,
        output: Some(serde_json::json!({"ok": true})),
        error: None,
        resource_usage: None,
    };
    let tail = vec![again[3].clone(), line("five")];
    let finished = finish_runs(&db.pool, "w1", &[(run, &outcome, tail.as_slice())])
        .await
        .unwrap();
    assert_eq!(finished, vec![Fenced::Written]);
    assert_eq!(count(&db.pool, &lines_of_run).await, 5);
    let status: String = sqlx::query_scalar("SELECT status FROM runs WHERE id = $1")
        .bind(run)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(status, "completed");

    // The lease ended with the outcome: a second outcome is refused.
    let finished = finish_runs(&db.pool, "w1", &[(run, &outcome, [].as_slice())])
        .await
        .unwrap();
    assert_eq!(finished, vec![Fenced::LeaseLost]);
}
