//! agentd through a real PgBouncer in transaction mode (the distribution's 1.18, which does
//! not track prepared statements), as managed databases are reached: replicas fire every
//! slot once, requested runs run and stream their logs, cancellations stop runs and
//! conversations are answered, with the listener on a direct connection and with polling
//! only; what cannot work through such a pooler (migrations) is refused in one line.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use nix::sys::signal::Signal;
use sqlx::PgPool;
use support::pgbouncer::PgBouncer;
use support::{
    Daemon, TestDb, agentd, as_user, count, create_agent, create_user, eventually, replica,
    scheduled_runs,
};
use uuid::Uuid;

/// How the replicas hear of changes: LISTEN on a direct connection, or polling only.
#[derive(Clone, Copy)]
enum Wakeups {
    ListenDirect,
    PollOnly,
}

/// The settings of a replica whose `database.url` goes through PgBouncer.
fn through_pooler(db: &TestDb, wakeups: Wakeups) -> Vec<(&'static str, String)> {
    let mut settings = vec![
        ("AGENTD__DATABASE__POOLER", "transaction".to_string()),
        ("AGENTD__DATABASE__MAX_CONNECTIONS", "6".to_string()),
        ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "0s".to_string()),
    ];
    match wakeups {
        Wakeups::ListenDirect => settings.push(("AGENTD__DATABASE__LISTEN_URL", db.url.clone())),
        Wakeups::PollOnly => settings.push(("AGENTD__DATABASE__NOTIFY", "poll".to_string())),
    }
    settings
}

fn start_replicas(url: &str, settings: &[(&'static str, String)], n: usize) -> Vec<Daemon> {
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    (1..=n)
        .map(|i| replica(url, &format!("r{i}"), &settings))
        .collect()
}

fn stop_all(replicas: &mut [Daemon]) {
    for daemon in replicas.iter() {
        daemon.signal(Signal::SIGTERM);
    }
    for daemon in replicas.iter_mut() {
        let status = daemon.wait_exit(Duration::from_secs(40));
        assert!(
            status.success(),
            "{status:?}: {:#?}",
            daemon.seen.iter().rev().take(20).collect::<Vec<_>>()
        );
    }
}

/// `n` schedules firing every two seconds, over a few agents of one user.
async fn every_two_seconds(pool: &PgPool, n: i64) {
    let user = create_user(pool).await;
    let mut agents = Vec::new();
    for _ in 0..3 {
        agents.push(create_agent(pool, user).await);
    }
    sqlx::query(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) \
         SELECT ($1::uuid[])[1 + g % 3], true, 'cron', 1, '*/2 * * * * *', 'UTC' \
           FROM generate_series(1, $2) g",
    )
    .bind(&agents)
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

/// What the application does while the replicas run, and what it must see: schedules fire
/// every slot once, a requested run completes with its log lines, a cancelled run stops, a
/// message is answered.
async fn the_worker_does_its_work(db: &TestDb, wakeups: Wakeups) {
    let pgbouncer = PgBouncer::start("transaction");
    every_two_seconds(&db.pool, 40).await;
    let settings = through_pooler(db, wakeups);
    let mut replicas = start_replicas(&pgbouncer.url(&db.name), &settings, 2);

    // A run asked for by its owner, through the application (a direct connection).
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let requested: Uuid = as_user(
        &db.pool,
        user,
        &format!("SELECT public.request_run('agent', '{agent}')"),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(15), "the requested run", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE id = '{requested}' AND status = 'completed'"),
        )
        .await
            == 1
    })
    .await;
    assert!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM run_logs WHERE run_id = '{requested}'"),
        )
        .await
            > 0,
        "its log lines were stored"
    );

    // A conversation's message, answered.
    let conversation: Uuid = sqlx::query_scalar(
        "INSERT INTO conversations (user_id, agent_id, title) VALUES ($1, $2, 'chat') RETURNING id",
    )
    .bind(user)
    .bind(agent)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    as_user::<Uuid>(
        &db.pool,
        user,
        &format!(
            "INSERT INTO messages (conversation_id, content, sender_type) \
             VALUES ('{conversation}', 'Are you there?', 'user') RETURNING id"
        ),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(15), "the reply", || async {
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM messages WHERE conversation_id = '{conversation}' \
                  AND sender_type = 'agent' AND attachments->>'status' = 'completed'"
            ),
        )
        .await
            == 1
    })
    .await;

    // Let the schedules fire a few seconds more, then stop them and the replicas.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop_all(&mut replicas);
    sqlx::query("UPDATE agent_schedules SET enabled = false")
        .execute(&db.pool)
        .await
        .unwrap();

    // Every slot fired once, and completed.
    let runs = scheduled_runs(&db.pool).await;
    let mut slots: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (schedule, scheduled_for, status, error, _) in &runs {
        assert_eq!(status, "completed", "{error:?}");
        *slots
            .entry((schedule.clone(), scheduled_for.clone()))
            .or_default() += 1;
    }
    assert!(
        slots.values().all(|n| *n == 1),
        "a slot fired twice through the pooler"
    );
    let schedules_fired = slots
        .keys()
        .map(|(schedule, _)| schedule)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert_eq!(schedules_fired, 40, "every schedule fired");

    // A long run (the builtin executor pausing between its steps), cancelled by its owner.
    let mut slow_settings = settings.clone();
    slow_settings.retain(|(key, _)| *key != "AGENTD__EXECUTORS__BUILTIN__STEP_DELAY");
    slow_settings.push(("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "30s".to_string()));
    let mut slow = start_replicas(&pgbouncer.url(&db.name), &slow_settings, 1);
    let cancelled: Uuid = as_user(
        &db.pool,
        user,
        &format!("SELECT public.request_run('agent', '{agent}')"),
    )
    .await
    .unwrap();
    support::wait_running(
        &db.pool,
        cancelled,
        Duration::from_secs(15),
        "the slow run runs",
    )
    .await;
    let accepted: bool = as_user(
        &db.pool,
        user,
        &format!("SELECT public.cancel_run('{cancelled}')"),
    )
    .await
    .unwrap();
    assert!(accepted);
    eventually(Duration::from_secs(15), "the run is cancelled", || async {
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM runs WHERE id = '{cancelled}' \
                  AND status = 'failed' AND error = 'cancelled'"
            ),
        )
        .await
            == 1
    })
    .await;
    stop_all(&mut slow);
    replicas.extend(slow);

    // Neither the replicas nor PgBouncer saw a statement fail.
    for daemon in &replicas {
        for line in &daemon.seen {
            assert!(
                !line.contains("prepared statement"),
                "a prepared statement went wrong: {line}"
            );
        }
    }
    let log = pgbouncer.log();
    assert!(
        !log.contains("prepared statement") && !log.contains("unsupported startup parameter"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn through_pgbouncer_with_the_listener_direct_every_kind_of_work_is_done() {
    let db = TestDb::migrated().await;
    the_worker_does_its_work(&db, Wakeups::ListenDirect).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn through_pgbouncer_polling_only_every_kind_of_work_is_done() {
    let db = TestDb::migrated().await;
    the_worker_does_its_work(&db, Wakeups::PollOnly).await;
}

#[tokio::test]
async fn migrations_through_a_transaction_pooler_are_refused_naming_the_fix() {
    let db = TestDb::new().await;
    let pgbouncer = PgBouncer::start("transaction");
    let output = agentd()
        .arg("migrate")
        .env("DATABASE_URL", pgbouncer.url(&db.name))
        .env("AGENTD__DATABASE__POOLER", "transaction")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error = stderr
        .lines()
        .find(|line| line.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        error.contains("database.pooler") && error.contains("agentd migrate"),
        "{error}"
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'agentd'"
        )
        .await,
        0,
        "nothing was migrated"
    );
}

/// A replica's claims through PgBouncer wake no replica (they mark their own transaction,
/// not a session the pooler would lend to others), and an application's change does.
#[tokio::test(flavor = "multi_thread")]
async fn claims_through_pgbouncer_wake_nobody_and_an_applications_change_does() {
    let db = TestDb::migrated().await;
    let pgbouncer = PgBouncer::start("transaction");
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let mut schedules = Vec::new();
    for _ in 0..6 {
        schedules.push(
            support::create_schedule(&db.pool, agent, "cron", Some("* * * * * *"), "UTC").await,
        );
    }
    let listening = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(db.options())
        .await
        .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(&listening)
        .await
        .unwrap();
    listener.listen("agentd_schedules").await.unwrap();
    let mut settings = through_pooler(&db, Wakeups::ListenDirect);
    settings.push(("AGENTD__SCHEDULER__BATCH_SIZE", "2".to_string()));
    let mut replicas = start_replicas(&pgbouncer.url(&db.name), &settings, 1);
    eventually(Duration::from_secs(30), "18 scheduled runs", || async {
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE input->>'trigger' = 'schedule'",
        )
        .await
            >= 18
    })
    .await;
    let heard = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(
        heard.is_err(),
        "the replica's own schedule updates notified agentd_schedules: {heard:?}"
    );
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
    stop_all(&mut replicas);
}
