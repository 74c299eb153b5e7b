//! What agentd does as a process among the programs it runs (docs/security.md).
//!
//! - [`harden`] at start-up, before any thread: agentd becomes non-dumpable (no process of
//!   its user can read its memory or its `/proc/<pid>/environ`), wipes the secrets it has
//!   read into its settings from its own environment, and becomes a child subreaper, so
//!   processes that escape a run (double forks, `setsid`) are re-parented to it instead of
//!   vanishing into the host's init.
//! - [`spawn`]: every child agentd starts goes through it, so the orphan reaper knows its
//!   own children from re-parented strays.
//! - [`reap_orphans`]: reaps the strays, so no zombies accumulate, whether agentd is a
//!   subreaper or the container's PID 1.
//! - [`kill_user`], [`descendants`], [`processes_marked`]: find and kill every process of a
//!   run when it ends.
//! - [`at_forced_exit`], [`end_before_forced_exit`]: when agentd exits at once (a second
//!   signal), what must not outlive it (the processes of its runs, the embedded server it
//!   started) is ended first, each the way its owner ends it normally.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

/// Children agentd started and waits for itself; the orphan reaper leaves them alone. Held
/// while spawning and while reaping, so no child is seen before it is registered.
static OWN_CHILDREN: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

fn own_children() -> std::sync::MutexGuard<'static, Option<HashSet<i32>>> {
    OWN_CHILDREN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What [`harden`] could not do, for the start-up line.
#[derive(Debug, Default)]
pub struct Hardening {
    /// Failures, one line each.
    pub failed: Vec<String>,
}

/// Makes agentd non-dumpable, wipes `secrets` (names of environment variables whose
/// values the settings already hold) from its environment, and makes it a child subreaper.
///
/// Call it in `main` before the async runtime or any other thread starts: changing the
/// environment is only sound while nothing else reads it.
pub fn harden(secrets: &[&str]) -> Hardening {
    let mut hardening = Hardening::default();
    if let Err(error) = nix::sys::prctl::set_dumpable(false) {
        hardening
            .failed
            .push(format!("cannot make agentd non-dumpable: {error}"));
    }
    for name in secrets {
        wipe_variable(name);
    }
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        hardening
            .failed
            .push(format!("cannot make agentd a child subreaper: {error}"));
    }
    hardening
}

/// Removes `name` from the environment, overwriting its value in place first: the
/// process's original environment block (what `/proc/<pid>/environ` shows) keeps the
/// bytes otherwise.
fn wipe_variable(name: &str) {
    if name.is_empty() || name.contains(['=', '\0']) {
        return;
    }
    let prefix = format!("{name}=");
    // SAFETY: called before any other thread exists (see `harden`); `environ` is a
    // NULL-terminated array of pointers to NUL-terminated strings owned by the process,
    // which may be written in place within their length.
    unsafe {
        let mut entry = nix::libc::environ;
        while !entry.is_null() && !(*entry).is_null() {
            let text = *entry;
            let bytes = std::ffi::CStr::from_ptr(text).to_bytes();
            if bytes.starts_with(prefix.as_bytes()) {
                let value = text.add(prefix.len());
                std::ptr::write_bytes(value, 0, bytes.len() - prefix.len());
            }
            entry = entry.add(1);
        }
        std::env::remove_var(name);
    }
}

/// Starts `command`, registered as agentd's own child until [`forget`] (after it was
/// waited for).
pub fn spawn(command: &mut std::process::Command) -> io::Result<std::process::Child> {
    let mut children = own_children();
    let child = command.spawn()?;
    children
        .get_or_insert_with(HashSet::new)
        .insert(child.id() as i32);
    Ok(child)
}

/// [`spawn`] for tokio's commands.
pub fn spawn_tokio(command: &mut tokio::process::Command) -> io::Result<tokio::process::Child> {
    let mut children = own_children();
    let child = command.spawn()?;
    if let Some(pid) = child.id() {
        children.get_or_insert_with(HashSet::new).insert(pid as i32);
    }
    Ok(child)
}

/// The child `pid` was waited for: no longer agentd's to track.
pub fn forget(pid: u32) {
    if let Some(children) = own_children().as_mut() {
        children.remove(&(pid as i32));
    }
}

/// How often the orphan reaper looks when no SIGCHLD arrives.
const REAP_INTERVAL: Duration = Duration::from_secs(5);

/// Reaps exited processes re-parented to agentd (or inherited as PID 1) until `stop`.
pub async fn reap_orphans(stop: CancellationToken) {
    let mut children = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(error = %error, "cannot watch SIGCHLD; reaping orphans every few seconds");
            None
        }
    };
    loop {
        reap_once();
        tokio::select! {
            _ = async { match children.as_mut() { Some(signal) => { signal.recv().await; } None => std::future::pending().await } } => {}
            _ = tokio::time::sleep(REAP_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Reaps every exited child that agentd did not start itself.
fn reap_once() {
    let me = std::process::id() as i32;
    let children = own_children();
    for process in processes() {
        if process.parent == me
            && process.zombie
            && !children
                .as_ref()
                .is_some_and(|own| own.contains(&process.pid))
        {
            let _ = waitpid(Pid::from_raw(process.pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// One line of `/proc/<pid>/stat`, the parts agentd needs.
#[derive(Debug, Clone, Copy)]
pub struct ProcessInfo {
    pub pid: i32,
    pub parent: i32,
    pub zombie: bool,
}

/// Every process visible in `/proc`.
pub fn processes() -> Vec<ProcessInfo> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(process)
        .collect()
}

/// Process `pid`, unless it is gone.
pub fn process(pid: i32) -> Option<ProcessInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let parent = fields.next()?.parse().ok()?;
    Some(ProcessInfo {
        pid,
        parent,
        zombie: state == "Z",
    })
}

/// The living descendants of `root` (not `root` itself), found through parent links.
pub fn descendants(root: i32) -> Vec<i32> {
    let all = processes();
    let mut found = vec![root];
    let mut index = 0;
    while index < found.len() {
        let parent = found[index];
        found.extend(
            all.iter()
                .filter(|process| process.parent == parent && !process.zombie)
                .map(|process| process.pid),
        );
        index += 1;
    }
    found.remove(0);
    found
}

/// Processes of one program of a run: their environment holds `marker`
/// (`AGENTD_RUN_ID=<id>`, which a run's processes keep unless they clear their
/// environment) and no other `AGENTD_ARTIFACTS_DIR` than `own` (`AGENTD_ARTIFACTS_DIR=…`).
/// The members of a team run side by side under the team run's id, each in a folder of its
/// own: a process carrying another member's folder is that member's, and stays while that
/// member runs. Only processes whose environment agentd may read are found (its own
/// user's, or all as root).
pub fn processes_marked(marker: &[u8], own: &[u8]) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|process| !process.zombie)
        .filter(|process| {
            std::fs::read(format!("/proc/{}/environ", process.pid))
                .is_ok_and(|environ| of_program(&environ, marker, own))
        })
        .map(|process| process.pid)
        .collect()
}

/// Whether an environment block (`NAME=value` entries separated by NUL) holds `marker` and
/// no `AGENTD_ARTIFACTS_DIR` but `own`: see [`processes_marked`].
fn of_program(environ: &[u8], marker: &[u8], own: &[u8]) -> bool {
    let mut marked = false;
    for entry in environ.split(|byte| *byte == 0) {
        if entry == marker {
            marked = true;
        } else if entry.starts_with(b"AGENTD_ARTIFACTS_DIR=") && entry != own {
            return false;
        }
    }
    marked
}

/// Whether an entry (`NAME=value`) of `pid`'s environment satisfies `wanted`; `None` when
/// the environment cannot be read (the process is gone, or not agentd's to read).
fn environ_has(pid: i32, wanted: impl Fn(&[u8]) -> bool) -> Option<bool> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(environ.split(|byte| *byte == 0).any(wanted))
}

/// Sends SIGKILL to each of `pids`.
pub fn kill_all(pids: &[i32]) {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
}

/// Kills every process of user `uid` (root only), and returns once none is alive.
///
/// A short-lived child takes on the user's identity and sends SIGKILL to every process it
/// may signal, which are exactly that user's: the kernel walks every process with new
/// ones held back, so none forked meanwhile escapes, and a process with SIGKILL pending
/// cannot fork. The survivors' count is then read from `/proc` until it is zero.
pub fn kill_user(uid: u32) -> io::Result<()> {
    for _ in 0..5 {
        signal_user(uid)?;
        for _ in 0..50 {
            if processes_of_user(uid).is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Err(io::Error::other(format!(
        "processes of uid {uid} survived SIGKILL"
    )))
}

/// One `kill(-1, SIGKILL)` as user `uid`, from a forked child.
fn signal_user(uid: u32) -> io::Result<()> {
    let child = {
        // Registered before the orphan reaper can see it exit.
        let mut children = own_children();
        // SAFETY: between fork and _exit the child calls only async-signal-safe functions
        // (setgroups, setresgid, setresuid, kill, _exit) on values prepared before the fork,
        // and never touches the lock held here.
        let pid = unsafe {
            match nix::libc::fork() {
                -1 => return Err(io::Error::last_os_error()),
                0 => {
                    let id = uid as nix::libc::uid_t;
                    if nix::libc::setgroups(0, std::ptr::null()) != 0
                        || nix::libc::setresgid(id, id, id) != 0
                        || nix::libc::setresuid(id, id, id) != 0
                    {
                        nix::libc::_exit(2);
                    }
                    // Fails only when there is no other process at all.
                    nix::libc::kill(-1, nix::libc::SIGKILL);
                    nix::libc::_exit(0)
                }
                pid => pid,
            }
        };
        children.get_or_insert_with(HashSet::new).insert(pid);
        pid
    };
    let status = waitpid(Pid::from_raw(child), None).map_err(io::Error::from);
    forget(child as u32);
    match status? {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        other => Err(io::Error::other(format!(
            "cannot act as uid {uid} to kill its processes: {other:?}"
        ))),
    }
}

/// Living processes whose real user is `uid`.
pub fn processes_of_user(uid: u32) -> Vec<i32> {
    let wanted = uid.to_string();
    processes()
        .into_iter()
        .filter(|process| !process.zombie)
        .filter(|process| {
            std::fs::read_to_string(format!("/proc/{}/status", process.pid)).is_ok_and(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("Uid:"))
                    .and_then(|ids| ids.split_whitespace().next())
                    == Some(wanted.as_str())
            })
        })
        .map(|process| process.pid)
        .collect()
}

/// Kills agentd's own children that it did not start and that carry no `AGENTD_RUN_ID`:
/// processes that escaped a run (re-parented to agentd, the subreaper) and cleared their
/// environment, so that no run can claim them. Escaped processes that keep the variable
/// are killed when their run ends.
pub fn kill_unclaimed_strays() {
    let me = std::process::id() as i32;
    let strays: Vec<i32> = {
        let children = own_children();
        processes()
            .into_iter()
            .filter(|process| process.parent == me && !process.zombie)
            .filter(|process| {
                !children
                    .as_ref()
                    .is_some_and(|own| own.contains(&process.pid))
            })
            .map(|process| process.pid)
            .collect()
    };
    let unclaimed: Vec<i32> = strays
        .into_iter()
        .filter(|pid| {
            environ_has(*pid, |entry| entry.starts_with(b"AGENTD_RUN_ID=")) == Some(false)
        })
        .collect();
    kill_all(&unclaimed);
}

/// What must be ended before agentd exits at once: one action per running program or
/// server, registered by its owner for as long as it may live.
static FORCED_EXIT: Mutex<ForcedExit> = Mutex::new(ForcedExit {
    next: 0,
    duties: None,
    exiting: false,
});

type Duty = Arc<dyn Fn() + Send + Sync>;

struct ForcedExit {
    next: u64,
    duties: Option<HashMap<u64, Duty>>,
    /// [`end_before_forced_exit`] has begun: a duty registered now is done at once.
    exiting: bool,
}

fn forced_exit() -> std::sync::MutexGuard<'static, ForcedExit> {
    FORCED_EXIT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A registered [`at_forced_exit`] action; dropping it withdraws the action (what it ends
/// has been ended, or waited for, the normal way).
#[must_use = "the action is withdrawn when this is dropped"]
pub struct ForcedExitDuty(u64);

impl Drop for ForcedExitDuty {
    fn drop(&mut self) {
        if let Some(duties) = forced_exit().duties.as_mut() {
            duties.remove(&self.0);
        }
    }
}

/// Registers `end`, which kills something agentd started (a run's processes, its embedded
/// server) and may block briefly, to be done if agentd exits at once
/// ([`end_before_forced_exit`]). Registered once that exit has begun, it is done at once,
/// here: nothing started meanwhile escapes it.
pub fn at_forced_exit(end: impl Fn() + Send + Sync + 'static) -> ForcedExitDuty {
    let end: Duty = Arc::new(end);
    let mut state = forced_exit();
    let id = state.next;
    state.next += 1;
    state
        .duties
        .get_or_insert_with(HashMap::new)
        .insert(id, end.clone());
    let exiting = state.exiting;
    drop(state);
    if exiting {
        end();
    }
    ForcedExitDuty(id)
}

/// Does every registered [`at_forced_exit`] action, side by side on threads of their own,
/// and returns when all are done or `limit` has passed, whichever comes first; returns how
/// many were not done in time.
pub fn end_before_forced_exit(limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    let duties: Vec<Duty> = {
        let mut state = forced_exit();
        state.exiting = true;
        state
            .duties
            .iter()
            .flat_map(|duties| duties.values().cloned())
            .collect()
    };
    let (done, finished) = std::sync::mpsc::channel();
    let mut pending = 0;
    for duty in duties {
        let done = done.clone();
        let started = std::thread::Builder::new()
            .name("forced-exit".into())
            .spawn(move || {
                duty();
                let _ = done.send(());
            });
        match started {
            Ok(_) => pending += 1,
            Err(error) => tracing::error!(error = %error, "cannot start a thread to end a program"),
        }
    }
    while pending > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if finished.recv_timeout(left).is_err() {
            break;
        }
        pending -= 1;
    }
    pending
}

/// Whether [`end_before_forced_exit`] has begun: agentd is exiting at once, and what ends
/// now (a program it killed) is not to be recorded.
pub fn forced_exit_begun() -> bool {
    forced_exit().exiting
}

/// Whether `pid` is running (exited and not yet reaped counts as gone).
pub fn is_running(pid: i32) -> bool {
    process(pid).is_some_and(|process| !process.zombie)
}

/// Waits until none of `pids` runs (they were sent SIGKILL: dying takes a moment), or
/// `limit` has passed; returns whether none runs.
pub fn wait_gone(pids: &[i32], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !pids.iter().any(|pid| is_running(*pid)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `path` is a folder owned by `uid` that no one else may write to.
pub fn is_private_folder(path: &Path, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|metadata| {
        metadata.is_dir() && metadata.uid() == uid && metadata.mode() & 0o022 == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_claims_the_processes_of_its_run_but_not_a_side_by_side_members() {
        let (marker, own) = (
            &b"AGENTD_RUN_ID=r1"[..],
            &b"AGENTD_ARTIFACTS_DIR=/runs/a/artifacts"[..],
        );
        let environ = |entries: &[&str]| entries.join("\0").into_bytes();
        let ours = environ(&[
            "PATH=/bin",
            "AGENTD_RUN_ID=r1",
            "AGENTD_ARTIFACTS_DIR=/runs/a/artifacts",
        ]);
        assert!(of_program(&ours, marker, own));
        // The folder variable cleared, the run id kept: still the run's.
        assert!(of_program(&environ(&["AGENTD_RUN_ID=r1"]), marker, own));
        // Another member of the same team run, in its own folder.
        let sibling = environ(&["AGENTD_RUN_ID=r1", "AGENTD_ARTIFACTS_DIR=/runs/b/artifacts"]);
        assert!(!of_program(&sibling, marker, own));
        // Another run.
        let other = environ(&["AGENTD_RUN_ID=r2", "AGENTD_ARTIFACTS_DIR=/runs/a/artifacts"]);
        assert!(!of_program(&other, marker, own));
        assert!(!of_program(b"", marker, own));
    }

    #[test]
    fn descendants_are_found_through_parent_links() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let root = child.id() as i32;
        let mut found = Vec::new();
        for _ in 0..100 {
            found = descendants(root);
            if found.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(found.len(), 2, "{found:?}");
        kill_all(&found);
        let _ = child.wait();
        assert!(descendants(root).is_empty());
    }
}
