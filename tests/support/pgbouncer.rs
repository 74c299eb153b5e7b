//! A real PgBouncer (the distribution's `pgbouncer`, as `.ci/run` installs it) in front of
//! the test server, for one test: the connection poolers managed databases put between
//! agentd and PostgreSQL. Stopped when dropped.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running PgBouncer; see [`PgBouncer::start`].
pub struct PgBouncer {
    child: Child,
    /// The TCP port it listens on (127.0.0.1).
    pub port: u16,
    /// Holds its configuration and log.
    folder: tempfile::TempDir,
}

/// Where the `pgbouncer` binary is: on PATH, or the Debian package's /usr/sbin.
fn program() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("no pgbouncer on PATH or in /usr/sbin: install the `pgbouncer` package (.ci/run does)")
        })
}

impl PgBouncer {
    /// PgBouncer in `pool_mode` ("transaction" or "session") in front of the test server,
    /// with the settings commonly given to it (`ignore_startup_parameters =
    /// extra_float_digits`, nothing about `options`), and few server connections per
    /// database (`default_pool_size` 3), so that clients share them.
    pub fn start(pool_mode: &str) -> PgBouncer {
        let (host, port) = super::server_address();
        let folder = tempfile::tempdir().unwrap();
        let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listen_port = listen.local_addr().unwrap().port();
        drop(listen);
        let path = |name: &str| folder.path().join(name).display().to_string();
        std::fs::write(folder.path().join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        let mut ini = std::fs::File::create(folder.path().join("pgbouncer.ini")).unwrap();
        write!(
            ini,
            "[databases]\n\
             * = host={host} port={port} user=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {listen_port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             pool_mode = {pool_mode}\n\
             default_pool_size = 3\n\
             max_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile = {log}\n\
             pidfile = {pid}\n",
            users = path("users.txt"),
            log = path("pgbouncer.log"),
            pid = path("pgbouncer.pid"),
        )
        .unwrap();
        drop(ini);
        let mut command = Command::new(program());
        command
            .arg(path("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // PgBouncer refuses to run as root: as root, it runs as the server's `postgres` user
        // (which may then use the folder).
        if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .unwrap()
                .expect("a `postgres` user to run pgbouncer as");
            nix::unistd::chown(folder.path(), Some(user.uid), Some(user.gid)).unwrap();
            for name in ["users.txt", "pgbouncer.ini"] {
                nix::unistd::chown(&folder.path().join(name), Some(user.uid), Some(user.gid))
                    .unwrap();
            }
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let child = command.spawn().expect("start pgbouncer");
        let pgbouncer = PgBouncer {
            child,
            port: listen_port,
            folder,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not listen within 10 s: {}",
                pgbouncer.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pgbouncer
    }

    /// The URL of `database` through this PgBouncer.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.folder.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
