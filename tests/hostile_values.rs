//! Hostile values: what a signed-in user can write into a column agentd reads, or pass to
//! `request_run`, never panics the worker, stops one of its loops, wedges a run or delays
//! another tenant. Every row here is written as an attacker would, through real SQL as
//! `authenticated` with JWT claims, and run by real `agentd run` processes.

mod support;

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use sqlx::PgPool;
use support::{Daemon, TestDb, count, create_agent, create_user, eventually, replica};
use uuid::Uuid;

/// A schedule row as an attacker may write it. Timestamps are text, so that `infinity`
/// and years PostgreSQL accepts but chrono cannot hold can be written.
#[derive(Debug, Clone)]
struct Schedule {
    frequency: String,
    interval: i32,
    time: Option<String>,
    days: Option<Vec<i32>>,
    date: Option<i32>,
    timezone: String,
    created_at: String,
    next_run: Option<String>,
}

impl Schedule {
    fn valid() -> Schedule {
        Schedule {
            frequency: "daily".into(),
            interval: 1,
            time: Some("09:00".into()),
            days: None,
            date: None,
            timezone: "UTC".into(),
            created_at: "now".into(),
            next_run: None,
        }
    }
}

/// Inserts `schedule` for `agent` as signed-in user `user` (PostgREST's way: SET ROLE and
/// JWT claims); returns its id, or the database's refusal.
async fn insert_as(
    pool: &PgPool,
    user: Uuid,
    agent: Uuid,
    schedule: &Schedule,
) -> Result<Uuid, sqlx::Error> {
    let mut tx = pool.begin().await?;
    signed_in(&mut tx, user).await?;
    let id = sqlx::query_scalar(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, days, date, \
                                      timezone, created_at, next_run) \
         VALUES ($1, true, $2, $3, $4, $5, $6, $7, $8::text::timestamptz, $9::text::timestamptz) \
         RETURNING id",
    )
    .bind(agent)
    .bind(&schedule.frequency)
    .bind(schedule.interval)
    .bind(&schedule.time)
    .bind(&schedule.days)
    .bind(schedule.date)
    .bind(&schedule.timezone)
    .bind(&schedule.created_at)
    .bind(&schedule.next_run)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// Makes the transaction act as signed-in user `user`.
async fn signed_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    user: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query("SET LOCAL ROLE authenticated")
        .execute(&mut **tx)
        .await?;
    sqlx::query("SELECT set_config('request.jwt.claims', $1, true)")
        .bind(format!(r#"{{"sub":"{user}","role":"authenticated"}}"#))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// `request_run` as signed-in user `user`; the run's id or the database's refusal.
async fn request_as(
    pool: &PgPool,
    user: Uuid,
    target_type: &str,
    target: Uuid,
    input: Option<&str>,
) -> Result<Uuid, sqlx::Error> {
    let mut tx = pool.begin().await?;
    signed_in(&mut tx, user).await?;
    let id = sqlx::query_scalar("SELECT request_run($1, $2, $3::text::jsonb)")
        .bind(target_type)
        .bind(target)
        .bind(input)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(id)
}

fn sqlstate(result: Result<Uuid, sqlx::Error>) -> (String, String) {
    match result {
        Err(sqlx::Error::Database(error)) => (
            error.code().unwrap_or_default().into_owned(),
            error.message().to_string(),
        ),
        other => panic!("expected the database to refuse, got {other:?}"),
    }
}

/// A world with two tenants: the attacker A, and B whose schedule fires every second.
struct World {
    db: TestDb,
    attacker: Uuid,
    attackers_agent: Uuid,
    victims_schedule: Uuid,
    daemon: Daemon,
    base: String,
}

async fn world(settings: &[(&str, &str)]) -> World {
    let db = TestDb::migrated().await;
    let attacker = create_user(&db.pool).await;
    let attackers_agent = create_agent(&db.pool, attacker).await;
    let victim = create_user(&db.pool).await;
    let victims_agent = create_agent(&db.pool, victim).await;
    let victims_schedule = insert_as(
        &db.pool,
        victim,
        victims_agent,
        &Schedule {
            frequency: "cron".into(),
            time: Some("* * * * * *".into()),
            ..Schedule::valid()
        },
    )
    .await
    .unwrap();
    let mut daemon = replica(&db.url, "hostile-1", settings);
    let line = daemon.wait_for("operations endpoints listening", Duration::from_secs(20));
    let base = format!("http://{}", line["addr"].as_str().unwrap());
    daemon.wait_for("worker started", Duration::from_secs(20));
    World {
        db,
        attacker,
        attackers_agent,
        victims_schedule,
        daemon,
        base,
    }
}

impl World {
    /// The victim's runs scheduled at or after `since`: (scheduled_for, lag).
    async fn victims_runs_since(&self, since: chrono::DateTime<chrono::Utc>) -> Vec<(String, f64)> {
        sqlx::query_as(
            "SELECT input->>'scheduled_for', \
                    extract(epoch FROM start_time - (input->>'scheduled_for')::timestamptz)::float8 \
               FROM runs WHERE input->>'schedule_id' = $1 \
                AND (input->>'scheduled_for')::timestamptz >= $2 ORDER BY 1",
        )
        .bind(self.victims_schedule.to_string())
        .bind(since)
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }

    /// Waits until the victim's schedule has fired a slot at or after `since` plus a
    /// second; fails unless every such slot started within a second of its time.
    async fn victim_fires_on_time(
        &self,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let runs = self
                .victims_runs_since(since + chrono::Duration::seconds(1))
                .await;
            if let Some((slot, lag)) = runs.iter().find(|(_, lag)| *lag >= 1.0) {
                return Err(format!("the victim's slot {slot} started {lag:.3} s late"));
            }
            if !runs.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the victim's schedule fired nothing after {since}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the replica says it is alive and is still running.
    async fn healthy(&mut self) -> Result<(), String> {
        if let Ok(Some(status)) = self.daemon.child.try_wait() {
            return Err(format!("agentd exited: {status}"));
        }
        let client = agentd::executor::http::client(agentd::config::HttpClientSettings {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
        })?;
        let response = client
            .get(format!("{}/healthz", self.base))
            .send()
            .await
            .map_err(|error| error.to_string())?;
        match response.status().as_u16() {
            200 => Ok(()),
            status => Err(format!(
                "/healthz answered {status}: {}",
                response.text().await.unwrap_or_default()
            )),
        }
    }

    async fn now(&self) -> chrono::DateTime<chrono::Utc> {
        sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }
}

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn extreme_values_in_the_columns_agentd_reads_never_stop_or_slow_another_tenant() {
    let mut world = world(&[]).await;
    let pool = world.db.pool.clone();
    let (attacker, agent) = (world.attacker, world.attackers_agent);
    let start = world.now().await;

    // Timestamps: ±infinity and years PostgreSQL holds but chrono does not.
    let minus_infinity = insert_as(
        &pool,
        attacker,
        agent,
        &Schedule {
            next_run: Some("-infinity".into()),
            ..Schedule::valid()
        },
    )
    .await
    .unwrap();
    let plus_infinity = insert_as(
        &pool,
        attacker,
        agent,
        &Schedule {
            next_run: Some("infinity".into()),
            ..Schedule::valid()
        },
    )
    .await
    .unwrap();
    let far_future_next = insert_as(
        &pool,
        attacker,
        agent,
        &Schedule {
            next_run: Some("294276-12-31 23:59:59+00".into()),
            ..Schedule::valid()
        },
    )
    .await
    .unwrap();
    let mut invalid = Vec::new();
    for created_at in [
        "infinity",
        "-infinity",
        "262143-06-01 00:00:00+00",
        "4713-01-01 00:00:00+00 BC",
    ] {
        invalid.push(
            insert_as(
                &pool,
                attacker,
                agent,
                &Schedule {
                    created_at: created_at.into(),
                    next_run: Some("-infinity".into()),
                    ..Schedule::valid()
                },
            )
            .await
            .unwrap(),
        );
    }
    // Huge and strange texts, arrays and integers.
    let huge = "9".repeat(MIB);
    for schedule in [
        Schedule {
            time: Some(huge.clone()),
            ..Schedule::valid()
        },
        Schedule {
            timezone: huge.clone(),
            ..Schedule::valid()
        },
        Schedule {
            frequency: huge.clone(),
            ..Schedule::valid()
        },
        Schedule {
            frequency: "cron".into(),
            time: Some(format!("* * * * * {huge}")),
            ..Schedule::valid()
        },
        Schedule {
            timezone: "\u{1b}[31mEurope/Berlin\r\n".into(),
            ..Schedule::valid()
        },
        Schedule {
            days: Some(vec![1; 100_000]),
            ..Schedule::valid()
        },
        Schedule {
            days: Some(vec![i32::MIN, i32::MAX]),
            ..Schedule::valid()
        },
        Schedule {
            interval: i32::MAX,
            ..Schedule::valid()
        },
        Schedule {
            interval: i32::MIN,
            ..Schedule::valid()
        },
        Schedule {
            frequency: "monthly".into(),
            date: Some(i32::MIN),
            ..Schedule::valid()
        },
    ] {
        invalid.push(insert_as(&pool, attacker, agent, &schedule).await.unwrap());
    }
    // An agent whose instructions are over the bound, with a crowd of variables.
    sqlx::query("UPDATE agents SET name = $2, description = $2, category = $3, instructions = $4 WHERE id = $1")
        .bind(agent)
        .bind("n".repeat(MIB))
        // The category is indexed: PostgreSQL itself holds it to a few kilobytes.
        .bind(format!("\u{7}{}", "c".repeat(2000)))
        .bind("{{A}}".repeat(MIB / 2))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO agent_variables (agent_id, name, description, value) \
         SELECT $1, 'V' || i, 'd', repeat('v', 100) FROM generate_series(1, 300) i",
    )
    .bind(agent)
    .execute(&pool)
    .await
    .unwrap();
    let too_big = request_as(&pool, attacker, "agent", agent, None)
        .await
        .unwrap();

    // request_run refuses what no run could use, with one short line.
    let big = format!("\"{}\"", "x".repeat(10 * MIB));
    let (code, message) = sqlstate(request_as(&pool, attacker, "agent", agent, Some(&big)).await);
    assert_eq!(code, "54000", "{message}");
    assert!(
        message.contains("at most 1048576") && message.len() < 200,
        "{message}"
    );
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let (code, message) = sqlstate(request_as(&pool, attacker, "agent", agent, Some(&deep)).await);
    assert_eq!(code, "54000", "{message}");
    assert!(message.contains("nested more than 64 levels"), "{message}");
    let (code, message) =
        sqlstate(request_as(&pool, attacker, &"t".repeat(MIB), agent, None).await);
    assert_eq!(code, "22023", "{message}");
    assert!(message.len() < 200, "{message}");

    // Meanwhile the other tenant's schedule fires every second, on time.
    world.victim_fires_on_time(start).await.unwrap();
    let later = world.now().await;
    world.victim_fires_on_time(later).await.unwrap();
    world.healthy().await.unwrap();

    // Each invalid row is reported once, quoting at most 200 characters of its value.
    eventually(Duration::from_secs(10), "every invalid row reported", || async {
        let reported = count(
            &pool,
            "SELECT count(DISTINCT input->>'schedule_id') FROM runs WHERE input->>'invalid' = 'true'",
        )
        .await;
        reported == invalid.len() as i64
    })
    .await;
    let reports: Vec<(String, i64, i32)> = sqlx::query_as(
        "SELECT input->>'schedule_id', count(*), max(length(error)) FROM runs \
          WHERE input->>'invalid' = 'true' GROUP BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for (schedule, reports, longest) in &reports {
        assert_eq!(*reports, 1, "schedule {schedule} reported {reports} times");
        assert!(
            *longest < 600,
            "schedule {schedule}: an error of {longest} characters"
        );
    }
    let errors: Vec<String> = sqlx::query_scalar(
        "SELECT error FROM runs WHERE input->>'invalid' = 'true' ORDER BY error",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("created_at") && e.contains("outside the years 1 to 9999")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("invalid schedule: time: longer than 200 characters")),
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("days: 100000 elements")),
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("\\u{1b}[31m")),
        "control characters are escaped: {errors:#?}"
    );

    // -infinity is planned anew from now; infinity and a year agentd cannot compute with
    // are never due, and stay as written.
    let planned: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT next_run FROM agent_schedules WHERE id = $1 AND isfinite(next_run)",
    )
    .bind(minus_infinity)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(planned.is_some_and(|next| next > start), "{planned:?}");
    for untouched in [plus_infinity, far_future_next] {
        assert_eq!(
            count(
                &pool,
                &format!("SELECT count(*) FROM runs WHERE input->>'schedule_id' = '{untouched}'")
            )
            .await,
            0
        );
    }

    // The agent over its bounds fails its run with one clear line; the rest is in its logs.
    eventually(
        Duration::from_secs(10),
        "the oversized agent's run ends",
        || async {
            count(
                &pool,
                &format!("SELECT count(*) FROM runs WHERE id = '{too_big}' AND status = 'failed'"),
            )
            .await
                == 1
        },
    )
    .await;
    let error: String = sqlx::query_scalar("SELECT error FROM runs WHERE id = $1")
        .bind(too_big)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        error.contains("instructions are") && error.contains("at most 1048576"),
        "{error}"
    );
    let notices: Vec<String> =
        sqlx::query_scalar("SELECT message FROM run_logs WHERE run_id = $1 AND level = 'warn'")
            .bind(too_big)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        notices
            .iter()
            .any(|n| n.contains("more than 200 variables")),
        "{notices:?}"
    );

    // No value of the attacker's reached agentd's own log lines at length.
    world.healthy().await.unwrap();
    let longest = world
        .daemon
        .drain()
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
}

/// One generated hostile schedule row.
fn hostile_schedule() -> impl Strategy<Value = Schedule> {
    let text = prop_oneof![
        Just(String::new()),
        Just("09:00".to_string()),
        Just("*/2 * * * *".to_string()),
        Just("@hourly".to_string()),
        "[ -~]{0,40}",
        "\\PC{0,20}",
        Just("\u{1b}[2J\u{7}\r\n".to_string()),
        (1usize..4).prop_map(|megabytes| "7".repeat(megabytes * MIB / 4)),
    ];
    let instant = prop_oneof![
        Just("infinity".to_string()),
        Just("-infinity".to_string()),
        Just("294276-12-31 00:00:00+00".to_string()),
        Just("4713-01-01 00:00:00+00 BC".to_string()),
        Just("9999-12-31 23:59:59+00".to_string()),
        Just("0001-01-01 00:00:00+00".to_string()),
        Just("now".to_string()),
        (-100_000i64..100_000).prop_map(|minutes| format!(
            "{}",
            chrono::Utc::now() + chrono::Duration::minutes(minutes)
        )),
    ];
    (
        prop::sample::select(vec![
            "once", "minutely", "hourly", "daily", "weekly", "monthly", "cron", "", "DAILY",
        ]),
        any::<i32>(),
        prop::option::of(text.clone()),
        prop::option::of(prop_oneof![
            prop::collection::vec(any::<i32>(), 0..10),
            (0usize..200_000).prop_map(|length| vec![3; length]),
        ]),
        prop::option::of(any::<i32>()),
        prop_oneof![
            prop::sample::select(vec![
                "UTC",
                "Europe/Berlin",
                "Pacific/Kiritimati",
                "Mars/Olympus",
                ""
            ])
            .prop_map(String::from),
            text,
        ],
        instant.clone(),
        prop::option::of(instant),
    )
        .prop_map(
            |(frequency, interval, time, days, date, timezone, created_at, next_run)| Schedule {
                frequency: frequency.into(),
                interval,
                time,
                days,
                date,
                timezone,
                created_at,
                next_run,
            },
        )
}

/// Generated hostile rows written as a signed-in user while another user's schedule is
/// due: it fires on time, and the worker stays healthy.
#[tokio::test(flavor = "multi_thread")]
async fn generated_hostile_rows_never_delay_another_users_due_schedule() {
    let world = tokio::sync::Mutex::new(world(&[]).await);
    let handle = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(Config {
        cases: 12,
        max_shrink_iters: 32,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(hostile_schedule(), 1..4), |rows| {
        tokio::task::block_in_place(|| {
            handle.block_on(async {
                let mut world = world.lock().await;
                let since = world.now().await;
                for row in &rows {
                    // PostgreSQL itself may refuse a value (that is not agentd's to handle).
                    let _ =
                        insert_as(&world.db.pool, world.attacker, world.attackers_agent, row).await;
                }
                world
                    .victim_fires_on_time(since)
                    .await
                    .map_err(TestCaseError::fail)?;
                world.healthy().await.map_err(TestCaseError::fail)?;
                Ok(())
            })
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// What a program prints that the database cannot hold (NUL in its error line, `\u0000`
/// in its output) is cleaned; an outcome the database refuses for its data is recorded as
/// failed with the database's reason and never sent again; and when even that is refused,
/// the run ends within one lease of its program's exit.
#[tokio::test(flavor = "multi_thread")]
async fn outcomes_the_database_refuses_never_wedge_a_run() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let program = r#"["python3", "-c", "import sys; sys.stderr.write('x\\0y\\n'); print('{\"output\": \"a\\\\u0000b\"}'); sys.exit(1)"]"#;
    let folder = tempfile::tempdir().unwrap();
    let artifacts = folder.path().join("artifacts");
    let mut daemon = replica(
        &db.url,
        "wedge-1",
        &[
            ("AGENTD__EXECUTION__DEFAULT", "command"),
            ("AGENTD__EXECUTORS__COMMAND__PROGRAM", program),
            ("AGENTD__ARTIFACTS__DIR", artifacts.to_str().unwrap()),
            ("AGENTD__LEASE__TTL", "2s"),
        ],
    );
    daemon.wait_for("worker started", Duration::from_secs(20));
    let ended = |run: Uuid| {
        let pool = db.pool.clone();
        async move {
            eventually(Duration::from_secs(20), "the run ends", || async {
                count(
                    &pool,
                    &format!(
                        "SELECT count(*) FROM runs WHERE id = '{run}' AND status <> 'running'"
                    ),
                )
                .await
                    == 1
            })
            .await;
            sqlx::query_as::<
                _,
                (
                    String,
                    Option<String>,
                    Option<serde_json::Value>,
                    chrono::DateTime<chrono::Utc>,
                ),
            >("SELECT status, error, output, end_time FROM runs WHERE id = $1")
            .bind(run)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    // NUL is removed from the error line and the output.
    let run = support::request_agent_run(&db.pool, agent).await;
    let (status, error, output, _) = ended(run).await;
    assert_eq!(status, "failed");
    assert_eq!(
        error.as_deref(),
        Some("the program exited with status 1: xy")
    );
    assert_eq!(output, Some(serde_json::json!("ab")));

    // The database refuses the outcome (as a constraint would): the run is recorded as
    // failed with the reason, after one refusal only.
    support::execute_script(
        &db.pool,
        r#"
        -- Counted in a sequence: a refusal rolls back anything written in its transaction.
        CREATE SEQUENCE refusals;
        CREATE FUNCTION refuse_outcomes() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.status <> 'running' AND (NEW.output IS NOT NULL OR current_setting('test.refuse_all', true) = 'on')
             AND NEW.error NOT LIKE 'worker lost%' THEN
            PERFORM nextval('refusals');
            RAISE EXCEPTION 'this outcome is refused' USING ERRCODE = '22023';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_outcomes BEFORE UPDATE ON runs FOR EACH ROW EXECUTE FUNCTION refuse_outcomes();
        "#,
    )
    .await;
    let run = support::request_agent_run(&db.pool, agent).await;
    let (status, error, output, _) = ended(run).await;
    assert_eq!(status, "failed");
    let error = error.unwrap();
    assert!(
        error.starts_with("the run's outcome could not be stored:")
            && error.contains("this outcome is refused"),
        "{error}"
    );
    assert_eq!(output, None);
    assert_eq!(refusals(&db.pool).await, 1);

    // Every outcome refused: the lease is no longer renewed once the program has exited,
    // so the run is failed as lost within about one lease, not kept running.
    support::execute_script(
        &db.pool,
        &format!("ALTER DATABASE {} SET test.refuse_all = 'on'", db.name),
    )
    .await;
    // The setting reaches new sessions only: a fresh replica.
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10));
    let mut daemon = replica(
        &db.url,
        "wedge-2",
        &[
            ("AGENTD__EXECUTION__DEFAULT", "command"),
            ("AGENTD__EXECUTORS__COMMAND__PROGRAM", program),
            ("AGENTD__ARTIFACTS__DIR", artifacts.to_str().unwrap()),
            ("AGENTD__LEASE__TTL", "2s"),
        ],
    );
    daemon.wait_for("worker started", Duration::from_secs(20));
    let run = support::request_agent_run(&db.pool, agent).await;
    let (status, error, _, end_time) = ended(run).await;
    assert_eq!(status, "failed");
    assert!(
        error
            .as_deref()
            .is_some_and(|error| error.starts_with("worker lost")),
        "{error:?}"
    );
    let first_refusal: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT min(start_time) FROM runs WHERE id = $1")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let lasted = (end_time - first_refusal).num_milliseconds();
    assert!(lasted < 6_000, "the run stayed running {lasted} ms");
    assert_eq!(
        refusals(&db.pool).await,
        3,
        "the outcome and the failure record, each refused once"
    );
}

/// Outcomes refused so far by the test's trigger.
async fn refusals(pool: &PgPool) -> i64 {
    count(
        pool,
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM refusals",
    )
    .await
}
