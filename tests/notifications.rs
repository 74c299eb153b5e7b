//! How a worker learns of new work (`database.notify`, `database.listen_url`): LISTEN on a
//! connection of its own, checked at start-up, or polling every second when notifications
//! cannot arrive (a transaction-mode pooler, a listen URL on another database) or when
//! asked to poll. Either way a schedule the application enables, a requested run, a
//! cancellation and a chat message are all picked up within seconds, long before the
//! scheduler's 60 s safety net or the 10 s lease renewal.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::{
    InProcessWorker, LoginRole, TestDb, as_user, count, create_agent, create_user, eventually,
    replica,
};
use uuid::Uuid;

/// Within this, polling (every 1 s) or a notification must have found the work; the
/// scheduler's own look comes only every 60 s and a lease renewal every 10 s.
const PICKED_UP: Duration = Duration::from_secs(4);

/// Waits until the worker `worker_id` has registered and made its first look (so what the
/// test writes next is new to it).
async fn settled(db: &TestDb, worker_id: &str) {
    eventually(Duration::from_secs(30), "the worker registers", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM agentd.workers WHERE id = '{worker_id}'"),
        )
        .await
            == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// A requested run, its cancellation, a chat message and a schedule the application
/// enables, one after the other: each is picked up within [`PICKED_UP`]. Runs of the
/// built-in executor last several seconds (its step delay), so the cancellation finds the
/// run executing.
async fn new_work_is_picked_up(db: &TestDb) {
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;

    let run_id: Uuid = as_user(
        &db.pool,
        user,
        &format!("SELECT public.request_run('agent', '{agent}')"),
    )
    .await
    .unwrap();
    support::wait_running(&db.pool, run_id, PICKED_UP, "the requested run is claimed").await;

    let taken: bool = as_user(
        &db.pool,
        user,
        &format!("SELECT public.cancel_run('{run_id}')"),
    )
    .await
    .unwrap();
    assert!(taken, "the owner's cancel_run of a running run");
    eventually(PICKED_UP, "the cancelled run stops", || async {
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM runs WHERE id = '{run_id}' \
                 AND status = 'failed' AND error = 'cancelled'"
            ),
        )
        .await
            == 1
    })
    .await;

    let conversation: Uuid = sqlx::query_scalar(
        "INSERT INTO conversations (user_id, agent_id, title) VALUES ($1, $2, 'chat') RETURNING id",
    )
    .bind(user)
    .bind(agent)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // Settle again: the cancelled run's end may have made the loops look.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    as_user::<Uuid>(
        &db.pool,
        user,
        &format!(
            "INSERT INTO messages (conversation_id, content, sender_type) \
             VALUES ('{conversation}', 'Hello?', 'user') RETURNING id"
        ),
    )
    .await
    .unwrap();
    eventually(PICKED_UP, "the message's turn is claimed", || async {
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM runs WHERE input->>'conversation_id' = '{conversation}'"
            ),
        )
        .await
            == 1
    })
    .await;

    let schedule: Uuid = sqlx::query_scalar(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) \
         VALUES ($1, false, 'cron', 1, '* * * * * *', 'UTC') RETURNING id",
    )
    .bind(agent)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlx::query("UPDATE agent_schedules SET enabled = true WHERE id = $1")
        .bind(schedule)
        .execute(&db.pool)
        .await
        .unwrap();
    eventually(PICKED_UP, "the enabled schedule fires", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE input->>'schedule_id' = '{schedule}'"),
        )
        .await
            >= 1
    })
    .await;
}

/// Settings that make the built-in executor's runs last a few seconds.
const SLOW_RUNS: (&str, &str) = ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "3s");

#[tokio::test(flavor = "multi_thread")]
async fn with_polling_only_every_kind_of_new_work_is_picked_up() {
    let db = TestDb::migrated().await;
    let worker = InProcessWorker::start_configured(
        &db,
        "poller",
        &[("AGENTD__DATABASE__NOTIFY", "poll"), SLOW_RUNS],
    )
    .await;
    settled(&db, "poller").await;
    assert_eq!(
        listener_connections(&db).await,
        0,
        "a polling worker opens no listen connection"
    );
    new_work_is_picked_up(&db).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listen_url_where_notifications_never_arrive_falls_back_to_polling_and_says_so_once() {
    let db = TestDb::migrated().await;
    // NOTIFY is per database: a listener on another database of the same server hears
    // nothing the worker's database sends.
    let elsewhere = TestDb::new().await;
    let mut worker = replica(
        &db.url,
        "deaf",
        &[("AGENTD__DATABASE__LISTEN_URL", &elsewhere.url), SLOW_RUNS],
    );
    let line = worker.wait_for("polling for new work instead", Duration::from_secs(30));
    assert_eq!(line["level"], "warn", "{line}");
    let message = line["fields"]["message"]
        .as_str()
        .or(line["message"].as_str())
        .unwrap();
    assert!(message.contains("database.listen_url"), "{message}");
    assert!(!message.contains(&elsewhere.name), "{message}");
    settled(&db, "deaf").await;
    new_work_is_picked_up(&db).await;

    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
    let fallbacks = worker
        .seen
        .iter()
        .filter(|line| line.contains("polling for new work instead"))
        .count();
    assert_eq!(fallbacks, 1, "{:#?}", worker.seen);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_separate_listen_url_is_where_the_worker_listens() {
    let db = TestDb::migrated().await;
    // The same database, reached as another role: its connection is told apart in
    // pg_stat_activity.
    let listen_role = LoginRole::create(&db, "authenticated").await;
    let mut worker = replica(
        &db.url,
        "separate",
        &[
            ("AGENTD__DATABASE__LISTEN_URL", &listen_role.url()),
            SLOW_RUNS,
        ],
    );
    worker.wait_for("worker started", Duration::from_secs(30));
    let listen_connections = || async {
        sqlx::query_as::<_, (String, String, String)>(
            "SELECT datname::text, usename::text, query FROM pg_stat_activity \
              WHERE application_name = 'agentd listener' AND datname = $1",
        )
        .bind(&db.name)
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    eventually(Duration::from_secs(10), "the listen connection", || async {
        !listen_connections().await.is_empty()
    })
    .await;
    let connections = listen_connections().await;
    assert_eq!(connections.len(), 1, "{connections:?}");
    let (database, user, query) = &connections[0];
    assert_eq!(database, &db.name);
    assert_eq!(
        user, &listen_role.name,
        "the listener logs in as listen_url says"
    );
    assert!(query.contains("LISTEN"), "{query}");

    // It hears the application: a requested run starts at once.
    settled(&db, "separate").await;
    new_work_is_picked_up(&db).await;

    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
    assert!(
        !worker
            .seen
            .iter()
            .any(|line| line.contains("polling for new work instead")),
        "{:#?}",
        worker.seen
    );
    listen_role.remove().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn through_a_transaction_pooler_without_a_listen_url_the_worker_polls_and_says_so_once() {
    let db = TestDb::migrated().await;
    // database.pooler = "transaction" makes agentd treat database.url as a transaction-mode
    // pooler's, which cannot LISTEN, whatever is behind it.
    let mut worker = replica(
        &db.url,
        "pooled",
        &[("AGENTD__DATABASE__POOLER", "transaction"), SLOW_RUNS],
    );
    let line = worker.wait_for("not listening through the pooler", Duration::from_secs(30));
    assert_eq!(line["level"], "warn", "{line}");
    settled(&db, "pooled").await;
    assert_eq!(
        listener_connections(&db).await,
        0,
        "no listen connection through the pooler"
    );
    new_work_is_picked_up(&db).await;

    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
    let warnings = worker
        .seen
        .iter()
        .filter(|line| line.contains("not listening through the pooler"))
        .count();
    assert_eq!(warnings, 1, "{:#?}", worker.seen);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listen_connection_cut_off_comes_back_checked_and_listening() {
    let db = TestDb::migrated().await;
    // The checks the worker sends, as anyone listening on the database hears them.
    let mut checks = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    checks.listen("agentd_listen_check").await.unwrap();
    let mut worker = replica(&db.url, "cut", &[SLOW_RUNS]);
    worker.wait_for("worker started", Duration::from_secs(30));
    tokio::time::timeout(Duration::from_secs(10), checks.recv())
        .await
        .expect("the check at start-up")
        .unwrap();
    let listener_pid = || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT pid FROM pg_stat_activity \
              WHERE application_name = 'agentd listener' AND datname = $1",
        )
        .bind(&db.name)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    };
    eventually(Duration::from_secs(10), "the listen connection", || async {
        listener_pid().await.is_some()
    })
    .await;
    let first = listener_pid().await.unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(first)
        .execute(&db.pool)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), checks.recv())
        .await
        .expect("the check after the reconnect")
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "a new listen connection",
        || async { listener_pid().await.is_some_and(|pid| pid != first) },
    )
    .await;
    settled(&db, "cut").await;
    new_work_is_picked_up(&db).await;

    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
    assert!(
        !worker
            .seen
            .iter()
            .any(|line| line.contains("polling for new work instead")),
        "the check after the reconnect passed: {:#?}",
        worker.seen
    );
}

/// A real PgBouncer in transaction mode: with database.listen_url on the server itself the
/// check passes and the worker listens there; with database.listen_url the pooler's own
/// address, the worker does not LISTEN there at all (the listening server connection would
/// be lent to others, with its notifications) and polls.
#[tokio::test(flavor = "multi_thread")]
async fn through_pgbouncer_in_transaction_mode_the_listen_url_bypasses_it_and_the_check_catches_it_otherwise()
 {
    let db = TestDb::migrated().await;
    let bouncer = support::pgbouncer::PgBouncer::start("transaction");
    let pooled_url = bouncer.url(&db.name);

    let mut direct = replica(
        &pooled_url,
        "bypass",
        &[
            ("AGENTD__DATABASE__POOLER", "transaction"),
            ("AGENTD__DATABASE__LISTEN_URL", &db.url),
            SLOW_RUNS,
        ],
    );
    direct.wait_for("worker started", Duration::from_secs(30));
    settled(&db, "bypass").await;
    new_work_is_picked_up(&db).await;
    direct.signal(Signal::SIGTERM);
    assert!(direct.wait_exit(Duration::from_secs(30)).success());
    assert!(
        !direct
            .seen
            .iter()
            .any(|line| line.contains("polling for new work instead")
                || line.contains("not listening through the pooler")),
        "{:#?}",
        direct.seen
    );

    let mut through = replica(
        &pooled_url,
        "through",
        &[
            ("AGENTD__DATABASE__POOLER", "transaction"),
            ("AGENTD__DATABASE__LISTEN_URL", &pooled_url),
            SLOW_RUNS,
        ],
    );
    // A listen_url that is the pooler's own address is not listened on at all (LISTEN there
    // would hand the listening server connection, and its notifications, to other clients).
    through.wait_for("not listening through the pooler", Duration::from_secs(30));
    assert!(
        !through
            .seen
            .iter()
            .any(|line| line.contains("cannot listen for notifications")
                || line.contains("polling for new work instead")),
        "{:#?}",
        through.seen
    );
    through.signal(Signal::SIGTERM);
    assert!(through.wait_exit(Duration::from_secs(30)).success());
}

/// The test database's connections named as agentd's listener.
async fn listener_connections(db: &TestDb) -> i64 {
    count(
        &db.pool,
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
             AND application_name = 'agentd listener'",
            db.name
        ),
    )
    .await
}
