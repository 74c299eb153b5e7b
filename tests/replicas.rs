//! Several OS processes of the real `agentd` binary on one database: exactly-once firing,
//! a replica killed with runs in flight, a replica paused past its lease, SIGTERM, and
//! PostgreSQL restarting under the workers.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentd::embedded_pg::EmbeddedPostgres;
use nix::sys::signal::{Signal, kill};
use sqlx::PgPool;
use support::{
    Daemon, TestDb, count, create_agent, create_user, eventually, private_server, replica,
    scheduled_runs, server_pool,
};
use uuid::Uuid;

/// `n` enabled cron schedules with expression `cron` (UTC), spread over a few agents.
async fn cron_schedules(pool: &PgPool, n: i64, cron: &str) {
    let user = create_user(pool).await;
    let mut agents = Vec::new();
    for _ in 0..5 {
        agents.push(create_agent(pool, user).await);
    }
    sqlx::query(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) \
         SELECT ($1::uuid[])[1 + g % 5], true, 'cron', 1, $2, 'UTC' FROM generate_series(1, $3) g",
    )
    .bind(&agents)
    .bind(cron)
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

async fn duplicate_slots(pool: &PgPool) -> i64 {
    count(
        pool,
        "SELECT count(*) FROM (SELECT 1 FROM runs WHERE input->>'trigger' = 'schedule' \
          GROUP BY input->>'schedule_id', input->>'scheduled_for' HAVING count(*) > 1) d",
    )
    .await
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

/// Runs holding a lease (a slot claimed ahead of its instant holds one too, without a
/// run yet).
const RUNS_IN_FLIGHT: &str = "SELECT count(*) FROM agentd.leases l WHERE EXISTS (SELECT 1 FROM runs r WHERE r.id = l.run_id)";

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_fire_every_slot_of_300_schedules_exactly_once() {
    let db = TestDb::migrated().await;
    cron_schedules(&db.pool, 300, "*/2 * * * * *").await;
    let mut replicas: Vec<Daemon> = ["r1", "r2", "r3"]
        .iter()
        .map(|id| replica(&db.url, id, &[]))
        .collect();
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop_all(&mut replicas);

    assert_eq!(duplicate_slots(&db.pool).await, 0, "a slot fired twice");
    let runs = scheduled_runs(&db.pool).await;
    let mut slots: BTreeMap<String, Vec<chrono::DateTime<chrono::Utc>>> = BTreeMap::new();
    for (schedule, scheduled_for, status, error, missed) in &runs {
        assert_eq!(status, "completed", "{error:?}");
        assert_eq!(*missed, 0, "a slot was missed (coalesced) for {schedule}");
        slots
            .entry(schedule.clone())
            .or_default()
            .push(scheduled_for.parse().unwrap());
    }
    assert_eq!(slots.len(), 300, "every schedule fired");
    for (schedule, mut times) in slots {
        times.sort();
        assert!(
            times.len() >= 12,
            "{schedule}: only {} slots in 30 s",
            times.len()
        );
        for pair in times.windows(2) {
            assert_eq!(
                (pair[1] - pair[0]).num_seconds(),
                2,
                "{schedule}: a slot is missing between {} and {}",
                pair[0],
                pair[1]
            );
        }
    }
    // The work was shared.
    let workers = count(&db.pool, "SELECT count(*) FROM agentd.workers").await;
    assert_eq!(workers, 0, "every replica deregistered on SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_with_runs_in_flight_is_reaped_within_the_lease_ttl() {
    let db = TestDb::migrated().await;
    cron_schedules(&db.pool, 20, "* * * * * *").await;
    let settings = [
        ("AGENTD__LEASE__TTL", "3s"),
        ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "2s"),
    ];
    let mut victim = replica(&db.url, "victim", &settings);
    eventually(
        Duration::from_secs(10),
        "the victim has runs in flight",
        || async {
            count(
                &db.pool,
                "SELECT count(*) FROM agentd.leases l JOIN runs r ON r.id = l.run_id \
                  WHERE l.worker_id = 'victim'",
            )
            .await
                >= 5
        },
    )
    .await;
    let mut survivor = replica(&db.url, "survivor", &settings);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Its runs: leases with a runs row (a slot it claimed ahead of its instant has none
    // yet; the survivor fires those once their lease ends).
    let in_flight: Vec<Uuid> = sqlx::query_scalar(
        "SELECT l.run_id FROM agentd.leases l JOIN runs r ON r.id = l.run_id \
          WHERE l.worker_id = 'victim'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    kill(victim.pid(), Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    let _ = victim.wait_exit(Duration::from_secs(5));

    let listed = in_flight
        .iter()
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(",");
    // Every run the victim held ends failed as "worker lost" (one that completed in the
    // instant between listing and killing is fine too).
    eventually(Duration::from_secs(6), "the victim's runs failed as worker lost", || async {
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM runs WHERE id = ANY('{{{listed}}}') \
                  AND (status = 'completed' OR (status = 'failed' AND error LIKE 'worker lost: victim %'))"
            ),
        )
        .await
            == in_flight.len() as i64
    })
    .await;
    let lost = count(
        &db.pool,
        &format!("SELECT count(*) FROM runs WHERE id = ANY('{{{listed}}}') AND status = 'failed'"),
    )
    .await;
    assert!(
        lost >= 4,
        "only {lost} of {} runs in flight were lost",
        in_flight.len()
    );
    assert!(
        killed_at.elapsed() <= Duration::from_secs(3) + Duration::from_millis(700),
        "reaped after {:?}, lease TTL is 3 s",
        killed_at.elapsed()
    );
    // The survivor keeps firing every schedule.
    let fired_after_kill = || async {
        count(
            &db.pool,
            "SELECT count(DISTINCT input->>'schedule_id') FROM runs r JOIN agentd.schedule_fires f ON f.run_id = r.id \
              WHERE f.fired_at > now() - interval '4 seconds'",
        )
        .await
    };
    eventually(
        Duration::from_secs(10),
        "all 20 schedules fire on the survivor",
        || async { fired_after_kill().await == 20 },
    )
    .await;
    stop_all(std::slice::from_mut(&mut survivor));
    assert_eq!(duplicate_slots(&db.pool).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_paused_past_its_lease_writes_nothing_more_to_its_runs() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let settings = [
        ("AGENTD__LEASE__TTL", "2s"),
        ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "2s"),
    ];
    let mut paused = replica(&db.url, "paused", &settings);
    paused.wait_for("worker started", Duration::from_secs(20));
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(
            agentd::store::runs::request_run(
                &db.pool,
                agentd::store::runs::RunKind::Agent,
                agent,
                None,
            )
            .await
            .unwrap(),
        );
    }
    let ids = runs
        .iter()
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let lines = || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM run_logs WHERE run_id = ANY('{{{ids}}}')"),
        )
        .await
    };
    eventually(
        Duration::from_secs(5),
        "each run wrote its first line",
        || async { lines().await == 3 },
    )
    .await;

    kill(paused.pid(), Signal::SIGSTOP).unwrap();
    let reaper = replica(&db.url, "reaper", &settings);
    eventually(Duration::from_secs(8), "the paused replica's runs were reaped", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE id = ANY('{{{ids}}}') AND status = 'failed' AND error LIKE 'worker lost: paused %'"),
        )
        .await
            == 3
    })
    .await;
    let lines_at_reap = lines().await;
    kill(paused.pid(), Signal::SIGCONT).unwrap();
    // Its executors wake up and go on for another ~4 s, trying to log and to complete.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        lines().await,
        lines_at_reap,
        "the paused replica wrote log lines after losing its lease"
    );
    assert_eq!(
        count(&db.pool, &format!("SELECT count(*) FROM runs WHERE id = ANY('{{{ids}}}') AND status = 'failed' AND error LIKE 'worker lost%'")).await,
        3,
        "the paused replica overwrote an outcome"
    );
    let abandoned = paused
        .drain()
        .iter()
        .filter(|line| {
            line.contains("abandon") || line.contains("lease lost") || line.contains("refused")
        })
        .count();
    assert!(
        abandoned > 0,
        "the paused replica never noticed: {:#?}",
        paused.seen
    );
    stop_all(&mut [paused, reaper]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_claiming_lets_runs_finish_and_exits_zero() {
    let db = TestDb::migrated().await;
    cron_schedules(&db.pool, 10, "* * * * * *").await;
    let mut daemon = replica(
        &db.url,
        "r1",
        &[("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "1s")],
    );
    eventually(Duration::from_secs(10), "runs in flight", || async {
        count(&db.pool, RUNS_IN_FLIGHT).await >= 5
    })
    .await;
    let signalled_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let late = count(
        &db.pool,
        &format!("SELECT count(*) FROM runs WHERE start_time > '{}'::timestamptz + interval '200 milliseconds'", signalled_at.to_rfc3339()),
    )
    .await;
    assert_eq!(late, 0, "runs were claimed after SIGTERM");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status <> 'completed'"
        )
        .await,
        0,
        "in-flight runs must complete"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.leases").await,
        0
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.workers").await,
        0
    );

    // With a grace shorter than the runs, they are cancelled and recorded as such.
    let mut daemon = replica(
        &db.url,
        "r2",
        &[
            ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "10s"),
            ("AGENTD__SHUTDOWN__GRACE", "1s"),
        ],
    );
    eventually(Duration::from_secs(10), "runs in flight", || async {
        count(&db.pool, RUNS_IN_FLIGHT).await >= 5
    })
    .await;
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    assert!(
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status = 'failed' AND error = 'worker shutting down'"
        )
        .await
            >= 5
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status = 'running'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.leases").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_recover_from_a_postgresql_restart_without_duplicates() {
    let folder = tempfile::tempdir().unwrap();
    let (options, server, url) = private_server(folder.path()).await;
    let pool = server_pool(&server).await;
    let user = create_user(&pool).await;
    let agent = create_agent(&pool, user).await;
    pool.close().await;

    // A run in flight across the outage (it logs before, during and after), on a replica
    // started alone so that it is the one to claim it, with room for that run only.
    let mut slow = replica(
        &url,
        "slow",
        &[
            ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "2s"),
            ("AGENTD__DATABASE__MAX_BACKOFF", "1s"),
            ("AGENTD__WORKER__CONCURRENCY", "1"),
            // See the overlap note below: this replica claims too once its run is done.
            ("AGENTD__SCHEDULER__OVERLAP_POLICY", "allow"),
        ],
    );
    slow.wait_for("worker started", Duration::from_secs(10));
    let pool = server_pool(&server).await;
    let request =
        agentd::store::runs::request_run(&pool, agentd::store::runs::RunKind::Agent, agent, None)
            .await
            .unwrap();
    eventually(
        Duration::from_secs(5),
        "the request's first line",
        || async {
            count(
                &pool,
                &format!("SELECT count(*) FROM run_logs WHERE run_id = '{request}'"),
            )
            .await
                >= 1
        },
    )
    .await;
    cron_schedules(&pool, 10, "* * * * * *").await;
    // Overlap allowed: a run cut off by the outage may hold its lease for a moment after the
    // restart, and the skip policy would (rightly) fire nothing for its schedule then; this
    // test is about coalescing the slots missed during the outage.
    let settings = [
        ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "0s"),
        ("AGENTD__DATABASE__MAX_BACKOFF", "1s"),
        ("AGENTD__SCHEDULER__OVERLAP_POLICY", "allow"),
    ];
    let mut replicas = vec![
        replica(&url, "r1", &settings),
        replica(&url, "r2", &settings),
    ];
    replicas[0].wait_for("schedule fired", Duration::from_secs(10));
    pool.close().await;

    server.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let server = EmbeddedPostgres::start(&options).await.unwrap();
    let pool = server_pool(&server).await;
    let restarted_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let fired_again = || async {
        count(
            &pool,
            &format!(
                "SELECT count(DISTINCT input->>'schedule_id') FROM runs WHERE input->>'trigger' = 'schedule' \
                  AND start_time > '{}'::timestamptz + interval '2 seconds'",
                restarted_at.to_rfc3339()
            ),
        )
        .await
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while fired_again().await < 10 {
        if Instant::now() > deadline {
            let state: Vec<(String, Option<String>, bool)> = sqlx::query_as(
                "SELECT s.id::text, s.next_run::text, s.enabled FROM agent_schedules s ORDER BY 1",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            let leases: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT run_id::text, worker_id, expires_at::text FROM agentd.leases",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            for daemon in replicas.iter_mut().chain(std::iter::once(&mut slow)) {
                let lines = daemon.drain().to_vec();
                eprintln!(
                    "--- replica log tail:\n{}",
                    lines
                        .iter()
                        .filter(|line| !line.contains("slot skipped"))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            panic!(
                "not every schedule fired again after the restart: {state:#?} leases {leases:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(
        Duration::from_secs(10),
        "the run in flight completed with all its lines",
        || async {
            count(
                &pool,
                &format!(
                    "SELECT count(*) FROM runs WHERE id = '{request}' AND status = 'completed'"
                ),
            )
            .await
                == 1
        },
    )
    .await;
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM run_logs WHERE run_id = '{request}'")
        )
        .await,
        3
    );
    replicas.push(slow);
    stop_all(&mut replicas);

    assert_eq!(duplicate_slots(&pool).await, 0);
    let coalesced = count(
        &pool,
        "SELECT count(*) FROM runs WHERE (input->>'missed')::int > 0",
    )
    .await;
    let timeline: Vec<(String, String, String)> = sqlx::query_as("SELECT input->>'scheduled_for', input->>'missed', start_time::text FROM runs WHERE input->>'trigger' = 'schedule' ORDER BY start_time").fetch_all(&pool).await.unwrap();
    if coalesced == 0 {
        for daemon in replicas.iter_mut() {
            let lines = daemon.drain().to_vec();
            eprintln!("--- replica log:\n{}", lines.join("\n"));
        }
    }
    assert!(
        coalesced >= 1,
        "the slots missed during the outage were not coalesced: {timeline:#?}"
    );
    pool.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_report_an_invalid_row_once_and_fire_the_valid_ones() {
    let db = TestDb::migrated().await;
    cron_schedules(&db.pool, 5, "* * * * * *").await;
    let agent: Uuid = sqlx::query_scalar("SELECT agent_id FROM agent_schedules LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for (zone, time) in [("Mars/Olympus", "09:00"), ("UTC", "99:99")] {
        sqlx::query(
            "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) \
             VALUES ($1, true, 'daily', 1, $2, $3)",
        )
        .bind(agent)
        .bind(time)
        .bind(zone)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let mut replicas = vec![replica(&db.url, "r1", &[]), replica(&db.url, "r2", &[])];
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop_all(&mut replicas);

    let reports: Vec<String> =
        sqlx::query_scalar("SELECT error FROM runs WHERE status = 'failed' ORDER BY error")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        reports,
        [
            "invalid schedule: time: \"99:99\" is not a time of day (HH:MM or HH:MM:SS, 24-hour)",
            "invalid schedule: timezone: unknown time zone \"Mars/Olympus\"",
        ]
    );
    let warnings = replicas
        .iter_mut()
        .flat_map(|daemon| daemon.drain().to_vec())
        .filter(|line| line.contains("invalid schedule; reported to its owner"))
        .count();
    assert_eq!(
        warnings, 2,
        "one warn line per invalid row, across both replicas"
    );
    let fired = count(
        &db.pool,
        "SELECT count(DISTINCT input->>'schedule_id') FROM runs WHERE status = 'completed'",
    )
    .await;
    assert_eq!(fired, 5, "the valid schedules fire on time");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_exits_at_once() {
    let db = TestDb::migrated().await;
    cron_schedules(&db.pool, 5, "* * * * * *").await;
    let mut daemon = replica(
        &db.url,
        "r1",
        &[("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "30s")],
    );
    eventually(Duration::from_secs(10), "runs in flight", || async {
        count(&db.pool, RUNS_IN_FLIGHT).await >= 1
    })
    .await;
    daemon.signal(Signal::SIGTERM);
    daemon.wait_for("shutdown requested", Duration::from_secs(5));
    let started = Instant::now();
    daemon.signal(Signal::SIGINT);
    let status = daemon.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(130));
    assert!(started.elapsed() < Duration::from_secs(2));
    // Its runs still hold leases: the reaper of another replica settles them.
    assert!(count(&db.pool, RUNS_IN_FLIGHT).await >= 1);
}
