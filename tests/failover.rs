//! A failover under a running replica (the real binary, on a PostgreSQL server of the
//! test's own): the server turns read-only and back, or drops every connection; agentd
//! keeps running, says what happened, replaces its connections, and fires every slot once.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use support::{
    Daemon, count, create_agent, create_user, eventually, private_server, replica, scheduled_runs,
    server_pool,
};

/// Settings of the replica: quick runs, quick retries, and overlapping runs allowed so
/// that every slot fires (the skip policy would rightly drop a slot whose previous run was
/// held up by the failover, and this test counts slots). Slots are claimed ahead of their
/// instant as by default: one that cannot be started during the failover is given back by
/// the reaper after its lease, and accounted for (fired late, or recorded as lost when
/// later slots of its schedule fired meanwhile).
const SETTINGS: [(&str, &str); 3] = [
    ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "0s"),
    ("AGENTD__DATABASE__MAX_BACKOFF", "500ms"),
    ("AGENTD__SCHEDULER__OVERLAP_POLICY", "allow"),
];

/// Three schedules firing every second.
async fn every_second_schedules(pool: &PgPool) {
    let user = create_user(pool).await;
    let agent = create_agent(pool, user).await;
    sqlx::query(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) \
         SELECT $1, true, 'cron', 1, '* * * * * *', 'UTC' FROM generate_series(1, 3)",
    )
    .bind(agent)
    .execute(pool)
    .await
    .unwrap();
}

/// The backend pids of the replica's pooled and listening connections.
async fn agentd_backends(pool: &PgPool) -> BTreeSet<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name IN ('agentd', 'agentd listener')",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// The backend pids of the replica's readiness check.
async fn readiness_backends(pool: &PgPool) -> BTreeSet<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'agentd readiness'",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// Whether the replica listens for notifications on a connection not in `old`.
async fn listens_anew(pool: &PgPool, old: &BTreeSet<i32>) -> bool {
    let listeners: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
          WHERE application_name = 'agentd listener' AND query LIKE 'LISTEN%'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    listeners.len() == 1 && !old.contains(&listeners[0])
}

async fn now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until every schedule fired a slot later than `after`.
async fn fired_after(pool: &PgPool, after: DateTime<Utc>, what: &str) {
    let sql = format!(
        "SELECT count(DISTINCT input->>'schedule_id') FROM runs \
          WHERE input->>'trigger' = 'schedule' \
            AND (input->>'scheduled_for')::timestamptz > '{}'",
        after.to_rfc3339()
    );
    eventually(Duration::from_secs(30), what, || async {
        count(pool, &sql).await == 3
    })
    .await;
}

/// No slot fired twice, and between two runs of a schedule every slot is either a run or
/// counted in the later run's `missed`.
async fn every_slot_fired_once(pool: &PgPool) {
    let duplicates = count(
        pool,
        "SELECT count(*) FROM (SELECT 1 FROM runs WHERE input->>'trigger' = 'schedule' \
          GROUP BY input->>'schedule_id', input->>'scheduled_for' HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(duplicates, 0, "a slot fired twice");
    let mut slots: BTreeMap<String, Vec<(DateTime<Utc>, i64)>> = BTreeMap::new();
    for (schedule, scheduled_for, _status, _error, missed) in scheduled_runs(pool).await {
        slots
            .entry(schedule)
            .or_default()
            .push((scheduled_for.parse().unwrap(), missed));
    }
    assert_eq!(slots.len(), 3, "every schedule fired");
    for (schedule, mut runs) in slots {
        runs.sort();
        for pair in runs.windows(2) {
            let ((before, _), (after, missed)) = (pair[0], pair[1]);
            assert_eq!(
                (after - before).num_seconds(),
                missed + 1,
                "{schedule}: slots between {before} and {after} are not accounted for: {runs:?}"
            );
        }
    }
}

fn still_running(daemon: &mut Daemon) {
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "agentd exited: {:#?}",
        daemon.drain()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_spell_rebuilds_the_connections_and_every_slot_fires_once() {
    let folder = tempfile::tempdir().unwrap();
    let (_options, server, url) = private_server(folder.path()).await;
    let pool = server_pool(&server).await;
    every_second_schedules(&pool).await;
    let mut daemon = replica(&url, "failover-1", &SETTINGS);
    fired_after(&pool, now(&pool).await, "schedules fire").await;
    let before = agentd_backends(&pool).await;
    assert!(!before.is_empty());
    // The readiness check's connection only reads, so the read-only server never fails it:
    // it is replaced because the worker rebuilt its connections.
    let readiness_before = readiness_backends(&pool).await;
    assert_eq!(readiness_before.len(), 1);

    // What an old primary does after a failover: every write is refused with 25006.
    sqlx::query("ALTER SYSTEM SET default_transaction_read_only = on")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&pool)
        .await
        .unwrap();
    let line = daemon.wait_for(
        "rebuilding the database connections",
        Duration::from_secs(20),
    );
    assert_eq!(line["reason"], "read_only", "{line}");
    assert!(
        line["message"].as_str().unwrap().contains("read-only"),
        "{line}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    still_running(&mut daemon);

    // The new primary: writable again.
    sqlx::query("ALTER SYSTEM RESET default_transaction_read_only")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&pool)
        .await
        .unwrap();
    let writable_at = now(&pool).await;
    fired_after(&pool, writable_at, "schedules fire again once writable").await;
    eventually(
        Duration::from_secs(20),
        "no connection from before the read-only spell is left",
        || async {
            let after = agentd_backends(&pool).await;
            !after.is_empty() && after.is_disjoint(&before) && listens_anew(&pool, &before).await
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the readiness check reconnected",
        || async {
            let after = readiness_backends(&pool).await;
            after.len() == 1 && after.is_disjoint(&readiness_before)
        },
    )
    .await;
    still_running(&mut daemon);
    let rebuilds = daemon
        .drain()
        .iter()
        .filter(|line| line.contains("rebuilding the database connections"))
        .count();
    assert!(
        rebuilds <= 6,
        "a rebuild per backoff window at most, not one per error: {rebuilds}"
    );

    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    every_slot_fired_once(&pool).await;
    pool.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_terminated_by_the_server_are_replaced() {
    let folder = tempfile::tempdir().unwrap();
    let (_options, server, url) = private_server(folder.path()).await;
    let pool = server_pool(&server).await;
    every_second_schedules(&pool).await;
    let mut daemon = replica(&url, "failover-2", &SETTINGS);
    fired_after(&pool, now(&pool).await, "schedules fire").await;
    let before = agentd_backends(&pool).await;
    assert!(!before.is_empty());

    // pg_terminate_backend returns false for a connection that ended between the read
    // of pg_stat_activity and the signal (agentd may close its others on seeing the
    // first one dropped), so what is asserted here is that the server ended some, and
    // below that every connection of before is gone and replaced.
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
          WHERE application_name IN ('agentd', 'agentd listener')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        terminated.contains(&true),
        "none terminated: {terminated:?}"
    );
    let terminated_at = now(&pool).await;

    fired_after(
        &pool,
        terminated_at,
        "schedules fire after the connections dropped",
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "the listener and the pool are connected again",
        || async {
            let after = agentd_backends(&pool).await;
            !after.is_empty() && after.is_disjoint(&before) && listens_anew(&pool, &before).await
        },
    )
    .await;
    still_running(&mut daemon);

    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    every_slot_fired_once(&pool).await;
    pool.close().await;
    server.stop().await;
}

/// Runs `command` as the server's user (`postgres` when the test runs as root).
fn as_server_user(command: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    if nix::unistd::Uid::effective().is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a postgres user");
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    command
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_promoted_in_place_of_the_primary_takes_over() {
    let folder = tempfile::tempdir().unwrap();
    let (options, primary, url) = private_server(folder.path()).await;
    let pool = server_pool(&primary).await;
    every_second_schedules(&pool).await;
    let mut daemon = replica(&url, "failover-3", &SETTINGS);
    fired_after(&pool, now(&pool).await, "schedules fire").await;

    // A streaming standby of the primary, in a folder of its own.
    let standby_dir = folder.path().join("standby");
    std::fs::create_dir(&standby_dir).unwrap();
    if nix::unistd::Uid::effective().is_root() {
        let user = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        nix::unistd::chown(&standby_dir, Some(user.uid), Some(user.gid)).unwrap();
    }
    // The folder with the server binaries may hold only initdb and postgres (a shim on the
    // PATH): pg_basebackup is looked for in the distribution's folder then.
    let bin = [
        agentd::embedded_pg::find_bin_dir(None).unwrap(),
        std::path::PathBuf::from("/usr/lib/postgresql/15/bin"),
    ]
    .into_iter()
    .find(|dir| dir.join("pg_basebackup").exists())
    .expect("pg_basebackup");
    let primary_socket = primary.data_dir().to_path_buf();
    let output = as_server_user(&mut std::process::Command::new(bin.join("pg_basebackup")))
        .arg("-D")
        .arg(&standby_dir)
        .arg("-h")
        .arg(&primary_socket)
        .args([
            "-p", "5432", "-U", "postgres", "-X", "stream", "-R", "-c", "fast",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The primary's socket is in its data folder, and the copy took its lock file along.
    for copied in [".s.PGSQL.5432.lock", ".s.PGSQL.5432"] {
        let _ = std::fs::remove_file(standby_dir.join(copied));
    }
    let standby_options = agentd::embedded_pg::EmbeddedOptions {
        data_dir: standby_dir.clone(),
        ..options.clone()
    };
    let standby = agentd::embedded_pg::EmbeddedPostgres::start(&standby_options)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pool.close().await;

    // The primary goes away (its last WAL reaches the streaming standby), and the standby
    // comes up where agentd looks for the primary, still in recovery: what a replica sees
    // of a failover while the old name points at a reader.
    primary.stop().await;
    standby.stop().await;
    let primary_dir = options.data_dir.clone();
    std::fs::rename(&primary_dir, folder.path().join("old-primary")).unwrap();
    std::fs::rename(&standby_dir, &primary_dir).unwrap();
    let auto_conf = primary_dir.join("postgresql.auto.conf");
    let kept: String = std::fs::read_to_string(&auto_conf)
        .unwrap()
        .lines()
        .filter(|line| !line.starts_with("primary_conninfo"))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&auto_conf, kept).unwrap();
    let server = agentd::embedded_pg::EmbeddedPostgres::start(&options)
        .await
        .unwrap();
    let pool = server_pool(&server).await;
    let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(in_recovery);
    loop {
        let line = daemon.wait_for(
            "rebuilding the database connections",
            Duration::from_secs(30),
        );
        if line["reason"] == "read_only" || line["reason"] == "recovery" {
            break;
        }
    }
    still_running(&mut daemon);

    let promoted: bool = sqlx::query_scalar("SELECT pg_promote()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(promoted);
    let promoted_at = now(&pool).await;
    fired_after(&pool, promoted_at, "schedules fire on the promoted standby").await;
    eventually(
        Duration::from_secs(20),
        "the replica listens on the promoted server",
        || async { listens_anew(&pool, &BTreeSet::new()).await },
    )
    .await;
    still_running(&mut daemon);

    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    every_slot_fired_once(&pool).await;
    pool.close().await;
    server.stop().await;
}
