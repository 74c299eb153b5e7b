//! The command line and the daemon's life: version and help, configuration errors, start on
//! the embedded default, retrying an unreachable database, a clean stop on SIGTERM, and an
//! exit at once on a second signal that leaves neither a run's program nor the embedded
//! server running.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sqlx::postgres::{PgConnectOptions, PgPool};
use support::{
    Daemon, TestDb, agentd, create_agent, create_user, environ_holds, eventually, process_table,
    request_agent_run,
};

#[test]
fn version_and_help_for_every_command() {
    let output = agentd().arg("--version").output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("agentd {}", env!("CARGO_PKG_VERSION"))
    );
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["migrate", "--help"],
        vec!["help", "run"],
    ] {
        let output = agentd().args(&args).output().unwrap();
        assert!(output.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("Usage: agentd"), "{args:?}: {text}");
    }
    let run_help = agentd().args(["run", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&run_help.stdout).contains("--migrate"));
}

/// Runs agentd expecting a configuration error: exit status 2 and exactly one stderr line.
fn config_error(command: &mut Command) -> String {
    let output = command.arg("run").output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr.trim().to_string()
}

#[test]
fn bad_configuration_stops_start_up_with_one_line_naming_key_and_value() {
    let line = config_error(agentd().env("AGENTD__DATABASE__MAX_CONNECTIONS", "lots"));
    assert_eq!(
        line,
        "config: database.max_connections = \"lots\" (from environment variable \
         AGENTD__DATABASE__MAX_CONNECTIONS): expected a whole number from 1 to 10000"
    );
    let line = config_error(agentd().env("AGENTD__DATABASE__MAX_CONNECTIONS", "0"));
    assert!(line.contains("database.max_connections = 0"), "{line}");
    let line = config_error(agentd().env("AGENTD__EXECUTION__DEFAULT", "docker"));
    assert_eq!(
        line,
        "config: execution.default = \"docker\" (from environment variable \
         AGENTD__EXECUTION__DEFAULT): expected builtin, command, openai or webhook"
    );
    let line = config_error(agentd().env("AGENTD__WORKER__CONCURENCY", "4"));
    assert_eq!(
        line,
        "config: unknown key worker.concurency (from environment variable \
         AGENTD__WORKER__CONCURENCY)"
    );

    let folder = tempfile::tempdir().unwrap();
    let file = folder.path().join("agentd.toml");
    std::fs::write(&file, "[database]\nconnect_timeout = \"forever\"\n").unwrap();
    let line = config_error(agentd().arg("--config").arg(&file));
    assert!(
        line.starts_with("config: database.connect_timeout = \"forever\" (from ")
            && line.contains("agentd.toml"),
        "{line}"
    );

    std::fs::write(&file, "[schedular]\nbatch_size = 10\n").unwrap();
    let line = config_error(agentd().env("AGENTD_CONFIG", &file));
    assert!(
        line.starts_with("config: unknown key schedular.batch_size"),
        "{line}"
    );

    std::fs::write(&file, "[database\nurl=").unwrap();
    let line = config_error(agentd().arg("--config").arg(&file));
    assert!(line.contains("is not valid TOML"), "{line}");

    let line = config_error(
        agentd()
            .arg("--config")
            .arg(folder.path().join("missing.toml")),
    );
    assert!(line.starts_with("config: cannot read"), "{line}");

    // A level misspelled is refused (as a filter it would name a module, and silence every
    // line), under the section's new name and its old one.
    for (variable, value) in [
        ("AGENTD__LOGGING__LEVEL", "warning"),
        ("AGENTD__LOG__LEVEL", "verbose"),
        ("AGENTD__LOGGING__LEVEL", "info,sqlx=warn,chatty"),
    ] {
        let output = agentd().arg("run").env(variable, value).output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(2),
            "{variable}={value}: {output:?}"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        let line = stderr
            .lines()
            .find(|line| line.starts_with("config:"))
            .unwrap_or_else(|| panic!("{variable}={value}: no config line: {stderr}"));
        assert!(
            line.contains("logging.level") && line.contains("is not a level"),
            "{line}"
        );
    }

    let line = config_error(agentd().env("DATABASE_URL", "mysql://root:hunter2@db/app"));
    assert!(
        line.contains("database.url") && !line.contains("hunter2"),
        "{line}"
    );
}

/// The JSON lines of a one-shot command's stderr that contain `word`.
fn logged(stderr: &[u8], word: &str) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|line| line.contains(word))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect()
}

#[test]
fn an_old_section_name_works_and_says_so_once() {
    // A healthcheck of a port nothing listens on: it loads the settings, sets up logging,
    // and fails without needing a database.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let output = agentd()
        .env_remove("AGENTD__LOGGING__FORMAT")
        .env("AGENTD__LOG__FORMAT", "json")
        .args(["healthcheck", "--url", &url])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let warnings = logged(&output.stderr, "deprecated");
    assert_eq!(warnings.len(), 1, "{output:?}");
    assert_eq!(warnings[0]["level"], "warn");
    assert_eq!(
        warnings[0]["message"],
        "config: environment variable AGENTD__LOG__FORMAT is deprecated, rename it \
         AGENTD__LOGGING__FORMAT"
    );

    // Both names: the new one wins (the lines stay JSON), and the warning says so.
    let output = agentd()
        .env("AGENTD__LOG__FORMAT", "text")
        .args(["healthcheck", "--url", &url])
        .output()
        .unwrap();
    let warnings = logged(&output.stderr, "deprecated");
    assert_eq!(warnings.len(), 1, "{output:?}");
    assert_eq!(
        warnings[0]["message"],
        "config: environment variable AGENTD__LOG__FORMAT is deprecated and ignored: \
         AGENTD__LOGGING__FORMAT is set too and wins"
    );
}

#[test]
fn runs_on_the_embedded_default_and_stops_cleanly_on_sigterm() {
    let folder = tempfile::tempdir().unwrap();
    // Plain `agentd run`, as README says: the embedded database is migrated without
    // --migrate (it is this process's own).
    let mut daemon = Daemon::start({
        let mut command = agentd();
        command.arg("run").current_dir(folder.path());
        command
    });
    daemon.wait_for("embedded PostgreSQL started", Duration::from_secs(60));
    let applied = daemon.wait_for("migrations applied", Duration::from_secs(30));
    assert!(applied["applied"].as_u64().unwrap() >= 4);
    let running = daemon.wait_for("agentd running", Duration::from_secs(10));
    assert!(
        running["worker_id"]
            .as_str()
            .unwrap()
            .ends_with(&format!("-{}", daemon.child.id()))
    );
    let pid_file = folder.path().join(".agentd/postgres/postmaster.pid");
    assert!(
        pid_file.exists(),
        "the embedded server keeps its data under .agentd/postgres"
    );
    // The listener's check (a NOTIFY through the pool must arrive within 2 s) passes on
    // the embedded server's socket too.
    daemon.wait_for("worker started", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));

    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}: {:#?}", daemon.seen);
    assert!(!pid_file.exists(), "the embedded server was not stopped");
    assert!(
        !daemon
            .seen
            .iter()
            .any(|line| line.contains("polling for new work instead")),
        "{:#?}",
        daemon.seen
    );

    // A second start reuses the data folder (no initdb) and finds the schema current.
    let mut again = Daemon::start({
        let mut command = agentd();
        command
            .arg("run")
            .arg("--migrate")
            .current_dir(folder.path());
        command
    });
    let applied = again.wait_for("migrations applied", Duration::from_secs(60));
    assert_eq!(applied["applied"], 0);
    again.signal(Signal::SIGINT);
    assert!(again.wait_exit(Duration::from_secs(30)).success());
}

/// Living processes whose environment holds `marker` (`AGENTD_RUN_ID=<id>`).
fn living_marked(marker: &str) -> Vec<i32> {
    process_table()
        .into_iter()
        .filter(|process| process.state != 'Z' && environ_holds(process.pid, marker))
        .map(|process| process.pid)
        .collect()
}

/// Whether `pid` runs (a zombie does not).
fn running(pid: i32) -> bool {
    process_table()
        .iter()
        .any(|process| process.pid == pid && process.state != 'Z')
}

/// Kills what a failed test left: a run's processes and an embedded server.
struct Leftovers {
    marker: Option<String>,
    postmaster: Option<i32>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let mut pids = self
            .marker
            .as_deref()
            .map(living_marked)
            .unwrap_or_default();
        pids.extend(self.postmaster);
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The embedded server's postmaster pid and socket folder, from its `postmaster.pid`.
fn postmaster_of(data_dir: &Path) -> (i32, String) {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    (
        lines[0].trim().parse().unwrap(),
        lines[4].trim().to_string(),
    )
}

async fn embedded_pool(socket_dir: &str) -> PgPool {
    PgPool::connect_with(
        PgConnectOptions::new()
            .socket(socket_dir)
            .port(5432)
            .username("postgres")
            .database("agentd"),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_kills_the_runs_programs_and_stops_the_embedded_server() {
    let folder = tempfile::tempdir().unwrap();
    let data_dir = folder.path().join(".agentd/postgres");
    // Plain `agentd run` on the embedded default; the test agents' category runs a program
    // that never ends on its own.
    let start = || {
        let mut command = agentd();
        command
            .arg("run")
            .current_dir(folder.path())
            .env("AGENTD__EXECUTION__BY_CATEGORY", r#"{ test = "command" }"#)
            .env("AGENTD__EXECUTORS__COMMAND__PROGRAM", r#"["sleep", "611"]"#)
            .env("AGENTD__LEASE__TTL", "3s");
        Daemon::start(command)
    };
    let mut daemon = start();
    daemon.wait_for("worker started", Duration::from_secs(90));
    let (postmaster, socket_dir) = postmaster_of(&data_dir);
    let mut leftovers = Leftovers {
        marker: None,
        postmaster: Some(postmaster),
    };
    let pool = embedded_pool(&socket_dir).await;
    let agent = create_agent(&pool, create_user(&pool).await).await;
    let run_id = request_agent_run(&pool, agent).await;
    pool.close().await;
    let marker = format!("AGENTD_RUN_ID={run_id}");
    leftovers.marker = Some(marker.clone());
    eventually(
        Duration::from_secs(30),
        "the run's program runs",
        || async { !living_marked(&marker).is_empty() },
    )
    .await;

    daemon.stop_at_once();
    let living = living_marked(&marker);
    assert!(
        living.is_empty(),
        "the run's program outlived agentd: {living:?}"
    );
    // Stopped at once (SIGQUIT), not left running.
    let pid_file = data_dir.join("postmaster.pid");
    eventually(
        Duration::from_secs(3),
        "the embedded server is gone",
        || async { !pid_file.exists() || !running(postmaster) },
    )
    .await;
    assert!(!running(postmaster), "the postmaster still runs");
    let server_log = std::fs::read_to_string(data_dir.with_extension("log")).unwrap();
    assert!(
        server_log.contains("received immediate shutdown request"),
        "{server_log}"
    );

    // The next start recovers the server and fails the run its lost predecessor left.
    let mut again = start();
    again.wait_for("worker started", Duration::from_secs(90));
    let (postmaster, socket_dir) = postmaster_of(&data_dir);
    leftovers.postmaster = Some(postmaster);
    let pool = embedded_pool(&socket_dir).await;
    let mut ended = (String::new(), String::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        ended = sqlx::query_as("SELECT status, coalesce(error, '') FROM runs WHERE id = $1")
            .bind(run_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        if ended.0 != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pool.close().await;
    assert_eq!(ended.0, "failed", "{ended:?}");
    assert!(ended.1.starts_with("worker lost: "), "{ended:?}");
    again.signal(Signal::SIGTERM);
    let status = again.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}: {:#?}", again.seen);
    assert!(!pid_file.exists(), "the embedded server was not stopped");
}

#[test]
fn an_unreachable_database_is_retried_with_backoff_until_shutdown() {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut daemon = Daemon::start({
        let mut command = agentd();
        command
            .arg("run")
            .env(
                "DATABASE_URL",
                format!("postgres://agentd:s3cret@127.0.0.1:{port}/app"),
            )
            .env("AGENTD__DATABASE__CONNECT_TIMEOUT", "1s");
        command
    });
    let first = daemon.wait_for("cannot connect to the database", Duration::from_secs(20));
    let second = daemon.wait_for("cannot connect to the database", Duration::from_secs(20));
    assert_eq!(first["level"], "warn");
    assert!(second["attempt"].as_u64() > first["attempt"].as_u64());
    // Why, not the pool's own "timed out while waiting for an open connection".
    let error = first["error"].as_str().unwrap();
    assert!(error.contains("Connection refused"), "{error}");
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        daemon.seen.iter().all(|line| !line.contains("s3cret")),
        "the password leaked into the logs: {:#?}",
        daemon.seen
    );
}

#[test]
fn missing_server_binaries_give_one_clear_line() {
    let folder = tempfile::tempdir().unwrap();
    let output = agentd()
        .arg("migrate")
        .current_dir(folder.path())
        .env("AGENTD__EMBEDDED__BIN_DIR", folder.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: embedded PostgreSQL: ")
            && last.contains("does not contain the postgres and initdb binaries"),
        "{stderr}"
    );
}

#[tokio::test]
async fn run_with_migrate_applies_migrations_to_the_configured_database() {
    let db = TestDb::new().await;
    let mut daemon = Daemon::start({
        let mut command = agentd();
        command
            .arg("run")
            .arg("--migrate")
            .env("DATABASE_URL", &db.url);
        command
    });
    daemon.wait_for("agentd running", Duration::from_secs(30));
    let versions = agentd::store::applied_versions(&db.pool).await.unwrap();
    assert_eq!(versions.len(), agentd::store::migrator().iter().count());
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
}

/// A failed statement reads as the server's message and SQLSTATE, without sqlx's "at line
/// N" (the line of the server's C source), once, as every command prints it.
#[tokio::test]
async fn a_database_error_names_the_servers_message_and_sqlstate() {
    let db = TestDb::new().await;
    let error = sqlx::query("SELECT 1 / 0")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert_eq!(
        agentd::store::StoreError::from(error).to_string(),
        "database: division by zero (SQLSTATE 22012)"
    );

    // A migration refused by the server (a role that may not create the schema): why, once.
    let role = support::LoginRole::create(&db, "pg_monitor").await;
    let output = agentd()
        .arg("migrate")
        .env("DATABASE_URL", role.url())
        .output()
        .unwrap();
    role.remove().await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: migration failed: permission denied for database")
            && last.ends_with("(SQLSTATE 42501)")
            && !last.contains(" at line ")
            && last.matches("permission denied").count() == 1,
        "{stderr}"
    );
}
