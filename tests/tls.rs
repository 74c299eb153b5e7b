//! TLS to PostgreSQL as managed databases need it: `sslmode=verify-full` with the
//! provider's CA (`sslrootcert` in the URL) connects; a wrong CA, or a host name the
//! certificate does not name, fails at once with one line that names the problem and not
//! the password. The server is a PostgreSQL of the test's own, with a CA and a server
//! certificate made here with `openssl`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid, User};
use support::agentd;

const PASSWORD: &str = "pw-never-shown-4711";

fn run(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn openssl(folder: &Path, args: &[&str]) {
    run(Command::new("openssl").current_dir(folder).args(args));
}

/// A CA named `name` (`<name>.pem`, `<name>.key`).
fn make_ca(folder: &Path, name: &str) {
    openssl(
        folder,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// `server.crt` and `server.key`, issued by CA `ca` for localhost and 127.0.0.1.
fn make_server_certificate(folder: &Path, ca: &str) {
    std::fs::write(
        folder.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        folder,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    openssl(
        folder,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
}

/// A PostgreSQL listening on 127.0.0.1 and 127.0.0.2 with `ssl = on`.
struct TlsServer {
    child: Child,
    port: u16,
}

impl TlsServer {
    fn start(folder: &Path) -> TlsServer {
        let bin = PathBuf::from("/usr/lib/postgresql/15/bin");
        let data = folder.join("pg");
        std::fs::create_dir(&data).unwrap();
        // PostgreSQL refuses to run as root: as root, the server runs as `postgres`.
        let user = Uid::effective().is_root().then(|| {
            User::from_name("postgres")
                .unwrap()
                .expect("a postgres user")
        });
        let as_server = |command: &mut Command| {
            if let Some(user) = &user {
                command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
            }
        };
        for path in [folder, data.as_path()] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        if let Some(user) = &user {
            std::os::unix::fs::chown(&data, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .unwrap();
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .current_dir(folder);
        as_server(&mut initdb);
        run(&mut initdb);
        // 127.0.0.2 (another name for this machine) may connect too.
        let hba = data.join("pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).unwrap();
        rules.push_str("host all all 127.0.0.0/8 trust\n");
        std::fs::write(&hba, rules).unwrap();
        for file in ["server.crt", "server.key"] {
            std::fs::copy(folder.join(file), data.join(file)).unwrap();
            if let Some(user) = &user {
                std::os::unix::fs::chown(
                    data.join(file),
                    Some(user.uid.as_raw()),
                    Some(user.gid.as_raw()),
                )
                .unwrap();
            }
        }
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut postgres = Command::new(bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&data)
            .args([
                "-c",
                "listen_addresses=127.0.0.1,127.0.0.2",
                "-c",
                "ssl=on",
                "-c",
                "ssl_cert_file=server.crt",
                "-c",
                "ssl_key_file=server.key",
                "-c",
                "fsync=off",
            ])
            .current_dir(folder)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        as_server(&mut postgres);
        let child = postgres.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        TlsServer { child, port }
    }

    /// The URL of database `postgres` at `host`, with a password, verify-full and `ca`.
    fn url(&self, host: &str, mode: &str, ca: &Path) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@{host}:{}/postgres?sslmode={mode}&sslrootcert={}",
            self.port,
            ca.display()
        )
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        let _ = self.child.wait();
    }
}

/// `agentd migrate` on `url`: success, stdout, stderr, and how long it took.
fn migrate(url: &str) -> (bool, String, String, Duration) {
    let started = Instant::now();
    let output = agentd()
        .arg("migrate")
        .env("DATABASE_URL", url)
        .env("AGENTD__LOGGING__FORMAT", "text")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        started.elapsed(),
    )
}

/// The refusal ends the command at once with one `error:` line that names `expected`, and
/// shows neither the password nor a panic.
fn assert_refused(result: (bool, String, String, Duration), expected: &str) {
    let (success, stdout, stderr, took) = result;
    assert!(!success, "connected: {stdout}{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(expected), "{stderr}");
    assert!(
        !stderr.contains("retrying"),
        "a refusal was retried: {stderr}"
    );
    assert!(!stderr.contains(PASSWORD), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn verify_full_with_the_providers_ca_connects_and_refuses_otherwise() {
    let folder = tempfile::tempdir().unwrap();
    let folder = folder.path();
    make_ca(folder, "ca");
    make_ca(folder, "other-ca");
    make_server_certificate(folder, "ca");
    let server = TlsServer::start(folder);
    let ca = folder.join("ca.pem");

    let (success, stdout, stderr, _) = migrate(&server.url("localhost", "verify-full", &ca));
    assert!(success, "{stdout}{stderr}");
    assert!(stdout.contains("migration"), "{stdout}");
    let (success, stdout, stderr, _) = migrate(&server.url("127.0.0.1", "verify-full", &ca));
    assert!(success, "by IP address: {stdout}{stderr}");

    assert_refused(
        migrate(&server.url("localhost", "verify-full", &folder.join("other-ca.pem"))),
        "invalid peer certificate: UnknownIssuer",
    );
    // 127.0.0.2 reaches the same server, but the certificate does not name it: refused by
    // verify-full, accepted by verify-ca (which checks the issuer only).
    assert_refused(
        migrate(&server.url("127.0.0.2", "verify-full", &ca)),
        "certificate not valid for name \"127.0.0.2\"",
    );
    let (success, stdout, stderr, _) = migrate(&server.url("127.0.0.2", "verify-ca", &ca));
    assert!(success, "verify-ca: {stdout}{stderr}");
}
