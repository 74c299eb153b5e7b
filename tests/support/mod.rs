//! Shared helpers for the integration tests: a fresh database per test on a real server.
//!
//! The server is the one `DATABASE_URL` names when it is set; otherwise one private server
//! that the test run starts itself from the machine's PostgreSQL binaries (with agentd's own
//! embedded-server code), in `target/tmp/agentd-test-pg`, shared by every test process and
//! left running for the next run (stop it with `pg_ctl -D target/tmp/agentd-test-pg stop`).
//! No test skips for want of a database: if neither works, the test fails and says why.
#![allow(dead_code)]

pub mod pgbouncer;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use agentd::embedded_pg::{EmbeddedOptions, EmbeddedPostgres};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};

/// How to reach the test server.
struct Server {
    /// Options for the maintenance database, used to create and drop test databases.
    admin: PgConnectOptions,
    /// A URL template: `{db}` is replaced by a database name.
    /// A URL of the server; each test's URL is it with the test's database.
    url: String,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

fn server() -> &'static Server {
    let server = SERVER.get_or_init(|| {
        // Started on a thread of its own with its own runtime: each #[tokio::test] has a
        // runtime that ends with the test, and this must outlive them all.
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(start_server())
        })
        .join()
        .unwrap_or_else(|_| Err("starting the test server panicked".into()))
    });
    match server {
        Ok(server) => server,
        Err(reason) => panic!("no PostgreSQL for the tests: {reason}"),
    }
}

async fn start_server() -> Result<Server, String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let admin = PgConnectOptions::from_str(&url).map_err(|e| format!("DATABASE_URL: {e}"))?;
        return Ok(Server { admin, url });
    }
    let data_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("agentd-test-pg");
    let embedded = EmbeddedPostgres::start(&EmbeddedOptions {
        data_dir,
        bin_dir: None,
        start_timeout: Duration::from_secs(60),
        unsafe_no_fsync: true,
        keep_running: true,
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(Server {
        admin: embedded.admin_options(),
        url: embedded.url("postgres"),
    })
}

/// Where the test server listens: a host name, address or socket folder, and a port.
pub fn server_address() -> (String, u16) {
    let admin = &server().admin;
    let host = match admin.get_socket() {
        Some(folder) => folder.display().to_string(),
        None => admin.get_host().to_string(),
    };
    (host, admin.get_port())
}

/// A database of its own for one test, dropped when the value is dropped.
pub struct TestDb {
    /// A pool connected as the server's superuser (the role agentd itself would use).
    pub pool: PgPool,
    /// The database's name.
    pub name: String,
    /// A URL for child processes (`agentd` itself).
    pub url: String,
}

impl TestDb {
    /// An empty database.
    pub async fn new() -> TestDb {
        let server = server();
        let name = format!("agentd_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect_with(&server.admin)
            .await
            .expect("connect to the test server");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let _ = admin.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect_with(server.admin.clone().database(&name))
            .await
            .expect("connect to the test database");
        TestDb {
            pool,
            url: agentd::store::url_with_database(&server.url, &name),
            name,
        }
    }

    /// A database with agentd's migrations applied.
    pub async fn migrated() -> TestDb {
        let db = TestDb::new().await;
        agentd::store::migrate(&db.pool)
            .await
            .expect("migrate the test database");
        db
    }

    /// Connection options for this database, as the superuser.
    pub fn options(&self) -> PgConnectOptions {
        server().admin.clone().database(&self.name)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = server().admin.clone();
        // Drop cannot await; a short-lived thread with its own runtime does the cleanup.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect_with(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

/// Runs `sql` (several statements allowed) on the database.
pub async fn execute_script(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}"));
}

/// The path of the `agentd` binary built for these tests.
pub fn agentd_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agentd"))
}

/// `agentd` with a clean environment: no inherited AGENTD_*/DATABASE_URL/RUST_LOG.
pub fn agentd() -> Command {
    let mut command = Command::new(agentd_binary());
    for (name, _) in std::env::vars() {
        if name.starts_with("AGENTD") || name == "DATABASE_URL" || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command.env("AGENTD__LOGGING__FORMAT", "json");
    // Tests run daemons side by side: each gets a free port for its endpoints (the bound
    // address is in the "operations endpoints listening" line).
    command.env("AGENTD__HTTP__LISTEN", "127.0.0.1:0");
    command
}

/// A running `agentd` whose stdout lines arrive on a channel.
pub struct Daemon {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Daemon {
    pub fn start(mut command: Command) -> Daemon {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (sender, lines) = mpsc::channel();
        let stderr_sender = sender.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        // Read stderr too, so a chatty child never blocks on a full pipe; its lines are
        // kept (as JSON strings, so every line in `seen` parses as JSON).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let wrapped = serde_json::json!({ "stderr": line, "message": "" }).to_string();
                if stderr_sender.send(wrapped).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a JSON log line whose message contains `text`; returns it parsed.
    pub fn wait_for(&mut self, text: &str, limit: Duration) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    let parsed: serde_json::Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
                    if parsed["message"].as_str().unwrap_or("").contains(text) {
                        return parsed;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no log line with {text:?} within {limit:?}; saw: {:#?}",
            self.seen
        );
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for the exit status; fails the test after `limit`.
    /// SIGTERM, then a second signal once the first was seen: agentd must exit with 130
    /// within its forced-exit limit (and a second of slack).
    pub fn stop_at_once(&mut self) {
        self.signal(Signal::SIGTERM);
        self.wait_for("shutdown requested", Duration::from_secs(5));
        let second = Instant::now();
        self.signal(Signal::SIGINT);
        let status = self.wait_exit(Duration::from_secs(10));
        let took = second.elapsed();
        assert_eq!(status.code(), Some(130), "{:#?}", self.seen);
        assert!(
            took < agentd::shutdown::FORCED_EXIT_LIMIT + Duration::from_secs(1),
            "agentd exited {took:?} after the second signal"
        );
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "agentd did not exit within {limit:?}; saw: {:#?}",
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Daemon {
    /// Every line received so far (and any waiting now), without blocking.
    pub fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test must not leave replicas behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGCONT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `agentd run` as one replica against `url`, with JSON logs and extra settings.
pub fn replica(url: &str, worker_id: &str, settings: &[(&str, &str)]) -> Daemon {
    Daemon::start(replica_command(url, worker_id, settings))
}

/// The command [`replica`] starts, for a test that changes more than its settings (the
/// user it runs as, say).
pub fn replica_command(url: &str, worker_id: &str, settings: &[(&str, &str)]) -> Command {
    let mut command = agentd();
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("replica-artifacts");
    command
        .arg("run")
        .env("DATABASE_URL", url)
        .env("AGENTD__WORKER__ID", worker_id)
        .env("AGENTD__ARTIFACTS__DIR", artifacts);
    for (name, value) in settings {
        command.env(name, value);
    }
    command
}

/// A PostgreSQL server of the test's own (data in `folder`), which the test may stop and
/// start again, with agentd's migrations applied to its database; returns the options to
/// restart it with, the server, and its database's URL.
pub async fn private_server(
    folder: &std::path::Path,
) -> (EmbeddedOptions, EmbeddedPostgres, String) {
    let options = EmbeddedOptions {
        data_dir: folder.join("pg"),
        bin_dir: None,
        start_timeout: Duration::from_secs(60),
        unsafe_no_fsync: true,
        keep_running: false,
    };
    let server = EmbeddedPostgres::start(&options).await.unwrap();
    let url = server.url(agentd::embedded_pg::DATABASE_NAME);
    let pool = server_pool(&server).await;
    agentd::store::migrate(&pool).await.unwrap();
    pool.close().await;
    (options, server, url)
}

/// A small pool on the database of a [`private_server`].
pub async fn server_pool(server: &EmbeddedPostgres) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect_with(server.connect_options())
        .await
        .unwrap()
}

/// Asks for a run of `agent` (as the worker's role would); returns the run's id.
pub async fn request_agent_run(pool: &sqlx::PgPool, agent: uuid::Uuid) -> uuid::Uuid {
    agentd::store::runs::request_run(pool, agentd::store::runs::RunKind::Agent, agent, None)
        .await
        .unwrap()
}

/// A user, with a unique email.
pub async fn create_user(pool: &sqlx::PgPool) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO users (id, email, name) VALUES ($1, $2, 'Test user')")
        .bind(id)
        .bind(format!("{id}@example.com"))
        .execute(pool)
        .await
        .unwrap();
    id
}

/// An agent of `user_id`.
pub async fn create_agent(pool: &sqlx::PgPool, user_id: uuid::Uuid) -> uuid::Uuid {
    sqlx::query_scalar(
        "INSERT INTO agents (name, icon, category, instructions, user_id) \
         VALUES ('Test agent', 'bot', 'test', 'Say hello', $1) RETURNING id",
    )
    .bind(user_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Gives `agent_id` these variables (name, value).
pub async fn set_variables(pool: &sqlx::PgPool, agent_id: uuid::Uuid, variables: &[(&str, &str)]) {
    for (name, value) in variables {
        sqlx::query(
            "INSERT INTO agent_variables (agent_id, name, description, value) \
             VALUES ($1, $2, 'set by the test', $3)",
        )
        .bind(agent_id)
        .bind(name)
        .bind(value)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// An enabled schedule of `agent_id`.
pub async fn create_schedule(
    pool: &sqlx::PgPool,
    agent_id: uuid::Uuid,
    frequency: &str,
    time: Option<&str>,
    timezone: &str,
) -> uuid::Uuid {
    sqlx::query_scalar(
        "INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) \
         VALUES ($1, true, $2, 1, $3, $4) RETURNING id",
    )
    .bind(agent_id)
    .bind(frequency)
    .bind(time)
    .bind(timezone)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until `probe` returns true, polling; fails the test with `what` after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if probe().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until run `run_id` is `running` (claimed, its executor started), within `limit`.
pub async fn wait_running(pool: &sqlx::PgPool, run_id: uuid::Uuid, limit: Duration, what: &str) {
    let sql = format!("SELECT count(*) FROM runs WHERE id = '{run_id}' AND status = 'running'");
    eventually(limit, what, || async { count(pool, &sql).await == 1 }).await;
}

/// Scheduled runs as (schedule_id, scheduled_for, status, error, missed).
pub async fn scheduled_runs(
    pool: &sqlx::PgPool,
) -> Vec<(String, String, String, Option<String>, i64)> {
    sqlx::query_as(
        "SELECT input->>'schedule_id', coalesce(input->>'scheduled_for', ''), status, error, \
                coalesce((input->>'missed')::bigint, 0) \
           FROM runs WHERE input->>'trigger' = 'schedule' ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A worker running inside the test process (the library's real services, with an
/// executor the test provides), on its own pool.
pub struct InProcessWorker {
    pub shutdown: tokio_util::sync::CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
}

impl InProcessWorker {
    /// Starts a worker on `db` with settings overridden as environment variables would
    /// (`("AGENTD__LEASE__TTL", "3s")`).
    pub async fn start(
        db: &TestDb,
        worker_id: &str,
        overrides: &[(&str, &str)],
        executor: std::sync::Arc<dyn agentd::executor::Executor>,
    ) -> InProcessWorker {
        Self::start_with(db, worker_id, overrides, Some(executor)).await
    }

    /// A worker whose executors come from its settings, as `agentd run` builds them.
    pub async fn start_configured(
        db: &TestDb,
        worker_id: &str,
        overrides: &[(&str, &str)],
    ) -> InProcessWorker {
        Self::start_with(db, worker_id, overrides, None).await
    }

    async fn start_with(
        db: &TestDb,
        worker_id: &str,
        overrides: &[(&str, &str)],
        executor: Option<std::sync::Arc<dyn agentd::executor::Executor>>,
    ) -> InProcessWorker {
        let mut env: std::collections::HashMap<String, String> = overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.insert("AGENTD__WORKER__ID".into(), worker_id.into());
        let settings = agentd::config::Settings::load(None, &env).unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let pool = agentd::store::connect(
            db.options(),
            &settings.database,
            Some(Duration::from_secs(10)),
            &shutdown,
        )
        .await
        .unwrap();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move {
            let executors = match executor {
                Some(executor) => agentd::executor::Executors::single(executor),
                None => agentd::executor::from_settings(&settings).unwrap(),
            };
            agentd::worker::serve(
                pool.clone(),
                &settings,
                executors,
                agentd::health::Health::new(),
                token,
            )
            .await
            .unwrap();
            pool.close().await;
        });
        InProcessWorker { shutdown, handle }
    }

    /// Signals shutdown and waits for the worker to stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap();
    }
}

/// A real in-process executor: logs, sleeps `delay`, logs again, completes.
pub struct SleepyExecutor {
    pub delay: Duration,
}

impl agentd::executor::Executor for SleepyExecutor {
    fn name(&self) -> &'static str {
        "sleepy"
    }

    fn execute<'a>(
        &'a self,
        run: &'a agentd::executor::RunContext,
    ) -> agentd::executor::BoxFuture<'a, agentd::executor::Outcome> {
        Box::pin(async move {
            run.logs.info("working").await;
            tokio::time::sleep(self.delay).await;
            run.logs.info("done").await;
            agentd::executor::Outcome::Completed {
                output: serde_json::json!({ "slept_ms": self.delay.as_millis() as u64 }),
            }
        })
    }
}

/// Runs one statement as `authenticated` user `user_id` (PostgREST's way: SET ROLE plus JWT
/// claims) and returns its single value.
pub async fn as_user<T>(
    pool: &sqlx::PgPool,
    user_id: uuid::Uuid,
    sql: &str,
) -> Result<T, sqlx::Error>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL ROLE authenticated")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT set_config('request.jwt.claims', $1, true)")
        .bind(format!(r#"{{"sub":"{user_id}","role":"authenticated"}}"#))
        .execute(&mut *tx)
        .await?;
    let value = sqlx::query_scalar::<_, T>(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(value)
}

/// The single `bigint` a query returns (counts, mostly).
pub async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// What one run stored: its row, its log lines, its artifacts.
#[derive(Debug)]
pub struct RunRecord {
    pub status: String,
    pub error: Option<String>,
    pub output: Option<serde_json::Value>,
    /// `(level, message)`, in order.
    pub logs: Vec<(String, String)>,
    /// `(name, url)`, by name.
    pub artifacts: Vec<(String, String)>,
    /// The run's row, its log rows and its artifact rows as JSON text, and the stored
    /// content of its artifacts (`file://` URLs): what "appears nowhere" checks search.
    pub stored: String,
}

/// Waits until run `run_id` has ended (fails the test after `limit`), then reads it back.
pub async fn finished_run(pool: &sqlx::PgPool, run_id: uuid::Uuid, limit: Duration) -> RunRecord {
    eventually(limit, &format!("run {run_id} ends"), || async {
        count(
            pool,
            &format!("SELECT count(*) FROM runs WHERE id = '{run_id}' AND status <> 'running'"),
        )
        .await
            == 1
    })
    .await;
    run_record(pool, run_id).await
}

/// What run `run_id` has stored so far.
pub async fn run_record(pool: &sqlx::PgPool, run_id: uuid::Uuid) -> RunRecord {
    let (status, error, output, row): (String, Option<String>, Option<serde_json::Value>, String) =
        sqlx::query_as("SELECT status, error, output, to_jsonb(r)::text FROM runs r WHERE id = $1")
            .bind(run_id)
            .fetch_one(pool)
            .await
            .unwrap();
    let logs = sqlx::query_as(
        "SELECT level, message FROM run_logs WHERE run_id = $1 ORDER BY timestamp, id",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .unwrap();
    let artifacts: Vec<(String, String)> =
        sqlx::query_as("SELECT name, url FROM run_artifacts WHERE run_id = $1 ORDER BY name")
            .bind(run_id)
            .fetch_all(pool)
            .await
            .unwrap();
    let rows: String = sqlx::query_scalar(
        "SELECT concat_ws(E'\\n', \
           (SELECT jsonb_agg(to_jsonb(l))::text FROM run_logs l WHERE run_id = $1), \
           (SELECT jsonb_agg(to_jsonb(a))::text FROM run_artifacts a WHERE run_id = $1))",
    )
    .bind(run_id)
    .fetch_one(pool)
    .await
    .unwrap();
    let mut stored = format!("{row}\n{rows}");
    for (_, url) in &artifacts {
        if let Some(path) = url.strip_prefix("file://") {
            let content = std::fs::read(path).unwrap_or_default();
            stored.push('\n');
            stored.push_str(&String::from_utf8_lossy(&content));
        }
    }
    RunRecord {
        status,
        error,
        output,
        logs,
        artifacts,
        stored,
    }
}

/// One process as `/proc/<pid>/status` shows it.
#[derive(Debug, Clone)]
pub struct ProcessEntry {
    pub pid: i32,
    pub parent: i32,
    /// The real user.
    pub uid: u32,
    /// `R`, `S`, `Z`, …
    pub state: char,
    /// The command line, arguments joined by spaces (empty for a zombie).
    pub command: String,
}

/// Every process on the host (the tests run as root, so every one is visible).
pub fn process_table() -> Vec<ProcessEntry> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix(name))
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(str::to_string)
            };
            let command = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            Some(ProcessEntry {
                pid,
                parent: field("PPid:")?.parse().ok()?,
                uid: field("Uid:")?.parse().ok()?,
                state: field("State:")?.chars().next()?,
                command: String::from_utf8_lossy(&command)
                    .trim_end_matches('\0')
                    .replace('\0', " "),
            })
        })
        .collect()
}

/// Whether process `pid`'s environment holds `entry` (`NAME=value`) exactly.
pub fn environ_holds(pid: i32, entry: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
        environ
            .split(|byte| *byte == 0)
            .any(|item| item == entry.as_bytes())
    })
}

/// `url` with its user (and password) replaced: `postgres://old@h/db?x` →
/// `postgres://user:password@h/db?x`.
fn replace_user(url: &str, user: &str, password: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("the test server's URL parses");
    parsed.set_username(user).expect("the URL has a host");
    parsed
        .set_password(Some(password))
        .expect("the URL has a host");
    parsed.to_string()
}

/// A login role of one test's own on the test server. Roles belong to the server, not to a
/// database, so each test makes its own under a unique name; it has a password, so its URL
/// works whatever authentication the server asks for. Dropped (`DROP OWNED BY` in the
/// test's database, then `DROP ROLE`) by [`LoginRole::remove`], or when the value is
/// dropped if the test failed first.
pub struct LoginRole {
    pub name: String,
    password: String,
    /// The test database as the superuser.
    admin: PgConnectOptions,
    /// The test database's URL, as the superuser.
    database_url: String,
    removed: bool,
}

impl LoginRole {
    /// `CREATE ROLE … LOGIN IN ROLE member_of` (e.g. `authenticated`, `agentd_worker`).
    pub async fn create(db: &TestDb, member_of: &str) -> LoginRole {
        let name = format!(
            "agentd_test_login_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
        let password = uuid::Uuid::new_v4().simple().to_string();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE {member_of}"
        )))
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("create role {name} in {member_of}: {e}"));
        LoginRole {
            name,
            password,
            admin: db.options(),
            database_url: db.url.clone(),
            removed: false,
        }
    }

    /// A URL of the test database that logs in as this role (for child processes).
    pub fn url(&self) -> String {
        replace_user(&self.database_url, &self.name, &self.password)
    }

    /// A new connection to the test database as this role.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url())
            .await
            .unwrap_or_else(|e| panic!("connect as {}: {e}", self.name))
    }

    /// Drops the role and everything it owns or was granted in the test database; fails
    /// the test if the server refuses.
    pub async fn remove(mut self) {
        self.removed = true;
        if let Err(error) = drop_role(&self.admin, &self.name).await {
            panic!("drop role {}: {error}", self.name);
        }
    }
}

async fn drop_role(admin: &PgConnectOptions, name: &str) -> Result<(), sqlx::Error> {
    let mut connection = PgConnection::connect_with(admin).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {name}; DROP ROLE {name}"
    )))
    .execute(&mut connection)
    .await?;
    connection.close().await
}

impl Drop for LoginRole {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop cannot await; a short-lived thread with its own runtime does the cleanup.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let _ = runtime.block_on(drop_role(&admin, &name));
        })
        .join();
    }
}

/// The database's refusal as (SQLSTATE, message); fails the test when `result` is not one.
pub fn refusal<T: std::fmt::Debug>(
    result: &Result<T, sqlx::Error>,
    what: &str,
) -> (String, String) {
    match result {
        Err(sqlx::Error::Database(error)) => (
            error.code().unwrap_or_default().into_owned(),
            error.message().to_string(),
        ),
        other => panic!("{what}: expected the database to refuse, got {other:?}"),
    }
}

/// What a Supabase project has before the application's schema: its roles (with the
/// default grants Supabase gives them on new tables in `public`), schema `auth` and its
/// `auth.uid()`, which reads the claim differently from our stand-in.
pub const SUPABASE_PLATFORM: &str = r#"
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN CREATE ROLE anon NOLOGIN NOINHERIT; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN CREATE ROLE authenticated NOLOGIN NOINHERIT; END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
CREATE SCHEMA auth;
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
  SELECT coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated;
GRANT USAGE ON SCHEMA public TO anon, authenticated;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated;
"#;
