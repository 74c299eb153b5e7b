//! Hostile tenants, as an attacker would try it through real SQL and real worker processes:
//! `request_run` and `cancel_run` act only for the caller's own user (decided on the JWT
//! claims and the worker's role, never on a role merely being `authenticated`); a cancel
//! notification anyone can send stops nothing; conversations and teams name only the
//! user's own agents and a team run never reads another user's agent; `agentd run` works as
//! a login role that owns nothing; one user's flood of requests neither delays another
//! user's schedule nor their request; and `requests.max_pending_per_user` bounds a user's
//! queue.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use support::{
    LoginRole, TestDb, agentd, as_user, count, create_agent, create_user, eventually, refusal,
    replica,
};
use uuid::Uuid;

/// Who calls: the login of a connection, then the role and claims the session sets, as
/// PostgREST does for a signed-in user.
struct Caller {
    what: &'static str,
    url: String,
    set_role: Option<&'static str>,
    claims_sub: Option<Uuid>,
}

impl Caller {
    /// Runs one statement as this caller, in a transaction of its own that commits.
    async fn fetch<T>(&self, sql: &str) -> Result<T, sqlx::Error>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        let mut connection = PgConnection::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("{}: connect: {e}", self.what));
        let mut tx = connection.begin().await?;
        if let Some(role) = self.set_role {
            sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {role}")))
                .execute(&mut *tx)
                .await?;
        }
        if let Some(sub) = self.claims_sub {
            sqlx::query("SELECT set_config('request.jwt.claims', $1, true)")
                .bind(format!(r#"{{"sub":"{sub}","role":"authenticated"}}"#))
                .execute(&mut *tx)
                .await?;
        }
        let value = sqlx::query_scalar::<_, T>(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut *tx)
            .await;
        match value {
            Ok(value) => {
                tx.commit().await?;
                Ok(value)
            }
            Err(error) => {
                let _ = tx.rollback().await;
                Err(error)
            }
        }
    }

    /// Runs one statement that returns nothing (NOTIFY), as this caller, in a session of
    /// its own.
    async fn execute(&self, sql: &str) {
        let mut connection = PgConnection::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("{}: connect: {e}", self.what));
        if let Some(role) = self.set_role {
            sqlx::query(sqlx::AssertSqlSafe(format!("SET ROLE {role}")))
                .execute(&mut connection)
                .await
                .unwrap();
        }
        if let Some(sub) = self.claims_sub {
            sqlx::query("SELECT set_config('request.jwt.claims', $1, false)")
                .bind(format!(r#"{{"sub":"{sub}","role":"authenticated"}}"#))
                .execute(&mut connection)
                .await
                .unwrap();
        }
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.what));
        let _ = connection.close().await;
    }
}

/// Whom a caller may act for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ActsFor {
    Nobody,
    User(Uuid),
    Anyone,
}

impl ActsFor {
    fn covers(self, owner: Uuid) -> bool {
        match self {
            ActsFor::Nobody => false,
            ActsFor::User(user) => user == owner,
            ActsFor::Anyone => true,
        }
    }
}

/// An agent, a team with that agent, and the user owning both.
#[derive(Clone, Copy)]
struct Tenant {
    user: Uuid,
    agent: Uuid,
    team: Uuid,
}

async fn tenant(db: &TestDb) -> Tenant {
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let team: Uuid = sqlx::query_scalar(
        "INSERT INTO teams (name, type, user_id) VALUES ('Test team', 'coordinate', $1) RETURNING id",
    )
    .bind(user)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO team_agents (team_id, agent_id, position) VALUES ($1, $2, 1)")
        .bind(team)
        .bind(agent)
        .execute(&db.pool)
        .await
        .unwrap();
    Tenant { user, agent, team }
}

/// A run of `tenant` waiting in the queue (asked for by the superuser, as an operator).
async fn queued_run(db: &TestDb, tenant: Tenant) -> Uuid {
    support::request_agent_run(&db.pool, tenant.agent).await
}

/// A run of `tenant` that some worker is executing: its row and its lease, as a claim
/// writes them (no worker runs in the authorization test; nothing needs to execute).
async fn running_run(db: &TestDb, tenant: Tenant) -> Uuid {
    leased_run(db, tenant, "elsewhere", "1 hour").await
}

/// A running run of `tenant` leased to `worker` for `lease` (an interval).
async fn leased_run(db: &TestDb, tenant: Tenant, worker: &str, lease: &str) -> Uuid {
    let run_id: Uuid = sqlx::query_scalar(
        "INSERT INTO runs (type, target_id, status, start_time, triggered_by_id) \
         VALUES ('agent', $1, 'running', now(), $2) RETURNING id",
    )
    .bind(tenant.agent)
    .bind(tenant.user)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO agentd.leases (run_id, worker_id, expires_at) \
         VALUES ($1, $2, now() + $3::interval)",
    )
    .bind(run_id)
    .bind(worker)
    .bind(lease)
    .execute(&db.pool)
    .await
    .unwrap();
    run_id
}

/// Who may ask for and cancel whose runs (the issue's part 9). A login role that is merely
/// a member of `authenticated` is no one without claims and exactly the claims' user with
/// them; so is a signed-in session; members of `agentd_worker` (and the superuser) act for
/// anyone.
#[tokio::test]
async fn request_run_and_cancel_run_act_only_for_the_callers_own_user() {
    let db = TestDb::migrated().await;
    let alice = tenant(&db).await;
    let bob = tenant(&db).await;
    let api_login = LoginRole::create(&db, "authenticated").await;
    let worker_login = LoginRole::create(&db, "agentd_worker").await;

    let callers = [
        (
            Caller {
                what: "a login role in authenticated, without claims",
                url: api_login.url(),
                set_role: None,
                claims_sub: None,
            },
            ActsFor::Nobody,
        ),
        (
            Caller {
                what: "a login role in authenticated, with Alice's claims",
                url: api_login.url(),
                set_role: None,
                claims_sub: Some(alice.user),
            },
            ActsFor::User(alice.user),
        ),
        (
            Caller {
                what: "Alice signed in (SET ROLE authenticated, her claims)",
                url: db.url.clone(),
                set_role: Some("authenticated"),
                claims_sub: Some(alice.user),
            },
            ActsFor::User(alice.user),
        ),
        (
            Caller {
                what: "SET ROLE authenticated without claims",
                url: db.url.clone(),
                set_role: Some("authenticated"),
                claims_sub: None,
            },
            ActsFor::Nobody,
        ),
        (
            Caller {
                what: "a login role in agentd_worker",
                url: worker_login.url(),
                set_role: None,
                claims_sub: None,
            },
            ActsFor::Anyone,
        ),
        (
            Caller {
                what: "the superuser",
                url: db.url.clone(),
                set_role: None,
                claims_sub: None,
            },
            ActsFor::Anyone,
        ),
    ];

    for (caller, acts_for) in &callers {
        let who = caller.what;
        for owner in [alice, bob] {
            for (kind, target) in [("agent", owner.agent), ("team", owner.team)] {
                let asked = caller
                    .fetch::<Uuid>(&format!("SELECT public.request_run('{kind}', '{target}')"))
                    .await;
                if acts_for.covers(owner.user) {
                    let run_id = asked.unwrap_or_else(|e| {
                        panic!("{who}: request_run of {kind} {target} refused: {e}")
                    });
                    assert_eq!(
                        count(
                            &db.pool,
                            &format!(
                                "SELECT count(*) FROM agentd.requests WHERE id = '{run_id}' \
                                 AND target_id = '{target}' AND requested_by = '{}'",
                                owner.user
                            )
                        )
                        .await,
                        1,
                        "{who}: the request is queued for the target's owner"
                    );
                } else {
                    let (code, message) =
                        refusal(&asked, &format!("{who}: request_run of {kind} {target}"));
                    assert_eq!(
                        (code.as_str(), message),
                        (
                            "42501",
                            format!("request_run: no {kind} {target} that you own")
                        ),
                        "{who}"
                    );
                }
            }

            // Cancelling a queued run and a running one.
            let queued = queued_run(&db, owner).await;
            let running = running_run(&db, owner).await;
            let allowed = acts_for.covers(owner.user);
            for (state, run_id) in [("queued", queued), ("running", running)] {
                let taken: bool = caller
                    .fetch(&format!("SELECT public.cancel_run('{run_id}')"))
                    .await
                    .unwrap_or_else(|e| panic!("{who}: cancel_run of a {state} run: {e}"));
                assert_eq!(
                    taken, allowed,
                    "{who}: cancel_run of a {state} run of its owner's"
                );
            }
            let queued_left = count(
                &db.pool,
                &format!("SELECT count(*) FROM agentd.requests WHERE id = '{queued}'"),
            )
            .await;
            let queued_cancelled = count(
                &db.pool,
                &format!(
                    "SELECT count(*) FROM runs WHERE id = '{queued}' \
                     AND status = 'failed' AND error = 'cancelled'"
                ),
            )
            .await;
            let running_flagged = count(
                &db.pool,
                &format!(
                    "SELECT count(*) FROM agentd.leases WHERE run_id = '{running}' AND cancel_requested"
                ),
            )
            .await;
            let expected = if allowed { (0, 1, 1) } else { (1, 0, 0) };
            assert_eq!(
                (queued_left, queued_cancelled, running_flagged),
                expected,
                "{who}: (queued request left, queued run cancelled, running run flagged)"
            );
        }
    }
    api_login.remove().await;
    worker_login.remove().await;
}

/// The status and error of a run; `None` while it is not in `runs`.
async fn run_state(db: &TestDb, run_id: Uuid) -> Option<(String, Option<String>)> {
    sqlx::query_as("SELECT status, error FROM runs WHERE id = $1")
        .bind(run_id)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
}

/// Waits until the run is executing: running, with its first line written.
async fn wait_executing(db: &TestDb, run_id: Uuid, limit: Duration) {
    eventually(limit, "the run executes", || async {
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM runs r WHERE r.id = '{run_id}' AND r.status = 'running' \
                 AND EXISTS (SELECT 1 FROM run_logs l WHERE l.run_id = r.id)"
            ),
        )
        .await
            == 1
    })
    .await;
}

/// Waits until the run has ended; returns its status and error.
async fn wait_finished(db: &TestDb, run_id: Uuid, limit: Duration) -> (String, Option<String>) {
    eventually(limit, "the run ends", || async {
        run_state(db, run_id)
            .await
            .is_some_and(|(status, _)| status != "running")
    })
    .await;
    run_state(db, run_id).await.unwrap()
}

/// Anyone may NOTIFY `agentd_cancel`; the worker only renews its leases on it, and
/// a run stops only when the database says its owner asked (`cancel_run`).
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_notification_stops_nothing_and_cancel_run_by_the_owner_does() {
    let db = TestDb::migrated().await;
    let alice = tenant(&db).await;
    let bob = tenant(&db).await;
    let api_login = LoginRole::create(&db, "authenticated").await;
    // Runs of about 4 s (two pauses); leases renewed every 10 s unless notified.
    let mut worker = replica(
        &db.url,
        "cancel-notify",
        &[("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "2s")],
    );
    worker.wait_for("worker started", Duration::from_secs(30));

    let run_id: Uuid = as_user(
        &db.pool,
        bob.user,
        &format!("SELECT public.request_run('agent', '{}')", bob.agent),
    )
    .await
    .unwrap();
    wait_executing(&db, run_id, Duration::from_secs(10)).await;
    let senders = [
        Caller {
            what: "a login role in authenticated",
            url: api_login.url(),
            set_role: None,
            claims_sub: None,
        },
        Caller {
            what: "Alice signed in",
            url: db.url.clone(),
            set_role: Some("authenticated"),
            claims_sub: Some(alice.user),
        },
    ];
    // Spaced beyond the lease keeper's shortest gap between renewals (100 ms), so each one
    // makes the worker ask the database again.
    for _ in 0..2 {
        for sender in &senders {
            sender
                .execute(&format!("NOTIFY agentd_cancel, '{run_id}'"))
                .await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    assert_eq!(
        run_state(&db, run_id).await,
        Some(("running".to_string(), None)),
        "the run was still executing after the notifications"
    );
    assert_eq!(
        wait_finished(&db, run_id, Duration::from_secs(15)).await,
        ("completed".to_string(), None),
        "a notification alone stopped the run"
    );

    // The owner's cancel_run stops the next one at once (well before its 4 s, and long
    // before the next regular renewal, 10 s away).
    let run_id: Uuid = as_user(
        &db.pool,
        bob.user,
        &format!("SELECT public.request_run('agent', '{}')", bob.agent),
    )
    .await
    .unwrap();
    wait_executing(&db, run_id, Duration::from_secs(10)).await;
    let taken: bool = as_user(
        &db.pool,
        bob.user,
        &format!("SELECT public.cancel_run('{run_id}')"),
    )
    .await
    .unwrap();
    assert!(taken, "Bob's cancel_run of his own running run");
    assert_eq!(
        wait_finished(&db, run_id, Duration::from_secs(2)).await,
        ("failed".to_string(), Some("cancelled".to_string()))
    );

    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit(Duration::from_secs(20)).success());
    api_login.remove().await;
}

/// A conversation names only the user's own agent, whatever the user writes; a team
/// member row naming another user's agent (written past the policies, by the service role)
/// is skipped by the worker, which never reads that agent's variables.
#[tokio::test(flavor = "multi_thread")]
async fn conversations_and_team_runs_name_only_the_users_own_agents() {
    let db = TestDb::migrated().await;
    let alice = tenant(&db).await;
    let bob = tenant(&db).await;

    // Conversations, as Alice signed in.
    let with_bobs_agent = as_user::<Uuid>(
        &db.pool,
        alice.user,
        &format!(
            "INSERT INTO conversations (user_id, agent_id, title) \
             VALUES ('{}', '{}', 'borrowed') RETURNING id",
            alice.user, bob.agent
        ),
    )
    .await;
    assert_eq!(
        refusal(&with_bobs_agent, "a conversation of Alice with Bob's agent").0,
        "42501"
    );
    let conversation: Uuid = as_user(
        &db.pool,
        alice.user,
        &format!(
            "INSERT INTO conversations (user_id, agent_id, title) \
             VALUES ('{}', '{}', 'mine') RETURNING id",
            alice.user, alice.agent
        ),
    )
    .await
    .expect("a conversation of Alice with her own agent");
    let switched = as_user::<Uuid>(
        &db.pool,
        alice.user,
        &format!(
            "UPDATE conversations SET agent_id = '{}' WHERE id = '{conversation}' RETURNING id",
            bob.agent
        ),
    )
    .await;
    assert_eq!(
        refusal(&switched, "switching Alice's conversation to Bob's agent").0,
        "42501"
    );
    let renamed: Uuid = as_user(
        &db.pool,
        alice.user,
        &format!(
            "UPDATE conversations SET title = 'renamed' WHERE id = '{conversation}' RETURNING id"
        ),
    )
    .await
    .expect("Alice edits her own conversation");
    assert_eq!(renamed, conversation);
    assert_eq!(
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM conversations WHERE user_id = '{}' AND agent_id = '{}'",
                alice.user, alice.agent
            )
        )
        .await,
        1,
        "Alice's conversation still names her own agent"
    );

    // Bob's agent renders a secret; Alice's renders a value of her own (which shows that
    // members' variables do reach the output).
    let bobs_secret = format!("bob-secret-{}", Uuid::new_v4().simple());
    let alices_value = format!("alice-value-{}", Uuid::new_v4().simple());
    for (agent, value, name) in [
        (bob.agent, &bobs_secret, "Bob's agent"),
        (alice.agent, &alices_value, "Alice's agent"),
    ] {
        sqlx::query(
            "UPDATE agents SET name = $2, instructions = 'The key is {{ KEY }}.' WHERE id = $1",
        )
        .bind(agent)
        .bind(name)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO agent_variables (agent_id, name, description, value) \
             VALUES ($1, 'KEY', 'an API key', $2)",
        )
        .bind(agent)
        .bind(value)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    // The service role (bypassing the policies) puts Bob's agent first in Alice's team.
    sqlx::query("INSERT INTO team_agents (team_id, agent_id, position) VALUES ($1, $2, 0)")
        .bind(alice.team)
        .bind(bob.agent)
        .execute(&db.pool)
        .await
        .unwrap();

    let mut worker = replica(&db.url, "team-members", &[]);
    worker.wait_for("worker started", Duration::from_secs(30));
    let run_id: Uuid = as_user(
        &db.pool,
        alice.user,
        &format!("SELECT public.request_run('team', '{}')", alice.team),
    )
    .await
    .unwrap();
    let (status, error) = wait_finished(&db, run_id, Duration::from_secs(20)).await;
    assert_eq!(
        (status.as_str(), error.as_deref()),
        ("completed", None),
        "the team runs its one own member"
    );

    let warnings: Vec<String> = sqlx::query_scalar(
        "SELECT message FROM run_logs WHERE run_id = $1 AND level = 'warn' ORDER BY timestamp, id",
    )
    .bind(run_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        warnings,
        [format!(
            "team member agent {} belongs to another user; skipped",
            bob.agent
        )]
    );
    let output: Value = sqlx::query_scalar("SELECT output FROM runs WHERE id = $1")
        .bind(run_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let steps = output["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "{output:#}");
    assert_eq!(steps[0]["agent_id"], alice.agent.to_string(), "{output:#}");

    // Everything the run left behind: its row, its lines, its artifact rows and files, and
    // the worker's own log.
    let row: String = sqlx::query_scalar("SELECT to_jsonb(r)::text FROM runs r WHERE id = $1")
        .bind(run_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let lines: Vec<String> = sqlx::query_scalar("SELECT message FROM run_logs WHERE run_id = $1")
        .bind(run_id)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let artifacts: Vec<(String, String)> =
        sqlx::query_as("SELECT to_jsonb(a)::text, url FROM run_artifacts a WHERE run_id = $1")
            .bind(run_id)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(!artifacts.is_empty(), "the member's artifact is stored");
    let mut files = Vec::new();
    for (_, url) in &artifacts {
        let path = url
            .strip_prefix("file://")
            .unwrap_or_else(|| panic!("not a file URL: {url}"));
        files.push(
            std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("read the artifact {path}: {e}")),
        );
    }
    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit(Duration::from_secs(20)).success());
    let everything = [
        vec![row],
        lines,
        artifacts.into_iter().map(|(row, _)| row).collect(),
        files,
        worker.seen.clone(),
    ]
    .concat()
    .join("\n");
    assert!(
        everything.contains(&alices_value),
        "Alice's own member rendered her value"
    );
    assert!(
        !everything.contains(&bobs_secret),
        "Bob's secret reached Alice's run or the worker's log:\n{everything}"
    );
}

/// Runs an `agentd` command against `url`; returns its exit success, stdout and stderr.
async fn agentd_command(url: &str, args: &[&str]) -> (bool, String, String) {
    let mut command = agentd();
    command.args(args).env("DATABASE_URL", url);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// GET `url`: status code and body.
async fn get(url: &str) -> (u16, String) {
    let client = agentd::executor::http::client(agentd::config::HttpClientSettings {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
    })
    .unwrap();
    let response = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// How many rows a run left: log lines and artifact rows.
async fn traces(db: &TestDb, run_id: Uuid) -> (i64, i64) {
    (
        count(
            &db.pool,
            &format!("SELECT count(*) FROM run_logs WHERE run_id = '{run_id}'"),
        )
        .await,
        count(
            &db.pool,
            &format!("SELECT count(*) FROM run_artifacts WHERE run_id = '{run_id}'"),
        )
        .await,
    )
}

/// `agentd run` (schedules planned, fired and reported, requests run with their lines and
/// artifacts, a dead replica's run reaped, retention, readiness), `trigger`, `cancel` and
/// `status` all work as a login role that is only a member of `agentd_worker` (owning
/// nothing, after the superuser migrated), and that role can change no table's definition.
#[tokio::test(flavor = "multi_thread")]
async fn the_worker_runs_as_a_login_role_that_owns_nothing() {
    let db = TestDb::migrated().await;
    let owner = tenant(&db).await;
    // A schedule due now, one to plan, one invalid, a run of a replica that died (its lease
    // expires in a second), and a finished run 40 days old for retention to delete.
    let schedule: Uuid = sqlx::query_scalar(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, timezone, next_run) \
         VALUES ($1, true, 'minutely', 1, 'UTC', now()) RETURNING id",
    )
    .bind(owner.agent)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let to_plan =
        support::create_schedule(&db.pool, owner.agent, "daily", Some("09:00"), "UTC").await;
    let invalid = support::create_schedule(
        &db.pool,
        owner.agent,
        "daily",
        Some("09:00"),
        "Mars/Olympus",
    )
    .await;
    let orphan = leased_run(&db, owner, "dead-replica", "1 second").await;
    let old_run: Uuid = sqlx::query_scalar(
        "INSERT INTO runs (type, target_id, status, start_time, end_time, triggered_by_id) \
         VALUES ('agent', $1, 'completed', now() - interval '40 days', now() - interval '40 days', $2) \
         RETURNING id",
    )
    .bind(owner.agent)
    .bind(owner.user)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO run_logs (run_id, message, timestamp) VALUES ($1, 'old', now() - interval '40 days')")
        .bind(old_run)
        .execute(&db.pool)
        .await
        .unwrap();

    let login = LoginRole::create(&db, "agentd_worker").await;
    let url = login.url();
    let mut worker = replica(
        &url,
        "least-privilege",
        &[
            ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "1s"),
            ("AGENTD__RETENTION__RUNS", "30d"),
        ],
    );
    let listening = worker.wait_for("operations endpoints listening", Duration::from_secs(30));
    let base = format!("http://{}", listening["addr"].as_str().unwrap());
    worker.wait_for("worker started", Duration::from_secs(30));
    let sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = current_database()",
    )
    .bind(&login.name)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(sessions >= 1, "the worker is connected as {}", login.name);
    eventually(Duration::from_secs(10), "/readyz answers ready", || async {
        get(&format!("{base}/readyz")).await == (200, r#"{"status":"ready"}"#.to_string())
    })
    .await;

    // The schedule fires and its run completes with lines and its artifact.
    eventually(
        Duration::from_secs(15),
        "the scheduled run completes",
        || async {
            count(
                &db.pool,
                &format!(
                    "SELECT count(*) FROM runs WHERE input->>'schedule_id' = '{schedule}' \
                 AND status = 'completed'"
                ),
            )
            .await
                == 1
        },
    )
    .await;
    let scheduled: Uuid =
        sqlx::query_scalar("SELECT id FROM runs WHERE input->>'schedule_id' = $1")
            .bind(schedule.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let (lines, artifacts) = traces(&db, scheduled).await;
    assert!(lines >= 3, "{lines} lines");
    assert_eq!(artifacts, 1);

    // A run asked for from the command line, as the same role.
    let (ok, stdout, stderr) =
        agentd_command(&url, &["trigger", "agent", &owner.agent.to_string()]).await;
    assert!(ok, "trigger: {stderr}");
    let requested: Uuid = stdout.trim().parse().unwrap();
    assert_eq!(
        wait_finished(&db, requested, Duration::from_secs(15)).await,
        ("completed".to_string(), None)
    );
    let (lines, artifacts) = traces(&db, requested).await;
    assert!(lines >= 3, "{lines} lines");
    assert_eq!(artifacts, 1);

    // One cancelled from the command line while it executes.
    let (ok, stdout, stderr) =
        agentd_command(&url, &["trigger", "agent", &owner.agent.to_string()]).await;
    assert!(ok, "trigger: {stderr}");
    let cancelled: Uuid = stdout.trim().parse().unwrap();
    wait_executing(&db, cancelled, Duration::from_secs(10)).await;
    let (ok, stdout, stderr) = agentd_command(&url, &["cancel", &cancelled.to_string()]).await;
    assert!(ok, "cancel: {stderr}");
    assert_eq!(
        stdout.trim(),
        format!("cancellation of run {cancelled} requested")
    );
    assert_eq!(
        wait_finished(&db, cancelled, Duration::from_secs(5)).await,
        ("failed".to_string(), Some("cancelled".to_string()))
    );

    let (ok, stdout, stderr) = agentd_command(&url, &["status", "--format", "json"]).await;
    assert!(ok, "status: {stderr}");
    let status: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["workers"][0]["id"], "least-privilege", "{status:#}");

    // The new schedule was planned, the invalid one reported to its owner.
    eventually(Duration::from_secs(10), "the schedules were planned", || async {
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM agent_schedules WHERE id = '{to_plan}' AND next_run IS NOT NULL"
            ),
        )
        .await
            + count(
                &db.pool,
                &format!(
                    "SELECT count(*) FROM runs WHERE input->>'schedule_id' = '{invalid}' \
                     AND status = 'failed' AND error LIKE 'invalid schedule: timezone:%'"
                ),
            )
            .await
            == 2
    })
    .await;

    // The dead replica's run was reaped.
    let (status, error) = wait_finished(&db, orphan, Duration::from_secs(10)).await;
    assert_eq!(status, "failed");
    assert!(
        error
            .as_deref()
            .unwrap_or_default()
            .starts_with("worker lost: dead-replica"),
        "{error:?}"
    );

    // Retention deleted the old run, its line included.
    eventually(
        Duration::from_secs(15),
        "retention deleted the old run",
        || async {
            count(
                &db.pool,
                &format!("SELECT count(*) FROM runs WHERE id = '{old_run}'"),
            )
            .await
                == 0
        },
    )
    .await;

    // The role changes no table's definition, agentd's own included.
    let mut connection = login.connect().await;
    for ddl in [
        "CREATE TABLE public.intruder ()",
        "CREATE TABLE agentd.intruder ()",
        "ALTER TABLE public.agents ADD COLUMN intruder text",
        "ALTER TABLE agentd.leases DISABLE TRIGGER ALL",
        "DROP TABLE public.run_logs",
        "ALTER POLICY \"agentd worker\" ON public.runs USING (false)",
    ] {
        let refused = sqlx::query(ddl).execute(&mut connection).await;
        assert_eq!(refusal(&refused, ddl).0, "42501", "{ddl}");
    }
    connection.close().await.unwrap();

    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit(Duration::from_secs(20)).success());
    let refused: Vec<&String> = worker
        .seen
        .iter()
        .filter(|line| line.contains("permission denied") || line.contains("\"level\":\"error\""))
        .collect();
    assert!(
        refused.is_empty(),
        "the worker was refused something: {refused:#?}"
    );
    drop(worker);
    login.remove().await;
}

/// Waits until the worker has published `max_pending_per_user` into `agentd.limits`.
async fn wait_published(db: &TestDb, max_pending_per_user: i64) {
    eventually(
        Duration::from_secs(30),
        "the worker published requests.max_pending_per_user",
        || async {
            count(
                &db.pool,
                &format!(
                    "SELECT count(*) FROM agentd.limits WHERE max_pending_per_user = {max_pending_per_user}"
                ),
            )
            .await
                == 1
        },
    )
    .await;
}

/// Fairness (the issue's part 8): Alice queues 5,000 slow runs, enough to hold every slot
/// for well over an hour. Bob's schedule that becomes due starts within
/// a second of its time (not when one of Alice's runs ends), and a single request of Carol
/// queued behind the flood is taken by the next claim (users take turns, counting the runs
/// they have in flight).
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_one_users_requests_delays_neither_anothers_schedule_nor_their_request() {
    let db = TestDb::migrated().await;
    let alice = tenant(&db).await;
    let bob = tenant(&db).await;
    let carol = tenant(&db).await;
    let schedule: Uuid = sqlx::query_scalar(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) \
         VALUES ($1, true, 'daily', 1, '03:00', 'UTC') RETURNING id",
    )
    .bind(bob.agent)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // Four slots, all of them Alice's; every run takes about 2 s (two pauses of 1 s).
    let mut worker = replica(
        &db.url,
        "fairness",
        &[
            ("AGENTD__WORKER__CONCURRENCY", "4"),
            ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "1s"),
            ("AGENTD__REQUESTS__MAX_PENDING_PER_USER", "10000"),
            ("AGENTD__SHUTDOWN__GRACE", "1s"),
        ],
    );
    worker.wait_for("worker started", Duration::from_secs(30));
    wait_published(&db, 10000).await;
    eventually(Duration::from_secs(10), "Bob's schedule is planned", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM agent_schedules WHERE id = '{schedule}' AND next_run > now()"),
        )
        .await
            == 1
    })
    .await;

    // The flood, through the API.
    let flooded: i64 = as_user(
        &db.pool,
        alice.user,
        &format!(
            "SELECT count(id) FROM (SELECT public.request_run('agent', '{}') AS id \
             FROM generate_series(1, 5000)) requested",
            alice.agent
        ),
    )
    .await
    .unwrap();
    assert_eq!(flooded, 5000);
    let running = |user: Uuid| {
        let pool = db.pool.clone();
        async move {
            count(
                &pool,
                &format!("SELECT count(*) FROM runs WHERE triggered_by_id = '{user}' AND status = 'running'"),
            )
            .await
        }
    };
    eventually(
        Duration::from_secs(10),
        "Alice's runs hold every slot",
        || async { running(alice.user).await == 4 },
    )
    .await;

    // Bob's schedule becomes due: he sets next_run to now.
    let due: chrono::DateTime<chrono::Utc> = as_user(
        &db.pool,
        bob.user,
        &format!(
            "UPDATE agent_schedules SET next_run = now() WHERE id = '{schedule}' RETURNING next_run"
        ),
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "Bob's scheduled run starts",
        || async {
            count(
                &db.pool,
                &format!("SELECT count(*) FROM runs WHERE input->>'schedule_id' = '{schedule}'"),
            )
            .await
                == 1
        },
    )
    .await;
    let (scheduled_for, lag_ms): (String, f64) = sqlx::query_as(
        "SELECT input->>'scheduled_for', \
                extract(epoch FROM start_time - (input->>'scheduled_for')::timestamptz)::float8 * 1000 \
           FROM runs WHERE input->>'schedule_id' = $1",
    )
    .bind(schedule.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        scheduled_for
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap(),
        due,
        "the run is for the time Bob set"
    );
    assert!(
        (0.0..1000.0).contains(&lag_ms),
        "Bob's run started {lag_ms} ms after its time"
    );

    // Carol's one request, queued behind Alice's thousands, is in the next claim: no claim
    // that began after it was queued takes one of Alice's instead.
    let carols: Uuid = as_user(
        &db.pool,
        carol.user,
        &format!("SELECT public.request_run('agent', '{}')", carol.agent),
    )
    .await
    .unwrap();
    let queued_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "Carol's run starts", || async {
        run_state(&db, carols).await.is_some()
    })
    .await;
    let started: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT start_time FROM runs WHERE id = $1")
            .bind(carols)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let alices_before: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE triggered_by_id = $1 \
         AND start_time > $2 AND start_time < $3",
    )
    .bind(alice.user)
    .bind(queued_at)
    .bind(started)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        alices_before, 0,
        "runs of Alice claimed after Carol asked and before Carol's"
    );
    let alices_left = count(
        &db.pool,
        &format!(
            "SELECT count(*) FROM agentd.requests WHERE requested_by = '{}'",
            alice.user
        ),
    )
    .await;
    assert!(alices_left > 4900, "{alices_left} of Alice's requests left");

    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit(Duration::from_secs(20)).success());
}

/// A user may have at most `requests.max_pending_per_user` runs queued, as the
/// worker published it; the next `request_run` is refused (53400) and other users are not.
#[tokio::test(flavor = "multi_thread")]
async fn request_run_refuses_a_users_request_beyond_the_published_limit() {
    let db = TestDb::migrated().await;
    let alice = tenant(&db).await;
    let bob = tenant(&db).await;
    let dave = tenant(&db).await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.limits").await,
        0
    );
    // One slot, held by a long run of Dave's: nothing else starts.
    let mut worker = replica(
        &db.url,
        "limits",
        &[
            ("AGENTD__REQUESTS__MAX_PENDING_PER_USER", "3"),
            ("AGENTD__WORKER__CONCURRENCY", "1"),
            ("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "60s"),
            ("AGENTD__SHUTDOWN__GRACE", "1s"),
        ],
    );
    worker.wait_for("worker started", Duration::from_secs(30));
    wait_published(&db, 3).await;
    let request = |tenant: Tenant| {
        let pool = db.pool.clone();
        async move {
            as_user::<Uuid>(
                &pool,
                tenant.user,
                &format!("SELECT public.request_run('agent', '{}')", tenant.agent),
            )
            .await
        }
    };
    let daves = request(dave).await.unwrap();
    wait_executing(&db, daves, Duration::from_secs(10)).await;

    let mut queued = Vec::new();
    for _ in 0..3 {
        queued.push(request(alice).await.expect("Alice's first three requests"));
    }
    let fourth = request(alice).await;
    let (code, message) = refusal(&fourth, "Alice's fourth queued request");
    assert_eq!(code, "53400", "{message}");
    assert!(
        message.contains("requests.max_pending_per_user = 3"),
        "{message}"
    );
    request(bob)
        .await
        .expect("Bob is not limited by Alice's queue");
    // A cancelled request makes room again.
    let taken: bool = as_user(
        &db.pool,
        alice.user,
        &format!("SELECT public.cancel_run('{}')", queued[0]),
    )
    .await
    .unwrap();
    assert!(taken);
    request(alice)
        .await
        .expect("Alice asks again after a cancel");
    assert_eq!(
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM agentd.requests WHERE requested_by = '{}'",
                alice.user
            )
        )
        .await,
        3
    );

    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit(Duration::from_secs(20)).success());
}
