//! Scheduling on a real database with the library's real worker services (an in-process
//! executor stands in for execution): planning and firing, edits, misfire and overlap
//! policies, the one-run-per-slot guarantee, the claim's plan on a large table, requests,
//! cancellation and fencing.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{
    InProcessWorker, SleepyExecutor, TestDb, as_user, count, create_agent, create_schedule,
    create_user, eventually, scheduled_runs,
};
use uuid::Uuid;

fn quick() -> Arc<SleepyExecutor> {
    Arc::new(SleepyExecutor {
        delay: Duration::from_millis(10),
    })
}

fn slow(delay: Duration) -> Arc<SleepyExecutor> {
    Arc::new(SleepyExecutor { delay })
}

#[tokio::test]
async fn a_new_schedule_is_planned_then_fires_runs_with_the_documented_input() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let worker = InProcessWorker::start(&db, "w1", &[], quick()).await;
    let schedule = create_schedule(&db.pool, agent, "cron", Some("* * * * * *"), "UTC").await;

    eventually(Duration::from_secs(10), "two completed runs", || async {
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status = 'completed'",
        )
        .await
            >= 2
    })
    .await;
    worker.stop().await;

    let (run_type, target, owner, input, output, duration): (
        String,
        Uuid,
        Uuid,
        serde_json::Value,
        serde_json::Value,
        i32,
    ) = sqlx::query_as(
        "SELECT type, target_id, triggered_by_id, input, output, duration FROM runs \
             WHERE status = 'completed' ORDER BY start_time LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((run_type.as_str(), target, owner), ("agent", agent, user));
    assert_eq!(input["trigger"], "schedule");
    assert_eq!(input["schedule_id"], schedule.to_string());
    assert_eq!(input["missed"], 0);
    let scheduled_for: chrono::DateTime<chrono::Utc> =
        input["scheduled_for"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        scheduled_for.timestamp_subsec_nanos(),
        0,
        "slots are whole seconds"
    );
    assert_eq!(output["slept_ms"], 10);
    assert!(duration >= 10, "duration {duration} ms");

    let (last_run, next_run): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT last_run, next_run FROM agent_schedules WHERE id = $1")
            .bind(schedule)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(next_run > last_run);
    // Each run streamed its two log lines, in order, and released its lease.
    let lines: Vec<String> = sqlx::query_scalar(
        "SELECT message FROM run_logs WHERE run_id = (SELECT id FROM runs ORDER BY start_time LIMIT 1) \
         ORDER BY timestamp, id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(lines, ["working", "done"]);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.leases").await,
        0
    );
}

#[tokio::test]
async fn editing_a_definition_recomputes_next_run_unless_the_edit_sets_it() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let worker = InProcessWorker::start(&db, "w1", &[], quick()).await;
    let schedule = create_schedule(&db.pool, agent, "daily", Some("09:00"), "UTC").await;
    let next_run = || async {
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
            "SELECT next_run FROM agent_schedules WHERE id = $1",
        )
        .bind(schedule)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    eventually(Duration::from_secs(5), "next_run planned", || async {
        next_run().await.is_some()
    })
    .await;
    assert_eq!(
        next_run().await.unwrap().format("%H:%M").to_string(),
        "09:00"
    );

    sqlx::query("UPDATE agent_schedules SET time = '10:30' WHERE id = $1")
        .bind(schedule)
        .execute(&db.pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "next_run replanned at 10:30",
        || async {
            next_run()
                .await
                .is_some_and(|t| t.format("%H:%M").to_string() == "10:30")
        },
    )
    .await;

    // The application may set next_run itself in the same statement: it wins.
    let explicit: chrono::DateTime<chrono::Utc> = "2099-01-01T00:00:00Z".parse().unwrap();
    sqlx::query("UPDATE agent_schedules SET time = '11:00', next_run = $2 WHERE id = $1")
        .bind(schedule)
        .bind(explicit)
        .execute(&db.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(next_run().await, Some(explicit));
    worker.stop().await;
}

#[tokio::test]
async fn a_schedule_planned_while_a_later_one_waits_fires_on_time() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    // A schedule due tomorrow: an idle worker sleeps for it, up to the poll interval (60 s).
    sqlx::query(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone, next_run) \
         VALUES ($1, true, 'daily', 1, '09:00', 'UTC', now() + interval '1 day')",
    )
    .bind(agent)
    .execute(&db.pool)
    .await
    .unwrap();
    let worker = InProcessWorker::start(&db, "w1", &[], quick()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A new schedule whose first slot is a few seconds away, sooner than the one the
    // worker sleeps for: planning it is the worker's own write, which wakes nobody.
    let now: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let at = chrono::SubsecRound::trunc_subsecs(now + chrono::Duration::seconds(4), 0);
    let cron = at.format("%S %M %H * * *").to_string();
    let schedule = create_schedule(&db.pool, agent, "cron", Some(&cron), "UTC").await;
    eventually(
        Duration::from_secs(10),
        "the new schedule's first slot fires",
        || async {
            count(
                &db.pool,
                &format!(
                    "SELECT count(*) FROM runs WHERE input->>'schedule_id' = '{schedule}' \
                      AND input->>'scheduled_for' = '{}'",
                    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
            )
            .await
                == 1
        },
    )
    .await;
    let start_time: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT start_time FROM runs WHERE input->>'schedule_id' = $1")
            .bind(schedule.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        start_time - at < chrono::Duration::seconds(2),
        "started at {start_time}, {} after its slot",
        start_time - at
    );
    worker.stop().await;
}

#[tokio::test]
async fn invalid_rows_are_reported_once_per_definition_and_never_block_the_others() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let bad_zone = create_schedule(&db.pool, agent, "daily", Some("09:00"), "Mars/Olympus").await;
    let bad_cron = create_schedule(&db.pool, agent, "cron", Some("0 0 30 2 *"), "UTC").await;
    let bad_days = create_schedule(&db.pool, agent, "daily", Some("09:00"), "UTC").await;
    sqlx::query("UPDATE agent_schedules SET days = '{1,NULL}' WHERE id = $1")
        .bind(bad_days)
        .execute(&db.pool)
        .await
        .unwrap();
    let good = create_schedule(&db.pool, agent, "cron", Some("* * * * * *"), "UTC").await;
    let worker = InProcessWorker::start(&db, "w1", &[], quick()).await;

    eventually(Duration::from_secs(10), "the valid schedule fires three times", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE status = 'completed' AND input->>'schedule_id' = '{good}'"),
        )
        .await
            >= 3
    })
    .await;
    let reports: Vec<(String, String)> = sqlx::query_as(
        "SELECT input->>'schedule_id', error FROM runs WHERE status = 'failed' ORDER BY error",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        reports,
        vec![
            (
                bad_days.to_string(),
                "invalid schedule: days: NULL is not a weekday (expected 0…7)".to_string()
            ),
            (
                bad_cron.to_string(),
                "invalid schedule: time: cron expression \"0 0 30 2 *\" never fires".to_string()
            ),
            (
                bad_zone.to_string(),
                "invalid schedule: timezone: unknown time zone \"Mars/Olympus\"".to_string()
            ),
        ]
    );

    // Fixing the definition makes the row count again.
    sqlx::query("UPDATE agent_schedules SET timezone = 'UTC', frequency = 'cron', time = '* * * * * *' WHERE id = $1")
        .bind(bad_zone)
        .execute(&db.pool)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the fixed schedule fires", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE status = 'completed' AND input->>'schedule_id' = '{bad_zone}'"),
        )
        .await
            >= 1
    })
    .await;
    worker.stop().await;
    // Still one report each: not retried every poll.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status = 'failed'"
        )
        .await,
        3
    );
}

/// A `minutely` schedule whose next_run the application set 10 minutes in the past.
async fn overdue_schedule(db: &TestDb) -> Uuid {
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    sqlx::query_scalar(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, timezone, created_at, next_run) \
         VALUES ($1, true, 'minutely', 1, 'UTC', date_trunc('minute', now()) - interval '1 day', \
                 date_trunc('minute', now()) - interval '10 minutes') RETURNING id",
    )
    .bind(agent)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn misfire_coalesce_fires_one_run_counting_the_missed_slots() {
    let db = TestDb::migrated().await;
    let schedule = overdue_schedule(&db).await;
    let worker = InProcessWorker::start(&db, "w1", &[], quick()).await;
    eventually(Duration::from_secs(10), "one run", || async {
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status = 'completed'",
        )
        .await
            == 1
    })
    .await;
    worker.stop().await;
    let runs = scheduled_runs(&db.pool).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    let (id, scheduled_for, _, _, missed) = &runs[0];
    assert_eq!(id, &schedule.to_string());
    // The latest slot <= now fired; the ten before it (from the stored next_run on) were missed.
    assert!((10..=11).contains(missed), "missed {missed}");
    let scheduled_for: chrono::DateTime<chrono::Utc> = scheduled_for.parse().unwrap();
    assert!(chrono::Utc::now() - scheduled_for < chrono::Duration::seconds(70));
}

#[tokio::test]
async fn misfire_skip_fires_nothing_and_only_advances() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    // Daily at the wall time of two hours ago: the latest slot <= now is always at least two
    // hours late, whenever the test runs (a minutely rule's latest slot can be a few
    // milliseconds old, i.e. on time).
    let schedule: Uuid = sqlx::query_scalar(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone, created_at, next_run) \
         VALUES ($1, true, 'daily', 1, to_char(now() AT TIME ZONE 'UTC' - interval '2 hours', 'HH24:MI'), 'UTC', \
                 now() - interval '3 days', date_trunc('minute', now() - interval '2 hours')) RETURNING id",
    )
    .bind(agent)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let worker = InProcessWorker::start(
        &db,
        "w1",
        &[
            ("AGENTD__SCHEDULER__MISFIRE_POLICY", "skip"),
            ("AGENTD__SCHEDULER__MISFIRE_GRACE", "1s"),
        ],
        quick(),
    )
    .await;
    eventually(Duration::from_secs(10), "next_run advanced into the future", || async {
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM agent_schedules WHERE id = '{schedule}' \
                 AND next_run > now() + interval '21 hours' AND next_run < now() + interval '23 hours'"
            ),
        )
        .await
            == 1
    })
    .await;
    worker.stop().await;
    let runs = scheduled_runs(&db.pool).await;
    assert!(runs.is_empty(), "the misfired slot ran: {runs:?}");
}

#[tokio::test]
async fn overlap_skip_never_runs_a_schedule_twice_at_once_and_allow_does() {
    for (policy, expect_overlap) in [("skip", false), ("allow", true)] {
        let db = TestDb::migrated().await;
        let user = create_user(&db.pool).await;
        let agent = create_agent(&db.pool, user).await;
        create_schedule(&db.pool, agent, "cron", Some("* * * * * *"), "UTC").await;
        let worker = InProcessWorker::start(
            &db,
            "w1",
            &[("AGENTD__SCHEDULER__OVERLAP_POLICY", policy)],
            slow(Duration::from_millis(2500)),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(5500)).await;
        worker.stop().await;
        // Runs overlap when one started before the previous one ended.
        let overlapping = count(
            &db.pool,
            "SELECT count(*) FROM runs a JOIN runs b ON a.id <> b.id \
              AND b.start_time > a.start_time AND b.start_time < a.end_time",
        )
        .await;
        assert_eq!(
            overlapping > 0,
            expect_overlap,
            "policy {policy}: {overlapping} overlaps"
        );
        let runs = count(&db.pool, "SELECT count(*) FROM runs").await;
        if expect_overlap {
            assert!(runs >= 4, "allow: {runs} runs");
        } else {
            assert!((1..=3).contains(&runs), "skip: {runs} runs");
        }
    }
}

#[tokio::test]
async fn the_database_itself_refuses_a_second_run_for_a_slot() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let schedule = create_schedule(&db.pool, agent, "daily", Some("00:00"), "UTC").await;
    // The unique key, whatever the locking does.
    let slot: chrono::DateTime<chrono::Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
    let insert = "INSERT INTO agentd.schedule_fires (schedule_id, scheduled_for, run_id) VALUES ($1, $2, gen_random_uuid())";
    sqlx::query(insert)
        .bind(schedule)
        .bind(slot)
        .execute(&db.pool)
        .await
        .unwrap();
    let second = sqlx::query(insert)
        .bind(schedule)
        .bind(slot)
        .execute(&db.pool)
        .await;
    assert_eq!(
        second
            .unwrap_err()
            .as_database_error()
            .unwrap()
            .code()
            .as_deref(),
        Some("23505")
    );

    // And through the worker: when the application winds next_run back onto a slot that
    // already fired, the claim advances the schedule but creates no second run.
    let once: Uuid = sqlx::query_scalar(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, timezone, next_run) \
         VALUES ($1, true, 'once', 1, 'UTC', date_trunc('second', now()) - interval '1 second') RETURNING id",
    )
    .bind(agent)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let fired_slot: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT next_run FROM agent_schedules WHERE id = $1")
            .bind(once)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let worker = InProcessWorker::start(&db, "w1", &[], quick()).await;
    let once_runs = || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE input->>'schedule_id' = '{once}'"),
        )
        .await
    };
    eventually(
        Duration::from_secs(10),
        "the once schedule fired",
        || async { once_runs().await == 1 },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "once keeps next_run NULL after firing",
        || async {
            count(
                &db.pool,
                &format!(
                    "SELECT count(*) FROM agent_schedules WHERE id = '{once}' AND next_run IS NULL"
                ),
            )
            .await
                == 1
        },
    )
    .await;
    sqlx::query("UPDATE agent_schedules SET next_run = $2 WHERE id = $1")
        .bind(once)
        .bind(fired_slot)
        .execute(&db.pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "the wound-back schedule was claimed",
        || async {
            count(
                &db.pool,
                &format!(
                    "SELECT count(*) FROM agent_schedules WHERE id = '{once}' AND next_run IS NULL"
                ),
            )
            .await
                == 1
        },
    )
    .await;
    worker.stop().await;
    assert_eq!(once_runs().await, 1, "a slot fired twice");
}

#[tokio::test]
async fn the_claim_is_an_index_scan_on_100k_schedules_with_few_due() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    sqlx::query(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone, next_run) \
         SELECT $1, true, 'daily', 1, '09:00', 'UTC', \
                CASE WHEN g <= 10 THEN now() - interval '1 minute' ELSE now() + interval '1 hour' + g * interval '1 second' END \
           FROM generate_series(1, 100000) g",
    )
    .bind(agent)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE agent_schedules")
        .execute(&db.pool)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN {}",
        agentd::store::schedules::LOCK_SCHEDULES_SQL
            .replace("$1", "100")
            .replace("$2", "2000")
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using agentd_agent_schedules_due"),
        "the due part must use the partial index:\n{plan}"
    );
    assert!(
        !plan.contains("Seq Scan on agent_schedules"),
        "no sequential scan of the schedules:\n{plan}"
    );
}

/// The claim reads `days` in every shape the column can hold: NULL and empty arrays are
/// "no weekdays given", one-dimensional arrays pass as they are, arrays of more dimensions
/// are flattened, and NULL elements are flagged (the row is then reported invalid) without
/// making the claim fail.
#[tokio::test]
async fn the_claim_reads_days_of_every_shape() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let cases: [(&str, Option<Vec<i32>>, bool); 7] = [
        ("NULL", None, false),
        ("'{}'", None, false),
        ("'{1,3,5}'", Some(vec![1, 3, 5]), false),
        ("'[0:1]={2,4}'", Some(vec![2, 4]), false),
        ("'{1,NULL}'", Some(vec![1]), true),
        ("'{{1,2},{3,4}}'", Some(vec![1, 2, 3, 4]), false),
        ("'{{1},{NULL}}'", Some(vec![1]), true),
    ];
    let mut ids = Vec::new();
    for (days, _, _) in &cases {
        let id = create_schedule(&db.pool, agent, "daily", Some("09:00"), "UTC").await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE agent_schedules SET days = {days}::integer[], next_run = now() - interval '1 minute' WHERE id = $1"
        )))
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
        ids.push(id);
    }
    let mut claim = agentd::store::schedules::ClaimTransaction::begin(&db.pool)
        .await
        .unwrap();
    let (_, rows) = claim
        .lock_schedules(100, std::time::Duration::ZERO)
        .await
        .unwrap();
    claim.rollback().await.unwrap();
    assert_eq!(rows.len(), cases.len());
    for ((days, expected, has_null), id) in cases.iter().zip(&ids) {
        let row = rows.iter().find(|row| row.id == *id).unwrap();
        assert_eq!(&row.spec.days, expected, "days = {days}");
        assert_eq!(
            row.defect.as_deref() == Some("days: NULL is not a weekday (expected 0…7)"),
            *has_null,
            "days = {days}"
        );
    }
}

#[tokio::test]
async fn request_run_as_a_signed_in_user_only_for_their_own_agents_and_teams() {
    let db = TestDb::migrated().await;
    let alice = create_user(&db.pool).await;
    let bob = create_user(&db.pool).await;
    let alices_agent = create_agent(&db.pool, alice).await;
    let bobs_agent = create_agent(&db.pool, bob).await;
    let alices_team: Uuid = sqlx::query_scalar(
        "INSERT INTO teams (name, type, user_id) VALUES ('t', 'route', $1) RETURNING id",
    )
    .bind(alice)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO team_agents (team_id, agent_id, position) VALUES ($1, $2, 1)")
        .bind(alices_team)
        .bind(alices_agent)
        .execute(&db.pool)
        .await
        .unwrap();
    let worker = InProcessWorker::start(
        &db,
        "w1",
        &[("AGENTD__SCHEDULER__POLL_INTERVAL", "1h")],
        quick(),
    )
    .await;

    let started = std::time::Instant::now();
    let run_id: Uuid = as_user(
        &db.pool,
        alice,
        &format!("SELECT public.request_run('agent', '{alices_agent}', '{{\"topic\":\"x\"}}')"),
    )
    .await
    .unwrap();
    // Picked up through NOTIFY: the poll interval is an hour.
    eventually(
        Duration::from_secs(3),
        "the requested run completes",
        || async {
            count(
                &db.pool,
                &format!(
                    "SELECT count(*) FROM runs WHERE id = '{run_id}' AND status = 'completed'"
                ),
            )
            .await
                == 1
        },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    let (owner, input): (Uuid, serde_json::Value) =
        sqlx::query_as("SELECT triggered_by_id, input FROM runs WHERE id = $1")
            .bind(run_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(owner, alice);
    assert_eq!(input, serde_json::json!({"topic": "x"}));

    let team_run: Uuid = as_user(
        &db.pool,
        alice,
        &format!("SELECT public.request_run('team', '{alices_team}')"),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(3), "the team run completes", || async {
        count(&db.pool, &format!("SELECT count(*) FROM runs WHERE id = '{team_run}' AND type = 'team' AND status = 'completed'")).await == 1
    })
    .await;

    let refused = as_user::<Uuid>(
        &db.pool,
        alice,
        &format!("SELECT public.request_run('agent', '{bobs_agent}')"),
    )
    .await;
    let error = refused.unwrap_err();
    let error = error.as_database_error().unwrap();
    assert_eq!(error.code().as_deref(), Some("42501"));
    assert_eq!(
        error.message(),
        format!("request_run: no agent {bobs_agent} that you own")
    );
    let bad_type = as_user::<Uuid>(
        &db.pool,
        alice,
        &format!("SELECT public.request_run('robot', '{alices_agent}')"),
    )
    .await;
    assert!(
        bad_type
            .unwrap_err()
            .to_string()
            .contains("target_type must be 'agent' or 'team'")
    );

    // anon may not call it at all.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE anon")
        .execute(&mut *tx)
        .await
        .unwrap();
    let anon = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT public.request_run('agent', '{alices_agent}')"
    )))
    .execute(&mut *tx)
    .await;
    assert!(anon.unwrap_err().to_string().contains("permission denied"));
    drop(tx);
    worker.stop().await;
}

#[tokio::test]
async fn cancel_run_stops_a_long_run_for_its_owner_only() {
    let db = TestDb::migrated().await;
    let alice = create_user(&db.pool).await;
    let bob = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, alice).await;
    let worker = InProcessWorker::start(&db, "w1", &[], slow(Duration::from_secs(60))).await;
    let run_id: Uuid = as_user(
        &db.pool,
        alice,
        &format!("SELECT public.request_run('agent', '{agent}')"),
    )
    .await
    .unwrap();
    support::wait_running(
        &db.pool,
        run_id,
        Duration::from_secs(5),
        "the run is running",
    )
    .await;
    let by_bob: bool = as_user(
        &db.pool,
        bob,
        &format!("SELECT public.cancel_run('{run_id}')"),
    )
    .await
    .unwrap();
    assert!(!by_bob, "someone else cannot cancel the run");
    let by_alice: bool = as_user(
        &db.pool,
        alice,
        &format!("SELECT public.cancel_run('{run_id}')"),
    )
    .await
    .unwrap();
    assert!(by_alice);
    eventually(Duration::from_secs(3), "the run failed as cancelled", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE id = '{run_id}' AND status = 'failed' AND error = 'cancelled'"),
        )
        .await
            == 1
    })
    .await;
    let again: bool = as_user(
        &db.pool,
        alice,
        &format!("SELECT public.cancel_run('{run_id}')"),
    )
    .await
    .unwrap();
    assert!(!again, "a finished run cannot be cancelled");
    worker.stop().await;
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_cannot_write_to_the_run_any_more() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let worker = InProcessWorker::start(
        &db,
        "w1",
        &[("AGENTD__LEASE__TTL", "3s")],
        slow(Duration::from_secs(6)),
    )
    .await;
    let run_id = agentd::store::runs::request_run(
        &db.pool,
        agentd::store::runs::RunKind::Agent,
        agent,
        None,
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(5),
        "the run wrote its first line",
        || async {
            count(
                &db.pool,
                &format!("SELECT count(*) FROM run_logs WHERE run_id = '{run_id}'"),
            )
            .await
                == 1
        },
    )
    .await;
    // Another replica reaps the run as if this worker had been cut off: the lease is
    // ended and the run failed.
    sqlx::query(
        "UPDATE agentd.leases SET expires_at = now() - interval '1 second' WHERE run_id = $1",
    )
    .bind(run_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let reaped = agentd::store::workers::reap_expired_leases(&db.pool, 10)
        .await
        .unwrap();
    assert_eq!(reaped.len(), 1);
    // The worker's executor goes on and finishes after 6 s; its "done" line and its
    // "completed" outcome must both be refused.
    tokio::time::sleep(Duration::from_secs(7)).await;
    worker.stop().await;
    let (status, error): (String, String) =
        sqlx::query_as("SELECT status, error FROM runs WHERE id = $1")
            .bind(run_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(
        error.starts_with("worker lost: w1 stopped renewing its lease"),
        "{error}"
    );
    assert_eq!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM run_logs WHERE run_id = '{run_id}'")
        )
        .await,
        1,
        "no line may be written after the lease was lost"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runs_slot_is_free_while_its_outcome_is_still_being_written() {
    // One slot. Run A's outcome cannot be written (its row is locked by the test): with the
    // slot given back when A's executor ended, run B is claimed and runs meanwhile.
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let worker = InProcessWorker::start(
        &db,
        "w1",
        &[("AGENTD__WORKER__CONCURRENCY", "1")],
        slow(Duration::from_millis(500)),
    )
    .await;
    let a = support::request_agent_run(&db.pool, agent).await;
    support::wait_running(&db.pool, a, Duration::from_secs(10), "run A runs").await;
    let mut lock = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE")
        .bind(a)
        .execute(&mut *lock)
        .await
        .unwrap();
    let b = support::request_agent_run(&db.pool, agent).await;
    // B is claimed and executes (its first log line stored) while A's outcome waits for
    // the lock.
    support::eventually(Duration::from_secs(10), "run B runs", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM run_logs WHERE run_id = '{b}' AND message = 'working'"),
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE id = '{a}' AND status = 'running'"),
        )
        .await,
        1,
        "A's outcome was written through the lock"
    );
    lock.rollback().await.unwrap();
    let a_run = support::finished_run(&db.pool, a, Duration::from_secs(20)).await;
    let b_run = support::finished_run(&db.pool, b, Duration::from_secs(20)).await;
    worker.stop().await;
    assert_eq!(a_run.status, "completed");
    assert_eq!(b_run.status, "completed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_another_claim_held_and_let_go_runs_without_a_new_notification() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    // A claim of another replica holds the request while the worker looks, then ends
    // without committing (as when that replica dies mid-claim): nothing notifies again.
    let held = support::request_agent_run(&db.pool, agent).await;
    let mut claim = db.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM agentd.requests WHERE id = $1 FOR UPDATE")
        .bind(held)
        .fetch_one(&mut *claim)
        .await
        .unwrap();
    let worker = InProcessWorker::start(&db, "w1", &[], quick()).await;
    let woken = support::request_agent_run(&db.pool, agent).await;
    support::finished_run(&db.pool, woken, Duration::from_secs(10)).await;
    claim.rollback().await.unwrap();
    let run = support::finished_run(&db.pool, held, Duration::from_secs(10)).await;
    assert_eq!(run.status, "completed");
    worker.stop().await;
}
