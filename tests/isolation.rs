//! Hostile tenants through the `command` executor (docs/security.md), proved against real
//! `agentd run` replicas running real programs (sh, bash, python3) written as an attacker
//! would write them.
//!
//! - Environment: variables whose names steer a loader, shell or interpreter, names that
//!   are not identifiers, agentd's own names and the operator's refused names never reach
//!   the program; each refusal is a warn line of the run; no value appears anywhere else.
//! - Isolation, as root: a user, a private folder and a process limit per run; a program
//!   cannot read agentd's environment or memory, nor another run's environment, folder or
//!   stored artifacts, and a hard link to a file it does not own is not stored. Not as root: agentd says at
//!   start-up what it cannot keep apart, and its environment stays unreadable.
//! - Capabilities, as root: without CHOWN, DAC_OVERRIDE, SETUID or SETGID, `agentd run`,
//!   `demo` and `chat` refuse to start (exit 2, one line naming the missing ones); with
//!   exactly those four a run gets its user, and what it left is swept.
//! - No process outlives its run: setsid and double-forked children, a cancelled run that
//!   ignores SIGTERM, a run stopped by agentd's shutdown, a run cut short by a second
//!   signal (as root and not), and a thousand runs leaving orphans without a zombie left
//!   behind.
//!
//! Each test has a range of uids of its own (see [`World::new`]), so that what it finds of
//! "its" users on the host is its own even while other tests run beside it.

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use support::{
    Daemon, ProcessEntry, RunRecord, TestDb, count, create_agent, create_user, environ_holds,
    eventually, finished_run, process_table, set_variables,
};
use uuid::Uuid;

/// The users each test's runs run as: disjoint, and outside the default range that other
/// test files use.
const USERS_ENVIRONMENT: (u32, u32) = (3_100_000, 3_100_063);
const USERS_BASH_ENV: (u32, u32) = (3_100_100, 3_100_163);
const USERS_AGENTD: (u32, u32) = (3_100_200, 3_100_263);
const USERS_TWO_RUNS: (u32, u32) = (3_100_300, 3_100_363);
const USERS_NOT_ROOT: (u32, u32) = (3_100_400, 3_100_463);
const USERS_ESCAPE: (u32, u32) = (3_100_500, 3_100_563);
const USERS_CANCEL: (u32, u32) = (3_100_600, 3_100_663);
const USERS_THOUSAND: (u32, u32) = (3_100_700, 3_100_763);
const USERS_SHUTDOWN: (u32, u32) = (3_100_800, 3_100_863);
const USERS_STORE: (u32, u32) = (3_100_900, 3_100_963);
const USERS_TEAM_NOT_ROOT: (u32, u32) = (3_101_000, 3_101_063);
const USERS_SECOND_SIGNAL: (u32, u32) = (3_101_100, 3_101_163);
const USERS_SECOND_SIGNAL_NOT_ROOT: (u32, u32) = (3_101_200, 3_101_263);
const USERS_NO_CAPABILITIES: (u32, u32) = (3_101_300, 3_101_363);
const USERS_FOUR_CAPABILITIES: (u32, u32) = (3_101_400, 3_101_463);

/// The capabilities a root agentd needs to give runs users of their own, as a mask of
/// their numbers in `linux/capability.h`: CHOWN (0), DAC_OVERRIDE (1), SETGID (6),
/// SETUID (7).
const FOUR_CAPABILITIES: u64 = 1 << 0 | 1 << 1 | 1 << 6 | 1 << 7;

/// `executors.command.max_processes` where a test checks it: not the default.
const MAX_PROCESSES: &str = "97";

/// The unprivileged user agentd runs as in the not-root test.
const NOBODY: u32 = 65534;

/// EACCES: what every attempt to cross into agentd or another run must meet.
const PERMISSION_DENIED: i64 = 13;

/// A program that reports, as its run's output, who and where it is and what it could
/// reach: agentd's (its parent's) environment, maps and memory, a process of its own as a
/// control, and, when its input asks, another run's environment and folders (`attack`).
/// With `links` it hard-links files into its artifacts folder, with `write` it writes
/// artifacts, with `look` it lists folders and reads files; with `hold` it leaves a
/// secret in its folder and an artifact, prints where they are (`{"victim": …}`) and waits
/// for the file `hold` names before ending.
const PROBE: &str = r#"
import json, os, subprocess, sys, time

def attempt(action):
    try:
        return {"ok": action()}
    except OSError as error:
        return {"errno": error.errno, "error": error.strerror}

def read(path):
    with open(path, "rb") as file:
        return file.read(1 << 20).decode("latin-1")

def read_memory(pid):
    with open(f"/proc/{pid}/mem", "rb") as memory:
        memory.seek(int(read(f"/proc/{pid}/maps").split("-", 1)[0], 16))
        return memory.read(4096).decode("latin-1")

def reach(pid):
    return {
        "environ": attempt(lambda: read(f"/proc/{pid}/environ")),
        "maps": attempt(lambda: read(f"/proc/{pid}/maps")),
        "mem": attempt(lambda: read_memory(pid)),
    }

task = json.loads(sys.stdin.readline()).get("input") or {}
folder = os.getcwd()
artifacts = os.environ["AGENTD_ARTIFACTS_DIR"]
control = subprocess.Popen(["sleep", "30"])
facts = {
    "pid": os.getpid(),
    "parent": os.getppid(),
    "uid": os.getuid(),
    "gid": os.getgid(),
    "groups": os.getgroups(),
    "folder": folder,
    "folder_uid": os.stat(folder).st_uid,
    "folder_mode": os.stat(folder).st_mode & 0o7777,
    "home": os.environ.get("HOME"),
    "tmpdir": os.environ.get("TMPDIR"),
    "artifacts": artifacts,
    "max_processes": subprocess.run(["bash", "-c", "ulimit -u"], capture_output=True, text=True).stdout.strip(),
    "no_new_privs": [line.split()[1] for line in read("/proc/self/status").splitlines() if line.startswith("NoNewPrivs:")],
    "agentd": reach(os.getppid()),
    "control_environ_readable": "ok" in attempt(lambda: read(f"/proc/{control.pid}/environ")),
}
control.kill()
control.wait()
facts["links"] = {
    name: attempt(lambda: os.link(source, os.path.join(artifacts, name)))
    for name, source in (task.get("links") or {}).items()
}
for name, text in (task.get("write") or {}).items():
    with open(os.path.join(artifacts, name), "w") as file:
        file.write(text)
facts["look"] = {
    path: attempt(lambda: os.listdir(path) if os.path.isdir(path) else read(path))
    for path in task.get("look") or []
}
if task.get("hold"):
    with open(os.path.join(folder, "private.txt"), "w") as file:
        file.write(os.environ.get("TENANT_SECRET", ""))
    with open(os.path.join(artifacts, "report.txt"), "w") as file:
        file.write("the first run's report")
    print(json.dumps({"victim": {"pid": os.getpid(), "folder": folder, "artifacts": artifacts}}), flush=True)
    deadline = time.time() + 60
    while not os.path.exists(task["hold"]) and time.time() < deadline:
        time.sleep(0.05)
victim = task.get("attack")
if victim:
    facts["attack"] = {
        "environ": attempt(lambda: read(f"/proc/{victim['pid']}/environ")),
        "folder": attempt(lambda: os.listdir(victim["folder"])),
        "private": attempt(lambda: read(os.path.join(victim["folder"], "private.txt"))),
        "artifacts": attempt(lambda: os.listdir(victim["artifacts"])),
        "report": attempt(lambda: read(os.path.join(victim["artifacts"], "report.txt"))),
        "runs": attempt(lambda: os.listdir(os.path.dirname(victim["folder"]))),
    }
print(json.dumps({"output": facts}), flush=True)
"#;

/// A test's own world: a fresh database; `scratch`, a folder every user may read, for the
/// programs and files the test writes; the replica's runs and artifacts folders; a range of
/// uids for its runs. Dropping it kills whatever its runs left (a failed test included).
struct World {
    db: TestDb,
    scratch: tempfile::TempDir,
    runs_dir: tempfile::TempDir,
    artifacts_dir: tempfile::TempDir,
    users: (u32, u32),
    /// `TEST_MARK=<id>`, a variable of every agent of this world: its programs carry it
    /// whichever user they run as.
    mark: String,
}

impl World {
    async fn new(users: (u32, u32)) -> World {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "these tests start agentd as root (and as another user): run them as root"
        );
        let scratch = tempfile::Builder::new()
            .prefix("agentd-isolation-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        World {
            db: TestDb::migrated().await,
            scratch,
            runs_dir: tempfile::tempdir().unwrap(),
            artifacts_dir: tempfile::tempdir().unwrap(),
            users,
            mark: format!("TEST_MARK={}", Uuid::new_v4().simple()),
        }
    }

    /// An agent of a user of its own with these variables (and the world's mark).
    async fn agent(&self, variables: &[(&str, &str)]) -> Uuid {
        let user = create_user(&self.db.pool).await;
        let agent = create_agent(&self.db.pool, user).await;
        let (mark_name, mark_value) = self.mark.split_once('=').unwrap();
        set_variables(&self.db.pool, agent, variables).await;
        set_variables(&self.db.pool, agent, &[(mark_name, mark_value)]).await;
        agent
    }

    /// Writes `text` to `name` in the scratch folder, readable by every user.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.scratch.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path
    }

    /// The probe program, written to the scratch folder.
    fn probe(&self) -> Vec<String> {
        let path = self.write("probe.py", PROBE);
        vec!["/usr/bin/python3".into(), path.display().to_string()]
    }

    /// A replica's settings: the command executor running `program` in this world, with a
    /// timeout far longer than any test takes; `extra` wins.
    fn settings(&self, program: &[String], extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut settings: Vec<(String, String)> = [
            ("AGENTD__EXECUTION__DEFAULT", "command".to_string()),
            (
                "AGENTD__EXECUTORS__COMMAND__PROGRAM",
                serde_json::to_string(program).unwrap(),
            ),
            (
                "AGENTD__EXECUTORS__COMMAND__UID_RANGE",
                format!("{}-{}", self.users.0, self.users.1),
            ),
            (
                "AGENTD__EXECUTORS__COMMAND__RUNS_DIR",
                self.runs_dir.path().display().to_string(),
            ),
            ("AGENTD__EXECUTORS__COMMAND__TIMEOUT", "60s".to_string()),
            (
                "AGENTD__ARTIFACTS__DIR",
                self.artifacts_dir.path().display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
        settings.extend(
            extra
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string())),
        );
        settings
    }

    /// Starts a replica (as root) on this world's database and waits until it works.
    fn start(&self, program: &[String], extra: &[(&str, &str)]) -> Daemon {
        let settings = self.settings(program, extra);
        let mut daemon = support::replica(&self.db.url, "isolation", &pairs(&settings));
        daemon.wait_for("worker started", Duration::from_secs(30));
        daemon
    }

    /// Asks for a run of `agent` with `input`.
    async fn request(&self, agent: Uuid, input: Option<Value>) -> Uuid {
        agentd::store::runs::request_run(
            &self.db.pool,
            agentd::store::runs::RunKind::Agent,
            agent,
            input.as_ref(),
        )
        .await
        .unwrap()
    }

    /// Whether `uid` is one of this world's users.
    fn owns(&self, uid: u32) -> bool {
        (self.users.0..=self.users.1).contains(&uid)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // A failed test may leave its runs' programs behind: none may outlive it.
        for process in process_table() {
            if self.owns(process.uid) || environ_holds(process.pid, &self.mark) {
                let _ = kill(Pid::from_raw(process.pid), Signal::SIGKILL);
            }
        }
        for folder in ["/tmp", "/var/tmp", "/dev/shm"] {
            for entry in std::fs::read_dir(folder).into_iter().flatten().flatten() {
                use std::os::unix::fs::MetadataExt;
                if entry
                    .metadata()
                    .is_ok_and(|metadata| self.owns(metadata.uid()))
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

fn pairs(settings: &[(String, String)]) -> Vec<(&str, &str)> {
    settings
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect()
}

/// Stops a replica the way an operator does and returns every line it wrote.
fn stop(mut daemon: Daemon) -> Vec<String> {
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "agentd exited with {status}");
    daemon.seen.clone()
}

/// `url` with `password` in it, unless it has one already; returns the URL and the
/// password it holds. The test server trusts local connections, so the password is only
/// a secret to look for.
fn with_password(url: &str, password: &str) -> (String, String) {
    let mut parsed = url::Url::parse(url).expect("the test server's URL parses");
    if let Some(existing) = parsed.password() {
        return (url.to_string(), existing.to_string());
    }
    if parsed.username().is_empty() {
        parsed.set_username("postgres").expect("the URL has a host");
    }
    parsed
        .set_password(Some(password))
        .expect("the URL has a host");
    (parsed.to_string(), password.to_string())
}

/// The run's output, which the probe sets.
fn facts(run: &RunRecord) -> &Value {
    run.output
        .as_ref()
        .unwrap_or_else(|| panic!("the probe set no output: {run:#?}"))
}

/// Asserts that `attempt` (the probe's record of one try) was refused with EACCES.
fn assert_denied(attempt: &Value, what: &str) {
    assert_eq!(
        attempt["errno"].as_i64(),
        Some(PERMISSION_DENIED),
        "{what}: expected permission denied, got {attempt}"
    );
}

/// The run's user, from its `uid=N` log line.
fn printed_uid(run: &RunRecord) -> u32 {
    run.logs
        .iter()
        .find_map(|(_, message)| message.strip_prefix("uid="))
        .and_then(|uid| uid.parse().ok())
        .unwrap_or_else(|| panic!("no uid= line: {:?}", run.logs))
}

/// Processes that belong to run `run_id` of user `uid`: by user, by the run's
/// `AGENTD_RUN_ID`, or by a command line containing one of `commands`.
fn processes_of_run(run_id: Uuid, uid: u32, commands: &[&str]) -> Vec<ProcessEntry> {
    let marker = format!("AGENTD_RUN_ID={run_id}");
    process_table()
        .into_iter()
        .filter(|process| {
            process.uid == uid
                || environ_holds(process.pid, &marker)
                || commands
                    .iter()
                    .any(|command| process.command.contains(command))
        })
        .collect()
}

/// Every file under `folder`, read whole.
fn contents_under(folder: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    let mut pending = vec![folder.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                pending.push(path);
            } else {
                let content = std::fs::read(&path).unwrap_or_default();
                found.push((path, content));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_variables_never_reach_the_program_and_no_value_leaks() {
    let world = World::new(USERS_ENVIRONMENT).await;
    let refused = [
        "LD_PRELOAD",
        "BASH_ENV",
        "ENV",
        "PATH",
        "HOME",
        "PYTHONPATH",
        "NODE_OPTIONS",
        "PERL5OPT",
        "JAVA_TOOL_OPTIONS",
        "GCONV_PATH",
        "a b",
        "1X",
        "AGENTD_X",
        // Refused by the operator (executors.command.refused_env): a prefix, and a name in
        // another case.
        "TENANT_TOOL_PLUGINS",
        "company_secret",
    ];
    let value = || format!("tenant-value-{}", Uuid::new_v4().simple());
    let refused: Vec<(&str, String)> = refused.iter().map(|name| (*name, value())).collect();
    let passed = value();
    let mut variables: Vec<(&str, &str)> = refused
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    variables.push(("OK_VAR", &passed));
    let agent = world.agent(&variables).await;
    // The program prints its environment, then the document it got on stdin.
    let daemon = world.start(
        &["/bin/sh".into(), "-c".into(), "env; cat".into()],
        &[
            (
                "AGENTD__EXECUTORS__COMMAND__REFUSED_ENV",
                r#"["TENANT_TOOL_*", "COMPANY_SECRET"]"#,
            ),
            ("AGENTD__LOGGING__LEVEL", "debug"),
        ],
    );
    let run_id = world.request(agent, None).await;
    let run = finished_run(&world.db.pool, run_id, Duration::from_secs(30)).await;
    let agentd_lines = stop(daemon);

    assert_eq!(run.status, "completed", "{run:#?}");
    let environment: Vec<&str> = run
        .logs
        .iter()
        .filter(|(level, message)| level == "info" && !message.starts_with('{'))
        .map(|(_, message)| message.as_str())
        .collect();
    assert!(
        environment.contains(&format!("OK_VAR={passed}").as_str()),
        "the allowed variable did not arrive: {environment:#?}"
    );
    let names: BTreeSet<&str> = environment
        .iter()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .collect();
    for (name, value) in &refused {
        // PATH and HOME are agentd's to set: present, but not the tenant's.
        if !matches!(*name, "PATH" | "HOME") {
            assert!(!names.contains(name), "{name} reached the program");
        }
        assert!(
            !run.stored.contains(value.as_str()),
            "the value of {name} was stored: {run:#?}"
        );
        let warning = format!("variable {name:?} not passed to the program");
        let warnings = run
            .logs
            .iter()
            .filter(|(level, message)| level == "warn" && message.starts_with(&warning))
            .count();
        assert_eq!(warnings, 1, "one warn line naming {name}: {:#?}", run.logs);
    }
    let home = environment
        .iter()
        .find_map(|line| line.strip_prefix("HOME="))
        .unwrap();
    assert!(
        Path::new(home).starts_with(world.runs_dir.path()),
        "HOME is the run's folder, not {home}"
    );
    let path = std::env::var("PATH").unwrap();
    assert!(
        environment.contains(&format!("PATH={path}").as_str()),
        "PATH is agentd's own: {environment:#?}"
    );
    // The document on stdin names the variables without their values.
    assert!(
        run.logs
            .iter()
            .any(|(_, message)| message.starts_with('{') && message.contains("\"OK_VAR\"")),
        "{:#?}",
        run.logs
    );
    // agentd itself, logging at debug, wrote no value at all, not even the allowed one.
    assert!(
        agentd_lines
            .iter()
            .any(|line| line.contains(&run_id.to_string())),
        "agentd logged nothing of the run: {agentd_lines:#?}"
    );
    for value in refused.iter().map(|(_, value)| value).chain([&passed]) {
        assert!(
            agentd_lines
                .iter()
                .all(|line| !line.contains(value.as_str())),
            "agentd logged a variable's value ({value})"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bash_env_pointing_at_a_tenants_script_does_not_run_it() {
    let world = World::new(USERS_BASH_ENV).await;
    // A folder any user may write, so the script would succeed as the run's user.
    let drop_box = world.scratch.path().join("drop");
    std::fs::create_dir(&drop_box).unwrap();
    std::fs::set_permissions(&drop_box, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let marker = drop_box.join("pwned");
    let script = world.write("evil.sh", &format!("touch '{}'\n", marker.display()));
    // The attack is real: given BASH_ENV, `bash -c` runs the script before its command.
    let control = std::process::Command::new("bash")
        .args(["-c", "echo hi"])
        .env("BASH_ENV", &script)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(control.success() && marker.exists(), "the control run");
    std::fs::remove_file(&marker).unwrap();

    let agent = world
        .agent(&[("BASH_ENV", &script.display().to_string())])
        .await;
    let daemon = world.start(&["bash".into(), "-c".into(), "echo hi".into()], &[]);
    let run_id = world.request(agent, None).await;
    let run = finished_run(&world.db.pool, run_id, Duration::from_secs(30)).await;
    stop(daemon);
    assert_eq!(run.status, "completed", "{run:#?}");
    assert!(
        run.logs.contains(&("info".into(), "hi".into())),
        "{:#?}",
        run.logs
    );
    assert!(
        run.logs.iter().any(|(level, message)| level == "warn"
            && message.starts_with("variable \"BASH_ENV\" not passed to the program")),
        "{:#?}",
        run.logs
    );
    assert!(!marker.exists(), "the tenant's BASH_ENV script ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn as_root_a_program_runs_in_a_place_of_its_own_and_cannot_read_agentd() {
    let world = World::new(USERS_AGENTD).await;
    let (url, password) = with_password(
        &world.db.url,
        &format!("db-password-{}", Uuid::new_v4().simple()),
    );
    let api_key = format!("sk-test-{}", Uuid::new_v4().simple());
    // A file of root's that anyone may read and write: the kernel lets any user hard-link
    // it (fs.protected_hardlinks), so only agentd's own check keeps it out.
    let root_file_secret = format!("root-file-{}", Uuid::new_v4().simple());
    let root_file = world.write("root-file.txt", &root_file_secret);
    std::fs::set_permissions(&root_file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();

    let agent = world.agent(&[]).await;
    let mut settings = world.settings(
        &world.probe(),
        &[("AGENTD__EXECUTORS__COMMAND__MAX_PROCESSES", MAX_PROCESSES)],
    );
    settings.push(("OPENAI_API_KEY".into(), api_key.clone()));
    let mut daemon = support::replica(&url, "isolation", &pairs(&settings));
    daemon.wait_for("worker started", Duration::from_secs(30));
    // agentd wiped its secrets from its own environment at start-up (the test, as root,
    // can still read it).
    let environ = std::fs::read(format!("/proc/{}/environ", daemon.pid())).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains("AGENTD__WORKER__ID=isolation"),
        "{environ}"
    );
    for secret in [&url, &password, &api_key] {
        assert!(
            !environ.contains(secret.as_str()),
            "agentd's environment still holds {secret}"
        );
    }

    let input = json!({"links": {"passwd": "/etc/passwd", "linked.txt": root_file}});
    let run_id = world.request(agent, Some(input)).await;
    let run = finished_run(&world.db.pool, run_id, Duration::from_secs(30)).await;
    let agentd_pid = daemon.pid().as_raw() as i64;
    stop(daemon);
    assert_eq!(run.status, "completed", "{run:#?}");
    let facts = facts(&run);

    // Its own user, group and folder, no way to gain privileges, a bound on processes.
    let uid = facts["uid"].as_u64().unwrap() as u32;
    assert!(world.owns(uid), "uid {uid} is not in {:?}", world.users);
    assert_eq!(facts["gid"], uid);
    assert!(
        facts["groups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|group| *group == uid),
        "supplementary groups: {}",
        facts["groups"]
    );
    let folder = PathBuf::from(facts["folder"].as_str().unwrap());
    assert_eq!(folder.parent(), Some(world.runs_dir.path()));
    assert_eq!(facts["folder_uid"], uid);
    assert_eq!(facts["folder_mode"], 0o700, "the run's folder is private");
    assert_eq!(facts["home"], facts["folder"]);
    for inside in ["tmpdir", "artifacts"] {
        assert!(
            Path::new(facts[inside].as_str().unwrap()).starts_with(&folder),
            "{inside}: {facts}"
        );
    }
    assert_eq!(facts["max_processes"], MAX_PROCESSES);
    assert_eq!(facts["no_new_privs"], json!(["1"]));
    assert!(!folder.exists(), "the run's folder outlived the run");

    // agentd's environment, memory map and memory are out of reach; a process of the
    // program's own is not (the control).
    assert_eq!(facts["parent"].as_i64(), Some(agentd_pid));
    for what in ["environ", "maps", "mem"] {
        assert_denied(&facts["agentd"][what], &format!("/proc/$PPID/{what}"));
    }
    assert_eq!(facts["control_environ_readable"], true);
    for secret in [&url, &password, &api_key] {
        assert!(
            !run.stored.contains(secret.as_str()),
            "the run stored {secret}: {run:#?}"
        );
    }

    // Hard links to files of root's: /etc/passwd cannot be linked at all; the file the
    // kernel lets it link is refused as an artifact. Neither content is stored anywhere.
    assert!(
        facts["links"]["passwd"].get("errno").is_some()
            || run.logs.iter().any(|(level, message)| level == "warn"
                && message.starts_with("artifact \"passwd\" not stored: owned by uid 0")),
        "{facts}"
    );
    assert_eq!(facts["links"]["linked.txt"], json!({"ok": null}));
    assert!(
        run.logs.iter().any(|(level, message)| level == "warn"
            && message.starts_with("artifact \"linked.txt\" not stored: owned by uid 0")),
        "{:#?}",
        run.logs
    );
    assert!(run.artifacts.is_empty(), "{:?}", run.artifacts);
    for (path, content) in contents_under(world.artifacts_dir.path()) {
        let content = String::from_utf8_lossy(&content);
        assert!(
            !content.contains(&root_file_secret) && !content.contains(passwd.trim()),
            "{} holds a file of root's",
            path.display()
        );
    }
    assert!(!run.stored.contains(&root_file_secret) && !run.stored.contains(passwd.trim()));
}

#[tokio::test(flavor = "multi_thread")]
async fn as_root_a_run_cannot_read_the_environment_or_folder_of_a_run_beside_it() {
    let world = World::new(USERS_TWO_RUNS).await;
    let secret = format!("tenant-secret-{}", Uuid::new_v4().simple());
    let victim = world.agent(&[("TENANT_SECRET", &secret)]).await;
    let attacker = world.agent(&[]).await;
    let daemon = world.start(&world.probe(), &[]);
    let release = world.scratch.path().join("release");

    let first = world
        .request(victim, Some(json!({ "hold": release })))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let place = loop {
        let line: Option<String> = sqlx::query_scalar(
            "SELECT message FROM run_logs WHERE run_id = $1 AND message LIKE '{\"victim\"%'",
        )
        .bind(first)
        .fetch_optional(&world.db.pool)
        .await
        .unwrap();
        if let Some(line) = line {
            break serde_json::from_str::<Value>(&line).unwrap()["victim"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the first run did not say where it is"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The place is real: the test (root) sees the secret there.
    let folder = Path::new(place["folder"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(folder.join("private.txt")).unwrap(),
        secret
    );
    let pid = place["pid"].as_i64().unwrap() as i32;
    assert!(environ_holds(pid, &format!("TENANT_SECRET={secret}")));

    let second = world
        .request(attacker, Some(json!({ "attack": place })))
        .await;
    let attack = finished_run(&world.db.pool, second, Duration::from_secs(30)).await;
    std::fs::write(&release, "").unwrap();
    let held = finished_run(&world.db.pool, first, Duration::from_secs(30)).await;
    let agentd_pid = daemon.pid().as_raw() as i64;
    stop(daemon);

    assert_eq!(attack.status, "completed", "{attack:#?}");
    assert_eq!(held.status, "completed", "{held:#?}");
    let (attack_facts, held_facts) = (facts(&attack), facts(&held));
    for what in [
        "environ",
        "folder",
        "private",
        "artifacts",
        "report",
        "runs",
    ] {
        assert_denied(&attack_facts["attack"][what], what);
    }
    assert!(
        !attack.stored.contains(&secret),
        "the second run got the first one's secret: {attack:#?}"
    );
    // Two users of the range, one each.
    let (first_uid, second_uid) = (
        held_facts["uid"].as_u64().unwrap() as u32,
        attack_facts["uid"].as_u64().unwrap() as u32,
    );
    assert!(world.owns(first_uid) && world.owns(second_uid));
    assert_ne!(first_uid, second_uid, "two running runs shared a user");
    for facts in [held_facts, attack_facts] {
        assert_eq!(facts["parent"].as_i64(), Some(agentd_pid));
    }
    // What the first run left in its artifacts folder was stored as its own.
    assert_eq!(
        held.artifacts
            .iter()
            .map(|(name, _)| name)
            .collect::<Vec<_>>(),
        ["report.txt"]
    );
    assert!(held.stored.contains("the first run's report"));
}

#[tokio::test(flavor = "multi_thread")]
async fn as_root_a_run_cannot_read_what_other_runs_stored() {
    let world = World::new(USERS_STORE).await;
    // As agentd's default `.agentd/artifacts` is: a folder agentd creates itself, inside a
    // working folder that any user may pass through.
    let store = world.scratch.path().join("agentd").join("artifacts");
    let store_setting = store.display().to_string();
    let daemon = world.start(
        &world.probe(),
        &[("AGENTD__ARTIFACTS__DIR", &store_setting)],
    );
    let secret = format!("stored-secret-{}", Uuid::new_v4().simple());
    let first_agent = world.agent(&[]).await;
    let first = world
        .request(first_agent, Some(json!({"write": {"report.txt": secret}})))
        .await;
    let stored = finished_run(&world.db.pool, first, Duration::from_secs(30)).await;
    assert_eq!(stored.status, "completed", "{stored:#?}");
    assert!(stored.stored.contains(&secret), "{stored:#?}");
    let (_, url) = &stored.artifacts[0];
    let file = url.strip_prefix("file://").unwrap();
    let folder = Path::new(file).parent().unwrap();

    let second_agent = world.agent(&[]).await;
    let look = json!({"look": [store, folder, file]});
    let second = world.request(second_agent, Some(look)).await;
    let attack = finished_run(&world.db.pool, second, Duration::from_secs(30)).await;
    stop(daemon);
    assert_eq!(attack.status, "completed", "{attack:#?}");
    let seen = &facts(&attack)["look"];
    for path in [store.to_str().unwrap(), folder.to_str().unwrap(), file] {
        assert_denied(&seen[path], path);
    }
    assert!(!attack.stored.contains(&secret), "{attack:#?}");
}

/// Passes connections from a Unix socket that any user may open to the test server's
/// socket (in the server user's private folder), so an unprivileged agentd reaches the
/// database. Stops accepting when dropped.
struct SocketRelay {
    folder: tempfile::TempDir,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
}

impl SocketRelay {
    fn start(target: PathBuf) -> SocketRelay {
        let folder = tempfile::tempdir().unwrap();
        std::fs::set_permissions(folder.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = folder.path().join(target.file_name().unwrap());
        let listener = UnixListener::bind(&socket).unwrap();
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let (Ok(inbound), Ok(outbound)) = (inbound, UnixStream::connect(&target)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        SocketRelay {
            folder,
            socket,
            stop,
        }
    }
}

impl Drop for SocketRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = UnixStream::connect(&self.socket);
    }
}

/// Starts a replica as the unprivileged user [`NOBODY`] on `world`'s database with
/// `settings`; returns it, the database URL it was given, and the relay to the test server's
/// socket it connects through (keep it while the replica runs).
fn start_as_nobody(
    world: &World,
    settings: &[(String, String)],
) -> (Daemon, String, Option<SocketRelay>) {
    for folder in [world.runs_dir.path(), world.artifacts_dir.path()] {
        nix::unistd::chown(
            folder,
            Some(nix::unistd::Uid::from_raw(NOBODY)),
            Some(nix::unistd::Gid::from_raw(NOBODY)),
        )
        .unwrap();
    }
    // The test server's socket is in a folder only its own user may open.
    let options = world.db.options();
    let (url, relay) = match options.get_socket() {
        Some(folder) => {
            let target = folder.join(format!(".s.PGSQL.{}", options.get_port()));
            let relay = SocketRelay::start(target);
            let url = format!(
                "postgres://{}@localhost:{}/{}?host={}",
                options.get_username(),
                options.get_port(),
                world.db.name,
                relay.folder.path().display()
            );
            (url, Some(relay))
        }
        None => (world.db.url.clone(), None),
    };
    let mut command = support::replica_command(&url, "isolation", &pairs(settings));
    {
        use std::os::unix::process::CommandExt;
        command.uid(NOBODY).gid(NOBODY);
    }
    (Daemon::start(command), url, relay)
}

#[tokio::test(flavor = "multi_thread")]
async fn not_as_root_agentd_says_what_it_cannot_keep_apart_and_its_environment_stays_unreadable() {
    let world = World::new(USERS_NOT_ROOT).await;
    let agent = world.agent(&[]).await;
    let settings = world.settings(&world.probe(), &[]);
    let (mut daemon, url, _relay) = start_as_nobody(&world, &settings);
    let warning = daemon.wait_for("not running as root", Duration::from_secs(30));
    daemon.wait_for("worker started", Duration::from_secs(30));
    assert_eq!(warning["level"], "warn", "{warning}");
    let message = warning["message"].as_str().unwrap();
    for part in [
        &format!("agentd is not running as root (uid {NOBODY})"),
        "a program could signal agentd, read the environments and folders of runs beside it",
        "the artifacts every run stored",
        "agentd's own environment and memory stay unreadable",
    ] {
        assert!(message.contains(part), "{message}");
    }
    let environ = std::fs::read(format!("/proc/{}/environ", daemon.pid())).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains(&url));

    // One run stores an artifact; the next looks for it.
    let secret = format!("stored-secret-{}", Uuid::new_v4().simple());
    let first = world
        .request(agent, Some(json!({"write": {"report.txt": secret}})))
        .await;
    let first = finished_run(&world.db.pool, first, Duration::from_secs(30)).await;
    assert_eq!(first.status, "completed", "{first:#?}");
    let stored_file = first.artifacts[0].1.strip_prefix("file://").unwrap();
    let run_id = world
        .request(agent, Some(json!({"look": [stored_file]})))
        .await;
    let run = finished_run(&world.db.pool, run_id, Duration::from_secs(30)).await;
    let agentd_pid = daemon.pid().as_raw() as i64;
    stop(daemon);
    assert_eq!(run.status, "completed", "{run:#?}");
    let facts = facts(&run);
    // What the warning says holds: sharing agentd's user, it reads what the other stored.
    assert_eq!(facts["look"][stored_file]["ok"], secret.as_str());
    assert_eq!(
        facts["uid"], NOBODY,
        "the program runs as agentd's own user"
    );
    assert_eq!(facts["parent"].as_i64(), Some(agentd_pid));
    // Same user, yet agentd's environment and memory are closed (it is not dumpable),
    // while a process of the same user that is dumpable is open (the control).
    for what in ["environ", "maps", "mem"] {
        assert_denied(&facts["agentd"][what], &format!("/proc/$PPID/{what}"));
    }
    assert_eq!(facts["control_environ_readable"], true);
    assert!(!run.stored.contains(&url));
}

/// Makes `command`, started by root, hold only the capabilities in the mask `keep`, as a
/// Kubernetes container with `allowPrivilegeEscalation: false`, `drop: ["ALL"]` and `add`
/// does: in the child, every other capability leaves the bounding set, the inheritable
/// and ambient sets are emptied and `no_new_privs` is set, so that what it executes as
/// root has exactly `keep`.
fn with_only_capabilities(command: &mut std::process::Command, keep: u64) {
    use nix::libc;
    use std::os::unix::process::CommandExt;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Sets {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: the closure runs in the child between fork and exec and makes only prctl,
    // capget and capset system calls on values of its own stack.
    unsafe {
        command.pre_exec(move || {
            let failed = |result: libc::c_long| {
                if result == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            for capability in (0..=last).filter(|capability| keep & (1 << capability) == 0) {
                let dropped =
                    libc::prctl(libc::PR_CAPBSET_DROP, capability as libc::c_ulong, 0, 0, 0);
                failed(dropped.into())?;
            }
            let cleared = libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            );
            failed(cleared.into())?;
            let mut header = Header {
                version: VERSION_3,
                pid: 0,
            };
            let mut sets = [Sets {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            failed(libc::syscall(
                libc::SYS_capget,
                &mut header,
                sets.as_mut_ptr(),
            ))?;
            for set in &mut sets {
                set.inheritable = 0;
            }
            failed(libc::syscall(libc::SYS_capset, &mut header, sets.as_ptr()))?;
            let no_new_privs = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            failed(no_new_privs.into())
        });
    }
}

/// The effective capabilities of process `pid`, as a mask.
fn effective_capabilities(pid: Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .unwrap();
    u64::from_str_radix(mask.trim(), 16).unwrap()
}

/// The refusal of a root agentd lacking `missing` (its one line on stderr).
fn capabilities_refusal(missing: &str) -> String {
    format!(
        "executors.command: agentd runs as root without {missing}: each run's own user cannot be made; grant CHOWN, DAC_OVERRIDE, SETUID and SETGID (Kubernetes: securityContext.capabilities.add; systemd: CapabilityBoundingSet=) or run agentd as a user that is not root"
    )
}

/// Starts `command` with only the capabilities `keep`; returns its exit status and the
/// lines it wrote on stderr.
fn refused(
    mut command: std::process::Command,
    keep: u64,
) -> (std::process::ExitStatus, Vec<String>) {
    with_only_capabilities(&mut command, keep);
    command.stdin(std::process::Stdio::null());
    let mut daemon = Daemon::start(command);
    let status = daemon.wait_exit(Duration::from_secs(30));
    let stderr = daemon
        .seen
        .iter()
        .filter_map(|line| {
            let line: Value = serde_json::from_str(line).unwrap();
            line["stderr"].as_str().map(str::to_string)
        })
        .collect();
    (status, stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn as_root_without_the_capabilities_runs_users_need_agentd_refuses_to_start() {
    let world = World::new(USERS_NO_CAPABILITIES).await;
    let settings = world.settings(&["/bin/true".to_string()], &[]);
    let chown_and_dac_override = FOUR_CAPABILITIES & !(1 << 6 | 1 << 7);
    // Kubernetes' `drop: ["ALL"]`, systemd's empty `CapabilityBoundingSet=`; and a set
    // that lacks only the two that change users.
    for (keep, missing) in [
        (0, "CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_SETUID, CAP_SETGID"),
        (chown_and_dac_override, "CAP_SETUID, CAP_SETGID"),
    ] {
        let command = support::replica_command(&world.db.url, "capabilities", &pairs(&settings));
        let (status, stderr) = refused(command, keep);
        assert_eq!(status.code(), Some(2), "agentd run: {stderr:#?}");
        assert_eq!(stderr, [capabilities_refusal(missing)], "agentd run");
    }
    // The demo (whose "system" agent runs uname with the command executor) and a chat
    // answering in this process refuse the same way, before writing anything.
    let mut demo = support::agentd();
    demo.arg("demo").env("DATABASE_URL", &world.db.url);
    let mut chat = support::agentd();
    chat.args(["chat", &Uuid::new_v4().to_string(), "--worker"])
        .env("DATABASE_URL", &world.db.url);
    for (name, mut command) in [("agentd demo", demo), ("agentd chat", chat)] {
        command.envs(settings.iter().map(|(name, value)| (name, value)));
        let (status, stderr) = refused(command, chown_and_dac_override);
        assert_eq!(status.code(), Some(2), "{name}: {stderr:#?}");
        assert_eq!(
            stderr,
            [capabilities_refusal("CAP_SETUID, CAP_SETGID")],
            "{name}"
        );
    }
    assert_eq!(
        count(&world.db.pool, "SELECT count(*) FROM agents").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn as_root_with_only_chown_dac_override_setuid_and_setgid_a_run_gets_its_own_user() {
    let world = World::new(USERS_FOUR_CAPABILITIES).await;
    let agent = world.agent(&[]).await;
    let program = "echo \"uid=$(id -u)\"\n\
                   echo stored > \"$AGENTD_ARTIFACTS_DIR/report.txt\"\n\
                   mkdir \"/tmp/left-$AGENTD_RUN_ID\"\n\
                   echo left > \"/tmp/left-$AGENTD_RUN_ID/file\"\n\
                   setsid sleep 604 &\n";
    let settings = world.settings(&["/bin/sh".into(), "-c".into(), program.into()], &[]);
    let mut command = support::replica_command(&world.db.url, "capabilities", &pairs(&settings));
    with_only_capabilities(&mut command, FOUR_CAPABILITIES);
    let mut daemon = Daemon::start(command);
    daemon.wait_for("worker started", Duration::from_secs(30));
    assert_eq!(
        effective_capabilities(daemon.pid()),
        FOUR_CAPABILITIES,
        "agentd holds exactly the four"
    );
    let run_id = world.request(agent, None).await;
    let run = finished_run(&world.db.pool, run_id, Duration::from_secs(30)).await;
    assert_eq!(run.status, "completed", "{run:#?}");
    let uid = printed_uid(&run);
    assert!(world.owns(uid), "the run ran as uid {uid}");
    assert_eq!(run.artifacts.len(), 1, "{run:#?}");
    assert!(run.stored.contains("stored"), "{run:#?}");
    // Its escaped process is killed and what it left in /tmp removed.
    let left = PathBuf::from(format!("/tmp/left-{run_id}"));
    eventually(
        Duration::from_secs(10),
        "the run's leftovers are gone",
        || {
            let gone = processes_of_run(run_id, uid, &["sleep 604"]).is_empty() && !left.exists();
            async move { gone }
        },
    )
    .await;
    stop(daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn not_as_root_members_of_a_collaborate_team_do_not_end_each_other() {
    let world = World::new(USERS_TEAM_NOT_ROOT).await;
    // Two members of one user's team, run side by side under the team run's id: the first
    // ends at once, the second a moment later (each ending kills what its program left).
    let user = create_user(&world.db.pool).await;
    let (mark_name, mark_value) = world.mark.split_once('=').unwrap();
    let mut members = Vec::new();
    for delay in ["0", "2"] {
        let agent = create_agent(&world.db.pool, user).await;
        set_variables(
            &world.db.pool,
            agent,
            &[("DELAY", delay), (mark_name, mark_value)],
        )
        .await;
        members.push(agent);
    }
    let team: Uuid = sqlx::query_scalar(
        "INSERT INTO teams (name, type, user_id) VALUES ('Side by side', 'collaborate', $1) \
         RETURNING id",
    )
    .bind(user)
    .fetch_one(&world.db.pool)
    .await
    .unwrap();
    for (position, agent) in members.iter().enumerate() {
        sqlx::query("INSERT INTO team_agents (team_id, agent_id, position) VALUES ($1, $2, $3)")
            .bind(team)
            .bind(agent)
            .bind(position as i32)
            .execute(&world.db.pool)
            .await
            .unwrap();
    }
    let program = [
        "/bin/sh".to_string(),
        "-c".into(),
        "sleep \"$DELAY\"; echo slept $DELAY".into(),
    ];
    let settings = world.settings(&program, &[]);
    let (mut daemon, _url, _relay) = start_as_nobody(&world, &settings);
    daemon.wait_for("worker started", Duration::from_secs(30));
    let run_id = agentd::store::runs::request_run(
        &world.db.pool,
        agentd::store::runs::RunKind::Team,
        team,
        None,
    )
    .await
    .unwrap();
    let run = finished_run(&world.db.pool, run_id, Duration::from_secs(30)).await;
    stop(daemon);
    assert_eq!(run.status, "completed", "{run:#?}");
    for line in ["slept 0", "slept 2"] {
        assert!(
            run.logs.contains(&("info".into(), line.into())),
            "{:#?}",
            run.logs
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn setsid_and_double_forked_children_neither_hold_a_finished_run_open_nor_outlive_it() {
    let world = World::new(USERS_ESCAPE).await;
    let agent = world.agent(&[]).await;
    // Both escapees keep the program's stdout open and say so on it.
    let program = "echo \"uid=$(id -u)\"\n\
                   setsid sh -c 'echo setsid-started; exec sleep 601' &\n\
                   ( sh -c 'echo fork-started; exec sleep 602' & )\n\
                   sleep 0.3\n\
                   exit 0\n";
    let daemon = world.start(&["/bin/sh".into(), "-c".into(), program.into()], &[]);
    let started = Instant::now();
    let run_id = world.request(agent, None).await;
    let run = finished_run(&world.db.pool, run_id, Duration::from_secs(30)).await;
    let took = started.elapsed();
    let left = processes_of_run(run_id, printed_uid(&run), &["sleep 601", "sleep 602"]);
    stop(daemon);
    assert_eq!(run.status, "completed", "{run:#?}");
    for line in ["setsid-started", "fork-started"] {
        assert!(
            run.logs.contains(&("info".into(), line.into())),
            "{:#?}",
            run.logs
        );
    }
    // The timeout is 60 s: the run ended when its program did.
    assert!(took < Duration::from_secs(10), "the run took {took:?}");
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// Waits until the run's program says "started"; returns the uid it printed.
async fn wait_started(world: &World, run_id: Uuid) -> u32 {
    eventually(Duration::from_secs(30), "the program started", || async {
        count(
            &world.db.pool,
            &format!(
                "SELECT count(*) FROM run_logs WHERE run_id = '{run_id}' AND message = 'started'"
            ),
        )
        .await
            == 1
    })
    .await;
    printed_uid(&support::run_record(&world.db.pool, run_id).await)
}

/// Fails unless every one of `commands` runs as a process of the run.
fn assert_running(run_id: Uuid, uid: u32, commands: &[&str]) {
    let running = processes_of_run(run_id, uid, commands);
    for command in commands {
        assert!(
            running.iter().any(|process| process.command == *command),
            "{command} is not running: {running:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_run_that_ignores_sigterm_is_gone_with_its_escaped_children_after_kill_grace() {
    const KILL_GRACE: Duration = Duration::from_secs(3);
    let world = World::new(USERS_CANCEL).await;
    let agent = world.agent(&[]).await;
    let program = "trap '' TERM\n\
                   echo \"uid=$(id -u)\"\n\
                   setsid sh -c 'exec sleep 603' &\n\
                   ( sleep 604 & )\n\
                   sleep 0.3\n\
                   echo started\n\
                   while :; do sleep 1; done\n";
    let daemon = world.start(
        &["/bin/sh".into(), "-c".into(), program.into()],
        &[("AGENTD__EXECUTORS__COMMAND__KILL_GRACE", "3s")],
    );
    let run_id = world.request(agent, None).await;
    let uid = wait_started(&world, run_id).await;
    let commands = ["sleep 603", "sleep 604"];
    assert_running(run_id, uid, &commands);

    assert!(
        agentd::store::runs::cancel_run(&world.db.pool, run_id)
            .await
            .unwrap()
    );
    let cancelled = Instant::now();
    let run = finished_run(&world.db.pool, run_id, Duration::from_secs(30)).await;
    assert_eq!(
        (run.status.as_str(), run.error.as_deref()),
        ("failed", Some("cancelled"))
    );
    // SIGTERM alone does not end them (they ignore it)…
    if cancelled.elapsed() < KILL_GRACE / 2 {
        let living = processes_of_run(run_id, uid, &commands);
        assert!(
            living.iter().any(|process| process.state != 'Z'),
            "nothing was left to outlast SIGTERM"
        );
    }
    // …SIGKILL after kill_grace does, escaped children included.
    eventually(
        KILL_GRACE + Duration::from_secs(3),
        "no process of the run is left",
        || async { processes_of_run(run_id, uid, &commands).is_empty() },
    )
    .await;
    eprintln!(
        "all of the cancelled run's processes gone {:?} after cancel_run",
        cancelled.elapsed()
    );
    stop(daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_runs_leaving_orphans_leave_no_zombie_behind() {
    const RUNS: i64 = 1000;
    let world = World::new(USERS_THOUSAND).await;
    let agent = world.agent(&[]).await;
    let daemon = world.start(
        &[
            "/bin/sh".into(),
            "-c".into(),
            "(sleep 0.05 &) ; exit 0".into(),
        ],
        &[
            ("AGENTD__WORKER__CONCURRENCY", "16"),
            ("AGENTD__REQUESTS__MAX_PENDING_PER_USER", "2000"),
        ],
    );
    let started = Instant::now();
    for _ in 0..RUNS {
        world.request(agent, None).await;
    }
    let deadline = started + Duration::from_secs(300);
    loop {
        let completed = count(
            &world.db.pool,
            "SELECT count(*) FROM runs WHERE status = 'completed'",
        )
        .await;
        let failed: Option<String> =
            sqlx::query_scalar("SELECT error FROM runs WHERE status = 'failed' LIMIT 1")
                .fetch_optional(&world.db.pool)
                .await
                .unwrap();
        assert_eq!(failed, None, "a run failed");
        if completed == RUNS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{completed} of {RUNS} runs completed in {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    eprintln!(
        "{RUNS} runs in {took:?} ({:.0} runs/s)",
        RUNS as f64 / took.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let agentd = daemon.pid().as_raw();
    let table = process_table();
    let zombies: Vec<&ProcessEntry> = table
        .iter()
        .filter(|process| process.parent == agentd && process.state == 'Z')
        .collect();
    let children: Vec<&ProcessEntry> = table
        .iter()
        .filter(|process| process.parent == agentd || world.owns(process.uid))
        .collect();
    stop(daemon);
    assert!(zombies.is_empty(), "zombies of agentd: {zombies:#?}");
    assert!(children.is_empty(), "left behind: {children:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_stopped_by_shutdown_leaves_no_process_running() {
    let world = World::new(USERS_SHUTDOWN).await;
    let agent = world.agent(&[]).await;
    let program = "trap '' TERM\n\
                   echo \"uid=$(id -u)\"\n\
                   setsid sh -c 'exec sleep 605' &\n\
                   ( sleep 606 & )\n\
                   sleep 0.3\n\
                   echo started\n\
                   while :; do sleep 1; done\n";
    let daemon = world.start(
        &["/bin/sh".into(), "-c".into(), program.into()],
        &[
            ("AGENTD__EXECUTORS__COMMAND__KILL_GRACE", "2s"),
            ("AGENTD__SHUTDOWN__GRACE", "1s"),
        ],
    );
    let run_id = world.request(agent, None).await;
    let uid = wait_started(&world, run_id).await;
    let commands = ["sleep 605", "sleep 606"];
    assert_running(run_id, uid, &commands);
    // Past shutdown.grace the run is stopped; agentd exits only once kill_grace has passed
    // and its processes are killed. (Killed just before agentd exited, some may still be
    // zombies waiting for the host's init to reap them: they run no more.)
    let stopping = Instant::now();
    let lines = stop(daemon);
    let took = stopping.elapsed();
    let living: Vec<ProcessEntry> = processes_of_run(run_id, uid, &commands)
        .into_iter()
        .filter(|process| process.state != 'Z')
        .collect();
    assert!(
        living.is_empty(),
        "still running after agentd exited: {living:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line.contains("grace period over; cancelling the remaining runs")),
        "{lines:#?}"
    );
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    let run = support::run_record(&world.db.pool, run_id).await;
    assert_eq!(
        (run.status.as_str(), run.error.as_deref()),
        ("failed", Some("worker shutting down"))
    );
}

/// A program that runs until killed (`sleep <seconds>`), with a child that escaped its
/// process group and session (`setsid`, `sleep <seconds + 1>`): says its uid, then
/// "started". Each test has its own `seconds`, so that it finds its own sleeps.
fn long_running(seconds: u32) -> Vec<String> {
    let escaped = seconds + 1;
    let script = format!(
        "echo \"uid=$(id -u)\"\n\
         setsid sh -c 'exec sleep {escaped}' &\n\
         echo started\n\
         exec sleep {seconds}\n"
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

/// Living processes carrying `AGENTD_RUN_ID=<run_id>`, or running one of the sleeps of
/// [`long_running`]`(seconds)`.
fn living_of_run(run_id: Uuid, seconds: u32) -> Vec<ProcessEntry> {
    let marker = format!("AGENTD_RUN_ID={run_id}");
    let sleeps = [format!("sleep {seconds}"), format!("sleep {}", seconds + 1)];
    process_table()
        .into_iter()
        .filter(|process| process.state != 'Z')
        .filter(|process| environ_holds(process.pid, &marker) || sleeps.contains(&process.command))
        .collect()
}

/// Sends agentd a first and a second signal while `run_id`'s program
/// ([`long_running`]`(seconds)`) runs; asserts it exits 130 within
/// `shutdown::FORCED_EXIT_LIMIT` and a margin, with no process of the run left running, and
/// the run's row untouched (its lease expires; a reaper fails it).
async fn assert_second_signal_kills_the_run(
    world: &World,
    mut daemon: Daemon,
    run_id: Uuid,
    seconds: u32,
) {
    let living = living_of_run(run_id, seconds);
    assert!(
        living.len() >= 2,
        "the program and its escaped child run: {living:#?}"
    );
    daemon.stop_at_once();
    let living = living_of_run(run_id, seconds);
    assert!(
        living.is_empty(),
        "still running after agentd exited: {living:#?}"
    );
    let run = support::run_record(&world.db.pool, run_id).await;
    assert_eq!(run.status, "running", "{run:#?}");
    assert_eq!(
        count(
            &world.db.pool,
            &format!("SELECT count(*) FROM agentd.leases WHERE run_id = '{run_id}'")
        )
        .await,
        1,
        "the run keeps its lease until it expires"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_kills_every_process_of_the_running_runs_before_agentd_exits() {
    let world = World::new(USERS_SECOND_SIGNAL).await;
    let agent = world.agent(&[]).await;
    let daemon = world.start(&long_running(607), &[]);
    let run_id = world.request(agent, None).await;
    let uid = wait_started(&world, run_id).await;
    assert!(
        world.owns(uid),
        "the program runs as a user of its own: {uid}"
    );
    assert_second_signal_kills_the_run(&world, daemon, run_id, 607).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn not_as_root_a_second_signal_kills_every_process_of_the_running_runs_before_agentd_exits() {
    let world = World::new(USERS_SECOND_SIGNAL_NOT_ROOT).await;
    let agent = world.agent(&[]).await;
    let settings = world.settings(&long_running(609), &[]);
    let (mut daemon, _url, _relay) = start_as_nobody(&world, &settings);
    daemon.wait_for("worker started", Duration::from_secs(30));
    let run_id = world.request(agent, None).await;
    let uid = wait_started(&world, run_id).await;
    assert_eq!(uid, NOBODY, "the program runs as agentd's own user");
    assert_second_signal_kills_the_run(&world, daemon, run_id, 609).await;
}
