//! agentd keeps no state in its database sessions, so a transaction-mode pooler (PgBouncer,
//! Supavisor) may give each of its transactions another server connection: its own updates
//! of schedules mark their own transaction, so they wake no replica, and its connections
//! carry no startup option (poolers refuse or drop them).

mod support;

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use support::{TestDb, as_user, count, create_agent, create_schedule, create_user, eventually};

/// The URL the worker connects with: the test database, directly. The one place to change
/// to run these tests through a pooler.
fn worker_url(db: &TestDb) -> String {
    db.url.clone()
}

/// A plain connection (not the worker's) listening on `agentd_schedules`.
async fn schedules_listener(db: &TestDb) -> PgListener {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(db.options())
        .await
        .unwrap();
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen("agentd_schedules").await.unwrap();
    listener
}

#[tokio::test(flavor = "multi_thread")]
async fn the_workers_claims_wake_nobody_and_an_applications_change_does() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let mut schedules = Vec::new();
    for _ in 0..6 {
        // New: each is planned by a claim, then fired every second by further claims.
        schedules.push(create_schedule(&db.pool, agent, "cron", Some("* * * * * *"), "UTC").await);
    }
    let mut listener = schedules_listener(&db).await;
    // Two schedules per claim: every second takes several claims, each writing next_run
    // (and last_run) of the schedules it planned or fired.
    let _worker = support::replica(
        &worker_url(&db),
        "w1",
        &[("AGENTD__SCHEDULER__BATCH_SIZE", "2")],
    );
    eventually(Duration::from_secs(30), "18 scheduled runs", || async {
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE input->>'trigger' = 'schedule'",
        )
        .await
            >= 18
    })
    .await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM agent_schedules WHERE last_run IS NULL OR next_run IS NULL"
        )
        .await,
        0,
        "every schedule was planned and fired by the worker"
    );
    let heard = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(
        heard.is_err(),
        "the worker's own schedule updates notified agentd_schedules: {heard:?}"
    );

    // The application's change of a schedule (as the signed-in user, through the API's
    // role) wakes the replicas.
    let changed: i32 = as_user(
        &db.pool,
        user,
        &format!(
            "UPDATE agent_schedules SET time = '*/2 * * * * *' WHERE id = '{}' RETURNING 1",
            schedules[0]
        ),
    )
    .await
    .unwrap();
    assert_eq!(changed, 1);
    let heard = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("the application's change notified agentd_schedules")
        .unwrap();
    assert_eq!(heard.channel(), "agentd_schedules");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_workers_connections_carry_no_setting_of_their_own() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    create_schedule(&db.pool, agent, "cron", Some("* * * * * *"), "UTC").await;
    // The worker's pool, as `agentd run` opens it, on one connection: what a claim leaves
    // behind is seen by the next statement.
    let env = [(
        "AGENTD__DATABASE__MAX_CONNECTIONS".to_string(),
        "1".to_string(),
    )]
    .into_iter()
    .collect();
    let settings = agentd::config::Settings::load(None, &env).unwrap();
    let pool = agentd::store::connect(
        agentd::store::parse_url(&worker_url(&db)).unwrap(),
        &settings.database,
        Some(Duration::from_secs(10)),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let internal = || async {
        sqlx::query_scalar::<_, Option<String>>("SELECT current_setting('agentd.internal', true)")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = internal().await;
    assert_ne!(
        before.as_deref(),
        Some("on"),
        "a fresh connection is marked"
    );

    // A claim that plans the schedule (writes its next_run), committed.
    let mut claim = agentd::store::schedules::ClaimTransaction::begin(&pool)
        .await
        .unwrap();
    let (now, locked) = claim.lock_schedules(10, Duration::ZERO).await.unwrap();
    assert_eq!(locked.len(), 1);
    let writes = agentd::store::schedules::ClaimWrites {
        updates: vec![agentd::store::schedules::ScheduleUpdate {
            id: locked[0].id,
            next_run: Some(now + chrono::Duration::seconds(1)),
            last_run: None,
        }],
        ..Default::default()
    };
    claim
        .apply(&writes, "w1", Duration::from_secs(30))
        .await
        .unwrap();
    claim.commit().await.unwrap();
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM agent_schedules WHERE next_run IS NOT NULL"
        )
        .await,
        1
    );
    let after = internal().await;
    assert_ne!(
        after.as_deref(),
        Some("on"),
        "the claim's mark outlived its transaction"
    );
    pool.close().await;
}
