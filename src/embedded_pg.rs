//! The private PostgreSQL of the embedded default.
//!
//! With no database URL configured, agentd runs its own PostgreSQL from the server binaries
//! already on the machine, so a fresh install works with one command. The server keeps its
//! data in a folder of ours, listens only on a Unix socket (never TCP), starts with agentd
//! and stops with it: a fast shutdown when agentd stops, an immediate one (SIGQUIT: no
//! checkpoint, the next start replays the WAL) when agentd exits at once on a second
//! signal. When agentd runs as root, `initdb` and `postgres` run as the `postgres`
//! system user, because PostgreSQL refuses to run as root.
//!
//! If a server is already running on the folder (another agentd command, or a test run that
//! shares one server between its processes), it is used as it is and left running.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid, User};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

/// The database agentd uses inside its private server.
pub const DATABASE_NAME: &str = "agentd";
/// The superuser `initdb` creates.
const SUPERUSER: &str = "postgres";
/// Only names the socket file: the server listens on no TCP port.
const SOCKET_PORT: u16 = 5432;
/// Unix socket paths are limited to 107 bytes on Linux; keep a margin.
const MAX_SOCKET_PATH: usize = 100;
/// How long an immediate shutdown is waited for (it takes milliseconds).
const IMMEDIATE_SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Why the embedded server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// No server binaries anywhere agentd looks.
    #[error(
        "embedded PostgreSQL: no server binaries (postgres, initdb) found in PATH, in \
         `pg_config --bindir` or in /usr/lib/postgresql/*/bin; install the PostgreSQL server \
         package (e.g. `apt-get install postgresql`) or set DATABASE_URL"
    )]
    NoBinaries,
    /// `embedded.bin_dir` is set but lacks the binaries.
    #[error("embedded PostgreSQL: {0} does not contain the postgres and initdb binaries")]
    BadBinDir(PathBuf),
    /// Running as root without a user to run the server as.
    #[error(
        "embedded PostgreSQL: agentd runs as root and PostgreSQL refuses to; no `postgres` \
         system user exists to run it as; create one or set DATABASE_URL"
    )]
    NoServerUser,
    /// A file system or process operation failed.
    #[error("embedded PostgreSQL: {action}: {reason}")]
    Io { action: String, reason: String },
    /// `initdb` failed.
    #[error("embedded PostgreSQL: initdb failed for {data_dir}: {output}")]
    Initdb { data_dir: PathBuf, output: String },
    /// The server exited or never accepted connections.
    #[error("embedded PostgreSQL: the server did not start ({reason}); its log: {log}")]
    Start { reason: String, log: String },
}

/// What to start and where.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Data folder (relative paths are taken from the working folder).
    pub data_dir: PathBuf,
    /// Folder with `postgres` and `initdb`; `None`: search the usual places.
    pub bin_dir: Option<PathBuf>,
    /// How long to wait for the server to accept connections.
    pub start_timeout: Duration,
    /// Turn off fsync: only for throw-away servers such as the test suite's.
    pub unsafe_no_fsync: bool,
    /// Leave the server running when this handle is dropped or stopped, for a server
    /// shared by several processes (the test suite's).
    pub keep_running: bool,
}

/// A running embedded server. [`EmbeddedPostgres::stop`] shuts it down if this process
/// started it; dropping the handle without stopping sends the server a fast-shutdown signal.
pub struct EmbeddedPostgres {
    data_dir: PathBuf,
    socket_dir: PathBuf,
    /// The postmaster's pid when this process owns the server.
    owned_pid: Option<Pid>,
    child: Option<tokio::process::Child>,
    /// While this process owns the server: its immediate shutdown, should agentd exit at
    /// once.
    forced_exit: Option<crate::process::ForcedExitDuty>,
}

impl EmbeddedPostgres {
    /// Starts the server (creating its data folder on first use), waits until it accepts
    /// connections, and makes sure the `agentd` database exists.
    pub async fn start(options: &EmbeddedOptions) -> Result<EmbeddedPostgres, EmbeddedError> {
        let bin_dir = find_bin_dir(options.bin_dir.as_deref())?;
        let data_dir = absolute(&options.data_dir)?;
        let parent = data_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
        create_dir(&parent)?;

        // One process at a time decides whether to initialise and start the server.
        let lock_path = data_dir.with_extension("lock");
        let _lock = tokio::task::spawn_blocking(move || lock_file(&lock_path))
            .await
            .map_err(|error| io_error("wait for the start lock", error))??;

        let server_user = server_user()?;
        create_dir(&data_dir)?;
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|error| io_error(&format!("set the mode of {}", data_dir.display()), error))?;
        let socket_dir = socket_dir_for(&data_dir)?;
        if let Some(user) = &server_user {
            for dir in [&data_dir, &socket_dir] {
                nix::unistd::chown(dir, Some(user.uid), Some(user.gid))
                    .map_err(|error| io_error(&format!("chown {}", dir.display()), error))?;
            }
        }

        let mut server = EmbeddedPostgres {
            data_dir: data_dir.clone(),
            socket_dir: socket_dir.clone(),
            owned_pid: None,
            child: None,
            forced_exit: None,
        };

        if server.accepts_connections().await {
            tracing::info!(data_dir = %data_dir.display(), "embedded PostgreSQL already running; using it");
        } else {
            if !data_dir.join("PG_VERSION").exists() {
                initdb(&bin_dir, &data_dir, server_user.as_ref()).await?;
            }
            server
                .spawn_postmaster(&bin_dir, server_user.as_ref(), options)
                .await?;
            tracing::info!(data_dir = %data_dir.display(), "embedded PostgreSQL started");
        }
        server.ensure_database().await?;
        if options.keep_running {
            server.owned_pid = None;
            server.child = None;
            server.forced_exit = None;
        }
        Ok(server)
    }

    /// Connection options for the `agentd` database of this server.
    pub fn connect_options(&self) -> PgConnectOptions {
        self.admin_options().database(DATABASE_NAME)
    }

    /// Connection options for the superuser's maintenance database, for creating databases.
    pub fn admin_options(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.socket_dir)
            .port(SOCKET_PORT)
            .username(SUPERUSER)
            .database("postgres")
    }

    /// A URL other processes can connect with (`host` names the socket folder).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost:{SOCKET_PORT}/{database}?host={}",
            self.socket_dir.display()
        )
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Shuts the server down (fast shutdown: open sessions are ended) if this process
    /// started it, and waits for it to exit.
    pub async fn stop(mut self) {
        let forced_exit = self.forced_exit.take();
        let (Some(pid), Some(mut child)) = (self.owned_pid.take(), self.child.take()) else {
            return;
        };
        let _ = kill(pid, Signal::SIGINT);
        if tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .is_err()
        {
            tracing::warn!("embedded PostgreSQL did not stop within 30 s; killing it");
            let _ = kill(pid, Signal::SIGKILL);
            let _ = child.wait().await;
        }
        crate::process::forget(pid.as_raw() as u32);
        drop(forced_exit);
        tracing::info!("embedded PostgreSQL stopped");
    }

    async fn spawn_postmaster(
        &mut self,
        bin_dir: &Path,
        user: Option<&User>,
        options: &EmbeddedOptions,
    ) -> Result<(), EmbeddedError> {
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|error| io_error(&format!("open {}", log_path.display()), error))?;
        let log_err = log
            .try_clone()
            .map_err(|error| io_error("duplicate the log file handle", error))?;
        let mut command = tokio::process::Command::new(bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-p", &SOCKET_PORT.to_string(), "-c", "listen_addresses="])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C on agentd's terminal must not reach the server
            // directly; agentd stops it after its own shutdown.
            .process_group(0);
        if options.unsafe_no_fsync {
            command.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        if let Some(user) = user {
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let mut child = crate::process::spawn_tokio(&mut command)
            .map_err(|error| io_error("start postgres", error))?;
        let pid = child.id().map(|raw| Pid::from_raw(raw as i32));
        let forced_exit =
            pid.map(|pid| crate::process::at_forced_exit(move || stop_immediately(pid)));

        let deadline = Instant::now() + options.start_timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                if let Some(pid) = pid {
                    crate::process::forget(pid.as_raw() as u32);
                }
                return Err(EmbeddedError::Start {
                    reason: format!("postgres exited with {status}"),
                    log: self.log_tail(),
                });
            }
            if self.accepts_connections().await {
                break;
            }
            if Instant::now() > deadline {
                if let Some(pid) = pid {
                    let _ = kill(pid, Signal::SIGKILL);
                }
                return Err(EmbeddedError::Start {
                    reason: format!("no connection after {:?}", options.start_timeout),
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.owned_pid = pid;
        self.child = Some(child);
        self.forced_exit = forced_exit;
        Ok(())
    }

    async fn accepts_connections(&self) -> bool {
        if !self
            .socket_dir
            .join(format!(".s.PGSQL.{SOCKET_PORT}"))
            .exists()
        {
            return false;
        }
        let options = self.admin_options();
        let attempt = PgConnection::connect_with(&options);
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
                true
            }
            _ => false,
        }
    }

    async fn ensure_database(&self) -> Result<(), EmbeddedError> {
        let fail = |error: sqlx::Error| io_error("create the agentd database", error);
        let mut connection = PgConnection::connect_with(&self.admin_options())
            .await
            .map_err(fail)?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE_NAME)
                .fetch_one(&mut connection)
                .await
                .map_err(fail)?;
        if !exists {
            let created = sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {DATABASE_NAME}"
            )))
            .execute(&mut connection)
            .await;
            // Another process may have created it in between.
            if let Err(error) = created {
                let duplicate = error
                    .as_database_error()
                    .and_then(|e| e.code())
                    .is_some_and(|code| code == "42P04" || code == "23505");
                if !duplicate {
                    return Err(fail(error));
                }
            }
        }
        let _ = connection.close().await;
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.with_extension("log")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        let tail: Vec<&str> = lines.into_iter().rev().collect();
        if tail.is_empty() {
            "(empty)".into()
        } else {
            tail.join(" | ")
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Some(pid) = self.owned_pid.take() {
            let _ = kill(pid, Signal::SIGINT);
        }
    }
}

/// An immediate shutdown of the postmaster `pid` (SIGQUIT: its processes end at once,
/// without a checkpoint; the data stays consistent and the next start replays the WAL),
/// waited for up to [`IMMEDIATE_SHUTDOWN_WAIT`]. For an exit of agentd at once: a fast
/// shutdown would wait for sessions and a checkpoint.
fn stop_immediately(pid: Pid) {
    let _ = kill(pid, Signal::SIGQUIT);
    let deadline = Instant::now() + IMMEDIATE_SHUTDOWN_WAIT;
    while crate::process::is_running(pid.as_raw()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Finds the folder holding `postgres` and `initdb`: the configured one, else PATH, else
/// `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin.
pub fn find_bin_dir(configured: Option<&Path>) -> Result<PathBuf, EmbeddedError> {
    if let Some(dir) = configured {
        return if has_server_binaries(dir) {
            Ok(dir.to_path_buf())
        } else {
            Err(EmbeddedError::BadBinDir(dir.to_path_buf()))
        };
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    let pg_config = crate::process::spawn(
        std::process::Command::new("pg_config")
            .arg("--bindir")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )
    .and_then(|child| {
        let pid = child.id();
        let output = child.wait_with_output();
        crate::process::forget(pid);
        output
    });
    if let Ok(output) = pg_config
        && output.status.success()
    {
        let dir = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if !dir.is_empty() {
            candidates.push(PathBuf::from(dir));
        }
    }
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versioned.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    candidates.extend(versioned.into_iter().map(|(_, dir)| dir));
    candidates
        .into_iter()
        .find(|dir| has_server_binaries(dir))
        .ok_or(EmbeddedError::NoBinaries)
}

fn has_server_binaries(dir: &Path) -> bool {
    ["postgres", "initdb"].iter().all(|name| {
        std::fs::metadata(dir.join(name))
            .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// The user to run the server as: `postgres` when we are root, ourselves otherwise.
fn server_user() -> Result<Option<User>, EmbeddedError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    match User::from_name(SUPERUSER) {
        Ok(Some(user)) if !user.uid.is_root() => Ok(Some(user)),
        _ => Err(EmbeddedError::NoServerUser),
    }
}

async fn initdb(bin_dir: &Path, data_dir: &Path, user: Option<&User>) -> Result<(), EmbeddedError> {
    let mut command = tokio::process::Command::new(bin_dir.join("initdb"));
    command
        .arg("-D")
        .arg(data_dir)
        .args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
        ])
        .stdin(Stdio::null())
        // initdb changes into folders it needs to read; a root-owned working folder that
        // the server user cannot enter would make it fail.
        .current_dir(data_dir);
    if let Some(user) = user {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child =
        crate::process::spawn_tokio(&mut command).map_err(|error| io_error("run initdb", error))?;
    let pid = child.id();
    let output = child.wait_with_output().await;
    if let Some(pid) = pid {
        crate::process::forget(pid);
    }
    let output = output.map_err(|error| io_error("run initdb", error))?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if text.is_empty() {
            text = String::from_utf8_lossy(&output.stdout).trim().to_string();
        }
        return Err(EmbeddedError::Initdb {
            data_dir: data_dir.to_path_buf(),
            output: text.replace('\n', " | "),
        });
    }
    Ok(())
}

/// The data folder itself when its socket path fits, else a private folder under /tmp
/// named after the data folder (so every process finds the same one).
fn socket_dir_for(data_dir: &Path) -> Result<PathBuf, EmbeddedError> {
    let in_data_dir = data_dir.join(format!(".s.PGSQL.{SOCKET_PORT}"));
    if in_data_dir.as_os_str().len() <= MAX_SOCKET_PATH {
        return Ok(data_dir.to_path_buf());
    }
    let digest = fnv1a(data_dir.as_os_str().as_encoded_bytes());
    let dir = std::env::temp_dir().join(format!("agentd-pg-{digest:016x}"));
    create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|error| io_error(&format!("set the mode of {}", dir.display()), error))?;
    Ok(dir)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x100000001b3)
    })
}

fn lock_file(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, EmbeddedError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|error| io_error(&format!("open {}", path.display()), error))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, error)| io_error(&format!("lock {}", path.display()), error))
}

fn absolute(path: &Path) -> Result<PathBuf, EmbeddedError> {
    std::path::absolute(path)
        .map_err(|error| io_error(&format!("resolve {}", path.display()), error))
}

fn create_dir(path: &Path) -> Result<(), EmbeddedError> {
    std::fs::create_dir_all(path)
        .map_err(|error| io_error(&format!("create {}", path.display()), error))
}

fn io_error(action: &str, error: impl std::fmt::Display) -> EmbeddedError {
    EmbeddedError::Io {
        action: action.to_string(),
        reason: error.to_string(),
    }
}
