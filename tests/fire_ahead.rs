//! Fire-ahead claiming (`scheduler.fire_ahead`): slots are claimed before their instant and
//! their runs created at it, and every guarantee of a claim at the instant still holds: one
//! run per slot across replicas, a real start time, nothing fired for a schedule edited,
//! disabled or deleted before the instant, nothing lost when the claiming replica dies or
//! stops, and no run from a replica whose lease was lost.

mod support;

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Timelike, Utc};
use nix::sys::signal::Signal;
use support::{InProcessWorker, TestDb, as_user, count, create_agent, create_user, eventually};
use uuid::Uuid;

/// A whole second `lead` or a little more from now, as the database sees it.
async fn instant_in(db: &TestDb, lead: Duration) -> DateTime<Utc> {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    (now + chrono::Duration::from_std(lead).unwrap()).trunc_subsecs(0)
        + chrono::Duration::seconds(1)
}

/// `n` schedules of `agent` firing every day at `at`'s time of day (UTC, to the second),
/// with `next_run` at `at`.
async fn schedules_at(db: &TestDb, agent: Uuid, n: i64, at: DateTime<Utc>) -> Vec<Uuid> {
    let cron = format!("{} {} {} * * *", at.second(), at.minute(), at.hour());
    sqlx::query_scalar(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone, next_run) \
         SELECT $1, true, 'cron', 1, $2, 'UTC', $3 FROM generate_series(1, $4) RETURNING id",
    )
    .bind(agent)
    .bind(cron)
    .bind(at)
    .bind(n)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn now(db: &TestDb) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Runs of the slot `at`: (schedule_id, run id, start_time, status).
async fn runs_for(db: &TestDb, at: DateTime<Utc>) -> Vec<(Uuid, Uuid, DateTime<Utc>, String)> {
    sqlx::query_as(
        "SELECT (input->>'schedule_id')::uuid, id, start_time, status FROM runs \
          WHERE input->>'trigger' = 'schedule' AND (input->>'scheduled_for')::timestamptz = $1 \
          ORDER BY 1",
    )
    .bind(at)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn wait_claimed_ahead(db: &TestDb, n: i64, at: DateTime<Utc>) {
    eventually(
        Duration::from_secs(10),
        "the slots claimed ahead",
        || async { count(&db.pool, "SELECT count(*) FROM agentd.ahead_fires").await == n },
    )
    .await;
    assert!(
        now(db).await < at,
        "the slots were claimed only at their instant"
    );
    assert_eq!(
        runs_for(db, at).await.len(),
        0,
        "no runs row before the instant"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slots_claimed_ahead_start_at_their_instant_once_across_three_replicas() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let settings = [("AGENTD__SCHEDULER__FIRE_AHEAD", "4s")];
    let mut workers = Vec::new();
    for id in ["w1", "w2", "w3"] {
        workers.push(InProcessWorker::start_configured(&db, id, &settings).await);
    }
    let at = instant_in(&db, Duration::from_secs(3)).await;
    let schedules = schedules_at(&db, agent, 60, at).await;
    wait_claimed_ahead(&db, 60, at).await;
    // Every slot is recorded once and leased to the replica that claimed it.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM agentd.schedule_fires f \
               JOIN agentd.leases l ON l.run_id = f.run_id"
        )
        .await,
        60
    );
    eventually(Duration::from_secs(20), "every run completed", || async {
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status = 'completed'",
        )
        .await
            == 60
    })
    .await;
    let runs = runs_for(&db, at).await;
    assert_eq!(runs.len(), 60, "one run per slot");
    let mut fired: Vec<Uuid> = runs.iter().map(|run| run.0).collect();
    fired.dedup();
    assert_eq!(fired.len(), 60, "no slot fired twice");
    let mut expected = schedules.clone();
    expected.sort();
    assert_eq!(fired, expected);
    for (_, _, start_time, _) in &runs {
        assert!(
            *start_time >= at,
            "a run's start_time is its real start, at or after the instant: {start_time} < {at}"
        );
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.ahead_fires").await,
        0
    );
    // The schedules moved on to tomorrow's slot, and the runs' ids are the slots' records.
    assert_eq!(
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM agent_schedules \
                  WHERE next_run = '{}'::timestamptz + interval '1 day'",
                at.to_rfc3339()
            )
        )
        .await,
        60
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM agentd.schedule_fires f JOIN runs r ON r.id = f.run_id"
        )
        .await,
        60
    );
    for worker in workers {
        worker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_disabled_edited_or_deleted_before_its_instant_does_not_fire_it() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let worker =
        InProcessWorker::start_configured(&db, "w1", &[("AGENTD__SCHEDULER__FIRE_AHEAD", "6s")])
            .await;
    let at = instant_in(&db, Duration::from_secs(4)).await;
    let schedules = schedules_at(&db, agent, 4, at).await;
    wait_claimed_ahead(&db, 4, at).await;
    // The owner changes three of them, as the application does: signed in, through RLS.
    let (disabled, edited, deleted, kept) =
        (schedules[0], schedules[1], schedules[2], schedules[3]);
    as_user::<i32>(
        &db.pool,
        user,
        &format!("UPDATE agent_schedules SET enabled = false WHERE id = '{disabled}' RETURNING 1"),
    )
    .await
    .unwrap();
    as_user::<i32>(
        &db.pool,
        user,
        &format!(
            "UPDATE agent_schedules SET frequency = 'daily', time = '03:00' \
              WHERE id = '{edited}' RETURNING 1"
        ),
    )
    .await
    .unwrap();
    as_user::<i32>(
        &db.pool,
        user,
        &format!("DELETE FROM agent_schedules WHERE id = '{deleted}' RETURNING 1"),
    )
    .await
    .unwrap();
    assert!(now(&db).await < at, "the changes came after the instant");
    // Only the slot left alone was still claimed ahead, and the changed schedules do not
    // say the slot fired.
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.ahead_fires").await,
        1
    );
    assert_eq!(
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM agent_schedules WHERE last_run IS NULL \
                  AND id IN ('{disabled}', '{edited}')"
            )
        )
        .await,
        2
    );
    eventually(
        Duration::from_secs(15),
        "the kept schedule's run",
        || async {
            count(
                &db.pool,
                "SELECT count(*) FROM runs WHERE status = 'completed'",
            )
            .await
                == 1
        },
    )
    .await;
    // Past the instant, and a little more for a late start.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs = runs_for(&db, at).await;
    assert_eq!(
        runs.iter().map(|run| run.0).collect::<Vec<_>>(),
        [kept],
        "only the unchanged schedule fired: {runs:?}"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.ahead_fires").await,
        0
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.leases").await,
        0,
        "no lease left behind"
    );
    // The edited schedule is planned from its new definition (03:00 UTC daily).
    let next_run: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT next_run FROM agent_schedules WHERE id = $1")
            .bind(edited)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let next_run = next_run.expect("the edited schedule is planned again");
    assert_eq!((next_run.hour(), next_run.minute()), (3, 0), "{next_run}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_given_another_agent_before_its_instant_fires_it_for_that_agent() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let other_agent = create_agent(&db.pool, user).await;
    let worker =
        InProcessWorker::start_configured(&db, "w1", &[("AGENTD__SCHEDULER__FIRE_AHEAD", "6s")])
            .await;
    let at = instant_in(&db, Duration::from_secs(4)).await;
    let schedules = schedules_at(&db, agent, 2, at).await;
    wait_claimed_ahead(&db, 2, at).await;
    let (moved, kept) = (schedules[0], schedules[1]);
    // The owner gives one schedule another of their agents, signed in, through RLS.
    as_user::<i32>(
        &db.pool,
        user,
        &format!(
            "UPDATE agent_schedules SET agent_id = '{other_agent}' WHERE id = '{moved}' RETURNING 1"
        ),
    )
    .await
    .unwrap();
    assert!(now(&db).await < at, "the change came after the instant");
    eventually(
        Duration::from_secs(15),
        "both schedules' runs of the slot",
        || async {
            count(
                &db.pool,
                "SELECT count(*) FROM runs WHERE status = 'completed'",
            )
            .await
                == 2
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let targets: Vec<(Uuid, Uuid, DateTime<Utc>)> = sqlx::query_as(
        "SELECT (input->>'schedule_id')::uuid, target_id, start_time FROM runs \
          WHERE input->>'trigger' = 'schedule' AND (input->>'scheduled_for')::timestamptz = $1 \
          ORDER BY (input->>'schedule_id')::uuid = $2 DESC",
    )
    .bind(at)
    .bind(moved)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        targets
            .iter()
            .map(|(schedule, target, _)| (*schedule, *target))
            .collect::<Vec<_>>(),
        [(moved, other_agent), (kept, agent)],
        "the slot fired once per schedule, the moved one's for its new agent"
    );
    for (schedule, _, start_time) in &targets {
        assert!(
            *start_time - at < chrono::Duration::seconds(2),
            "{schedule} started at {start_time}, late for {at}"
        );
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_before_the_instant_loses_no_slot() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let settings = [
        ("AGENTD__SCHEDULER__FIRE_AHEAD", "6s"),
        ("AGENTD__LEASE__TTL", "2s"),
        ("AGENTD__LOGGING__LEVEL", "info"),
    ];
    let mut victim = support::replica(&db.url, "r1", &settings);
    victim.wait_for("worker started", Duration::from_secs(30));
    let at = instant_in(&db, Duration::from_secs(4)).await;
    schedules_at(&db, agent, 10, at).await;
    wait_claimed_ahead(&db, 10, at).await;
    victim.signal(Signal::SIGKILL);
    victim.wait_exit(Duration::from_secs(10));
    // Another replica takes the slots once their lease ends (2 s after the instant).
    let mut heir = support::replica(&db.url, "r2", &settings);
    heir.wait_for("worker started", Duration::from_secs(30));
    eventually(
        Duration::from_secs(20),
        "every slot fired, late",
        || async {
            count(
                &db.pool,
                "SELECT count(*) FROM runs WHERE status = 'completed'",
            )
            .await
                == 10
        },
    )
    .await;
    let runs = runs_for(&db, at).await;
    assert_eq!(runs.len(), 10, "one run per slot: {runs:?}");
    for (_, _, start_time, _) in &runs {
        assert!(
            *start_time >= at + chrono::Duration::seconds(2),
            "fired once the lease ended (counted as lag): {start_time}"
        );
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.ahead_fires").await,
        0
    );
    heir.signal(Signal::SIGTERM);
    assert!(heir.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_stopping_before_the_instant_gives_its_slots_back() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let settings = [("AGENTD__SCHEDULER__FIRE_AHEAD", "6s")];
    let first = InProcessWorker::start_configured(&db, "w1", &settings).await;
    let at = instant_in(&db, Duration::from_secs(4)).await;
    schedules_at(&db, agent, 5, at).await;
    wait_claimed_ahead(&db, 5, at).await;
    first.stop().await;
    assert!(now(&db).await < at, "stopped after the instant");
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.ahead_fires").await,
        0
    );
    assert_eq!(
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM agent_schedules WHERE next_run = '{}'",
                at.to_rfc3339()
            )
        )
        .await,
        5,
        "the schedules wait for their slot again"
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM agent_schedules WHERE last_run IS NULL"
        )
        .await,
        5,
        "last_run no longer names the slot given back"
    );
    // The replica that takes over fires them at their instant, not late.
    let second = InProcessWorker::start_configured(&db, "w2", &[]).await;
    eventually(Duration::from_secs(15), "every slot fired", || async {
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status = 'completed'",
        )
        .await
            == 5
    })
    .await;
    let runs = runs_for(&db, at).await;
    assert_eq!(runs.len(), 5, "{runs:?}");
    for (_, _, start_time, _) in &runs {
        assert!(
            *start_time < at + chrono::Duration::seconds(2),
            "fired at its instant: {start_time}"
        );
    }
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_whose_lease_on_a_slot_ended_creates_no_run_for_it() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let worker = InProcessWorker::start_configured(
        &db,
        "w1",
        &[
            ("AGENTD__SCHEDULER__FIRE_AHEAD", "6s"),
            ("AGENTD__LEASE__TTL", "3s"),
        ],
    )
    .await;
    let at = instant_in(&db, Duration::from_secs(4)).await;
    let schedules = schedules_at(&db, agent, 2, at).await;
    wait_claimed_ahead(&db, 2, at).await;
    // One slot's lease ends before the instant (as when the replica stalled past it).
    let fenced: Uuid = sqlx::query_scalar(
        "UPDATE agentd.leases SET expires_at = now() - interval '1 second' \
          WHERE schedule_id = $1 RETURNING run_id",
    )
    .bind(schedules[0])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    eventually(Duration::from_secs(15), "both slots fired", || async {
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status = 'completed'",
        )
        .await
            == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = runs_for(&db, at).await;
    assert_eq!(runs.len(), 2, "one run per slot: {runs:?}");
    // The fenced slot was given back and fired by a claim of its own, under a new id.
    let refired = runs.iter().find(|run| run.0 == schedules[0]).unwrap();
    assert_ne!(
        refired.1, fenced,
        "the run of a slot whose lease ended was created"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.ahead_fires").await,
        0
    );
    worker.stop().await;
}

/// The application changes schedules in one transaction, row by row, while their slots
/// claimed ahead reach their instant: the start neither waits for the change (the other
/// slot's run starts while the transaction is still open) nor deadlocks with it (the
/// change's next row goes through and it commits); a change rolled back loses nothing (that
/// slot fires once its lease ends).
#[tokio::test(flavor = "multi_thread")]
async fn a_change_in_progress_at_the_instant_neither_holds_back_nor_deadlocks_the_start() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let worker = InProcessWorker::start_configured(
        &db,
        "w1",
        &[
            ("AGENTD__SCHEDULER__FIRE_AHEAD", "6s"),
            ("AGENTD__LEASE__TTL", "3s"),
        ],
    )
    .await;
    let at = instant_in(&db, Duration::from_secs(3)).await;
    let schedules = schedules_at(&db, agent, 3, at).await;
    let (disabled, other, restored) = (schedules[0], schedules[1], schedules[2]);
    wait_claimed_ahead(&db, 3, at).await;
    let disable = "UPDATE agent_schedules SET enabled = false WHERE id = $1";
    let mut change = db.pool.begin().await.unwrap();
    sqlx::query(disable)
        .bind(disabled)
        .execute(&mut *change)
        .await
        .unwrap();
    let mut undone = db.pool.begin().await.unwrap();
    sqlx::query(disable)
        .bind(restored)
        .execute(&mut *undone)
        .await
        .unwrap();
    assert!(now(&db).await < at, "the changes began after the instant");
    eventually(
        Duration::from_secs(10),
        "the untouched slot's run, while both changes are open",
        || async { runs_for(&db, at).await.len() == 1 },
    )
    .await;
    assert_eq!(runs_for(&db, at).await[0].0, other);
    // The change goes on to the slot that just started, and commits.
    sqlx::query(disable)
        .bind(other)
        .execute(&mut *change)
        .await
        .expect("the application's change of a second row");
    change.commit().await.expect("the application's commit");
    undone.rollback().await.unwrap();
    // The slot whose change was rolled back fires late, once its lease has ended; the
    // disabled one never does.
    eventually(
        Duration::from_secs(20),
        "the slot whose change was rolled back",
        || async { runs_for(&db, at).await.len() == 2 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fired: Vec<Uuid> = runs_for(&db, at).await.iter().map(|run| run.0).collect();
    let mut expected = vec![other, restored];
    expected.sort();
    assert_eq!(fired, expected);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.ahead_fires").await,
        0
    );
    worker.stop().await;
}

/// Giving slots back (a stopping replica, the reaper) skips a schedule the application is
/// changing at that moment instead of waiting for it in the opposite lock order: no
/// deadlock, the application's change commits, and the other slot is given back.
#[tokio::test(flavor = "multi_thread")]
async fn giving_slots_back_does_not_deadlock_with_the_applications_change() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let worker =
        InProcessWorker::start_configured(&db, "w1", &[("AGENTD__SCHEDULER__FIRE_AHEAD", "40s")])
            .await;
    let at = instant_in(&db, Duration::from_secs(30)).await;
    let schedules = schedules_at(&db, agent, 2, at).await;
    wait_claimed_ahead(&db, 2, at).await;
    let slots: Vec<Uuid> =
        sqlx::query_scalar("SELECT run_id FROM agentd.ahead_fires ORDER BY schedule_id = $1 DESC")
            .bind(schedules[0])
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let disable = "UPDATE agent_schedules SET enabled = false WHERE id = $1";
    let mut change = db.pool.begin().await.unwrap();
    sqlx::query(disable)
        .bind(schedules[0])
        .execute(&mut *change)
        .await
        .unwrap();
    let returned: i32 = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::query_scalar("SELECT agentd.return_ahead_fires($1)")
            .bind(&slots)
            .fetch_one(&db.pool),
    )
    .await
    .expect("giving back waited for the application's change")
    .unwrap();
    assert_eq!(returned, 1, "the slot of the schedule not being changed");
    sqlx::query(disable)
        .bind(schedules[1])
        .execute(&mut *change)
        .await
        .expect("the application's change of a second row");
    change.commit().await.expect("the application's commit");
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.ahead_fires").await,
        0
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.schedule_fires").await,
        0,
        "neither slot is recorded as fired"
    );
    worker.stop().await;
}

/// A replica dies holding slots of every-second schedules claimed ahead, and
/// another replica goes on firing the schedules before those slots' leases end: each of
/// the dead replica's slots is still accounted for, once (a failed run saying it was lost),
/// and no slot of the schedules is missing or doubled.
#[tokio::test(flavor = "multi_thread")]
async fn slots_of_a_dead_replica_overtaken_by_later_slots_are_recorded_not_lost() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    // Runs may overlap, so the victim's leases do not hold the next slots back (with the
    // default `skip` they are counted as missed until the leases end).
    let settings = [
        ("AGENTD__SCHEDULER__FIRE_AHEAD", "4s"),
        ("AGENTD__LEASE__TTL", "3s"),
        ("AGENTD__SCHEDULER__OVERLAP_POLICY", "allow"),
    ];
    let mut victim = support::replica(&db.url, "r1", &settings);
    victim.wait_for("worker started", Duration::from_secs(30));
    let schedules: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) \
         SELECT $1, true, 'cron', 1, '* * * * * *', 'UTC' FROM generate_series(1, 2) RETURNING id",
    )
    .bind(agent)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    // The victim claims a slot of each ahead (one a schedule: a schedule whose slot is
    // leased is claimed again only at that slot's instant); the heir starts, and the victim
    // dies holding its slots. The heir fires the next slots at their instants, before the
    // victim's leases end.
    let held_by_victim = "SELECT count(*) FROM agentd.ahead_fires a JOIN agentd.leases l \
                          ON l.run_id = a.run_id WHERE l.worker_id = 'r1'";
    eventually(Duration::from_secs(15), "slots claimed ahead", || async {
        count(&db.pool, held_by_victim).await == 2
    })
    .await;
    let mut heir = support::replica(&db.url, "r2", &settings);
    heir.wait_for("worker started", Duration::from_secs(30));
    eventually(
        Duration::from_secs(15),
        "the victim holds slots",
        || async { count(&db.pool, held_by_victim).await > 0 },
    )
    .await;
    victim.signal(Signal::SIGKILL);
    victim.wait_exit(Duration::from_secs(10));
    let held: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
        "SELECT a.schedule_id, a.scheduled_for FROM agentd.ahead_fires a \
           JOIN agentd.leases l ON l.run_id = a.run_id WHERE l.worker_id = 'r1'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(!held.is_empty());
    eventually(
        Duration::from_secs(30),
        "the dead replica's slots handled",
        || async {
            count(&db.pool, "SELECT count(*) FROM agentd.ahead_fires").await
                == count(
                    &db.pool,
                    "SELECT count(*) FROM agentd.ahead_fires a JOIN agentd.leases l \
                      ON l.run_id = a.run_id WHERE l.worker_id = 'r2'",
                )
                .await
                && count(
                    &db.pool,
                    "SELECT count(*) FROM agentd.leases WHERE worker_id = 'r1'",
                )
                .await
                    == 0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    heir.signal(Signal::SIGTERM);
    assert!(heir.wait_exit(Duration::from_secs(30)).success());

    for schedule in schedules {
        let slots: Vec<(DateTime<Utc>, String, Option<String>, i64)> = sqlx::query_as(
            "SELECT (input->>'scheduled_for')::timestamptz, status, error, \
                    coalesce((input->>'missed')::bigint, 0) FROM runs \
              WHERE input->>'schedule_id' = $1::text ORDER BY 1",
        )
        .bind(schedule)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert!(slots.len() >= 3, "{slots:?}");
        // The dead replica's slots: each a run of its own (a failed one if later slots
        // overtook it) or counted in the next run's `missed`.
        for (_, slot) in held.iter().filter(|(id, _)| *id == schedule) {
            assert_eq!(
                slots
                    .iter()
                    .filter(|(at, _, _, missed)| {
                        at == slot
                            || (*at > *slot && *at - chrono::Duration::seconds(*missed) <= *slot)
                    })
                    .count(),
                1,
                "the dead replica's slot {slot} is not accounted for: {slots:?}"
            );
        }
        // Each second is a run, or counted in the next run's `missed` (fired late).
        for pair in slots.windows(2) {
            assert_eq!(
                (pair[1].0 - pair[0].0).num_seconds(),
                1 + pair[1].3,
                "a slot is missing or doubled: {slots:?}"
            );
        }
        let lost: Vec<_> = slots
            .iter()
            .filter(|(_, status, _, _)| status == "failed")
            .collect();
        assert!(
            lost.iter().all(|(_, _, error, _)| error
                .as_deref()
                .is_some_and(|error| error.contains("replica that claimed this slot"))),
            "{lost:?}"
        );
        assert!(
            slots
                .iter()
                .all(|(_, status, _, _)| status == "completed" || status == "failed"),
            "{slots:?}"
        );
    }
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM runs r WHERE input->>'trigger' = 'schedule' AND NOT EXISTS \
              (SELECT 1 FROM agentd.schedule_fires f WHERE f.run_id = r.id)"
        )
        .await,
        0,
        "every run has its slot's record"
    );
}

/// The reaper's two passes over expired leases, in either order: the one for runs leaves
/// the lease of a slot claimed ahead alone (it has no run to fail), and the one for slots
/// claimed ahead gives the slot back, even when its lease is gone altogether.
#[tokio::test(flavor = "multi_thread")]
async fn the_reaper_gives_back_a_slot_claimed_ahead_whatever_pass_comes_first() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let mut victim = support::replica(&db.url, "r1", &[("AGENTD__SCHEDULER__FIRE_AHEAD", "40s")]);
    victim.wait_for("worker started", Duration::from_secs(30));
    let at = instant_in(&db, Duration::from_secs(30)).await;
    let schedules = schedules_at(&db, agent, 2, at).await;
    wait_claimed_ahead(&db, 2, at).await;
    victim.signal(Signal::SIGKILL);
    victim.wait_exit(Duration::from_secs(10));
    // Both leases end now; one slot's lease is even lost outright.
    sqlx::query("UPDATE agentd.leases SET expires_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM agentd.leases WHERE schedule_id = $1")
        .bind(schedules[1])
        .execute(&db.pool)
        .await
        .unwrap();
    let reaped = agentd::store::workers::reap_expired_leases(&db.pool, 100)
        .await
        .unwrap();
    assert!(
        reaped.is_empty(),
        "the run reaper took a slot's lease: {reaped:?}"
    );
    let returned = agentd::store::workers::return_expired_ahead(&db.pool, 100)
        .await
        .unwrap();
    assert_eq!(returned, 2);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.ahead_fires").await,
        0
    );
    assert_eq!(
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM agent_schedules WHERE next_run = '{}'",
                at.to_rfc3339()
            )
        )
        .await,
        2,
        "both schedules are due at the slot again"
    );
}
