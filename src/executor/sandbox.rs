//! Where, and as whom, the `command` executor's programs run (docs/security.md).
//!
//! As root, each run gets a user of its own from `executors.command.uid_range`, held by a
//! lock file for as long as the run lasts, so no two running runs on the host share one;
//! its processes run as that user and group, without supplementary groups, unable to gain
//! privileges (`no_new_privs`) and with at most `executors.command.max_processes`
//! processes; its folder (working folder, `HOME`, `TMPDIR`, artifacts) is that user's
//! alone. When the run ends, every process of that user is killed and what it left in the
//! shared temporary folders is removed, so the next run with the same user finds nothing.
//!
//! As root, agentd needs four capabilities for that: `CAP_CHOWN` (the run's folder becomes
//! its user's), `CAP_DAC_OVERRIDE` (to read its artifacts and remove its folder),
//! `CAP_SETUID` and `CAP_SETGID` (to start its program and kill its processes as its
//! user). [`Sandbox::prepare`] refuses to start without them rather than fail every run.
//!
//! Not as root, runs share agentd's own user: a program could signal agentd, read the
//! environment and folders of the runs beside it, and reach whatever agentd's user may (the
//! artifacts every run stored, configuration files, an embedded database).
//! [`Sandbox::limitations`] says so once at start-up.

use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Gid, Uid, chown};

use crate::config::CommandExecutorSettings;

/// How long [`Killer::kill`] waits, not as root, for the processes it killed to be gone.
const KILLED_GONE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Folders any user may write to, where a program may leave files behind its own.
const SHARED_TEMPORARY_FOLDERS: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];

/// The capabilities root needs to give runs users of their own (see the module
/// documentation), with their numbers in `linux/capability.h`.
const NEEDED_CAPABILITIES: [(u32, &str); 4] = [
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (7, "CAP_SETUID"),
    (6, "CAP_SETGID"),
];

/// How the runs of one replica are kept apart.
pub struct Sandbox {
    /// Holds one folder per running run.
    base: PathBuf,
    /// As root: the users runs run as.
    users: Option<Users>,
}

/// The users of runs, and their lock files.
struct Users {
    first: u32,
    last: u32,
    locks: PathBuf,
    max_processes: u64,
}

impl Sandbox {
    /// Prepares the runs' folder, and as root checks that agentd holds the capabilities
    /// runs' users need and that the users of `executors.command.uid_range` exist in this
    /// user namespace. The error names the setting to change.
    pub fn prepare(settings: &CommandExecutorSettings) -> Result<Sandbox, String> {
        let base = settings
            .runs_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("agentd-runs"));
        let me = Uid::effective();
        let root = me.is_root();
        if root {
            check_capabilities()?;
        }
        // Others may pass through (as root, to reach their own run's folder), never list.
        private_folder(&base, me.as_raw(), if root { 0o711 } else { 0o700 })
            .map_err(|error| format!("executors.command.runs_dir: {}: {error}", base.display()))?;
        let users = if root {
            let (first, last) = (settings.uid_range.first(), settings.uid_range.last());
            check_mapped(first, last)?;
            let locks = base.join(".locks");
            private_folder(&locks, 0, 0o700).map_err(|error| {
                format!("executors.command.runs_dir: {}: {error}", locks.display())
            })?;
            Some(Users {
                first,
                last,
                locks,
                max_processes: settings.max_processes,
            })
        } else {
            None
        };
        Ok(Sandbox { base, users })
    }

    /// What this replica cannot do to keep runs apart, when it is not root; `None` as root.
    pub fn limitations(&self) -> Option<String> {
        self.users.is_none().then(|| {
            format!(
                "agentd is not running as root (uid {}): the command executor's programs run as agentd's own user, so a program could signal agentd, read the environments and folders of runs beside it, and reach whatever agentd's user may: the artifacts every run stored (artifacts.dir), configuration files, an embedded database; agentd's own environment and memory stay unreadable (it is not dumpable). Run agentd as root for a user per run (executors.command.uid_range, docs/security.md)",
                Uid::effective()
            )
        })
    }

    /// A place for one run: a user of its own (as root) and a private folder.
    pub fn enter(&self, run_id: uuid::Uuid) -> Result<RunSpace, String> {
        let (uid, lock) = match &self.users {
            Some(users) => {
                let (uid, lock) = users.take()?;
                // A user taken over from a replica that died may still have processes.
                crate::process::kill_user(uid)
                    .map_err(|error| format!("cannot prepare user {uid}: {error}"))?;
                remove_files_of(uid);
                (Some(uid), Some(lock))
            }
            None => (None, None),
        };
        let folder = self.base.join(uuid::Uuid::new_v4().simple().to_string());
        let space = RunSpace {
            artifacts: folder.join("artifacts"),
            tmp: folder.join("tmp"),
            folder,
            uid,
            max_processes: self.users.as_ref().map(|users| users.max_processes),
            marker: format!("AGENTD_RUN_ID={run_id}").into_bytes(),
            _lock: lock,
        };
        space
            .create()
            .map_err(|error| format!("could not create the run's folder: {error}"))?;
        Ok(space)
    }
}

impl Users {
    /// A user no running run holds: tried from a random place in the range, so runs do
    /// not all queue on the first one.
    fn take(&self) -> Result<(u32, Flock<File>), String> {
        let count = u64::from(self.last - self.first) + 1;
        let start = ((crate::retry::random_fraction() * count as f64) as u64).min(count - 1);
        for step in 0..count {
            let uid = self.first + ((start + step) % count) as u32;
            let path = self.locks.join(uid.to_string());
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                return Ok((uid, lock));
            }
        }
        Err(format!(
            "every user of executors.command.uid_range ({}-{}) is taken by a running run",
            self.first, self.last
        ))
    }
}

/// One run's place: its folder, and its user as root. Dropping it removes the folder and
/// what the run's user left in the shared temporary folders.
pub struct RunSpace {
    /// The working folder and `HOME`.
    pub folder: PathBuf,
    /// `AGENTD_ARTIFACTS_DIR`.
    pub artifacts: PathBuf,
    /// `TMPDIR`.
    pub tmp: PathBuf,
    /// The run's own user (as root).
    pub uid: Option<u32>,
    max_processes: Option<u64>,
    /// `AGENTD_RUN_ID=<id>`, which the run's processes carry in their environment.
    marker: Vec<u8>,
    _lock: Option<Flock<File>>,
}

impl RunSpace {
    fn create(&self) -> std::io::Result<()> {
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        builder.create(&self.folder)?;
        builder.create(&self.artifacts)?;
        builder.create(&self.tmp)?;
        if let Some(uid) = self.uid {
            for folder in [&self.folder, &self.artifacts, &self.tmp] {
                chown(
                    folder.as_path(),
                    Some(Uid::from_raw(uid)),
                    Some(Gid::from_raw(uid)),
                )?;
            }
        }
        Ok(())
    }

    /// Makes `command` run in this space: its user and group, the folder as working
    /// folder, `HOME` and `TMPDIR`, no way to gain privileges, and (as root) a bound on
    /// its processes.
    pub fn configure(&self, command: &mut std::process::Command) {
        command
            .current_dir(&self.folder)
            .env("HOME", &self.folder)
            .env("TMPDIR", &self.tmp);
        if let Some(uid) = self.uid {
            // Setting the user also drops the supplementary groups (std does so for root).
            command.uid(uid).gid(uid);
        }
        let max_processes = self.max_processes;
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // prctl and setrlimit, which are async-signal-safe system calls.
        unsafe {
            command.pre_exec(move || {
                if nix::libc::prctl(nix::libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(limit) = max_processes {
                    let limit = nix::libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if nix::libc::setrlimit(nix::libc::RLIMIT_NPROC, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// The user an artifact file must belong to (as root): a file the run did not create
    /// (a hard link to someone else's) is refused.
    pub fn owner(&self) -> Option<u32> {
        self.uid
    }

    /// What kills the run's processes, for a thread of its own.
    pub fn killer(&self) -> Killer {
        let mut own_folder = b"AGENTD_ARTIFACTS_DIR=".to_vec();
        own_folder.extend_from_slice(self.artifacts.as_os_str().as_bytes());
        Killer {
            uid: self.uid,
            marker: self.marker.clone(),
            own_folder,
        }
    }
}

/// Kills a run's processes (it may wait a little for them to die: call it where blocking
/// is fine).
#[derive(Clone)]
pub struct Killer {
    uid: Option<u32>,
    /// `AGENTD_RUN_ID=<id>`.
    marker: Vec<u8>,
    /// `AGENTD_ARTIFACTS_DIR=<this program's folder>`: tells this program's processes from
    /// those of a team member running beside it under the same run id.
    own_folder: Vec<u8>,
}

impl Killer {
    /// Kills every process of the run but `program` itself (which the caller waits for):
    /// as root every process of the run's user; otherwise the program's process group, its
    /// descendants, every process carrying the run's `AGENTD_RUN_ID` (but those carrying
    /// the folder of a team member running beside it), and escaped processes that cleared
    /// their environment. Returns once those it found are gone (a second at most, not as
    /// root).
    pub fn kill(&self, program: i32) {
        match self.uid {
            Some(uid) => {
                if let Err(error) = crate::process::kill_user(uid) {
                    tracing::error!(error = %error, "could not kill the run's processes");
                }
            }
            None => {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(program),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let mut left = crate::process::descendants(program);
                left.extend(crate::process::processes_marked(
                    &self.marker,
                    &self.own_folder,
                ));
                left.retain(|pid| *pid != program && *pid != std::process::id() as i32);
                crate::process::kill_all(&left);
                crate::process::kill_unclaimed_strays();
                crate::process::wait_gone(&left, KILLED_GONE_WAIT);
            }
        }
    }
}

impl Drop for RunSpace {
    /// Removes what the run left (its processes were killed before, see [`Killer`]); the
    /// user becomes free for another run when the lock goes with this value.
    fn drop(&mut self) {
        if let Some(uid) = self.uid {
            remove_files_of(uid);
        }
        let _ = std::fs::remove_dir_all(&self.folder);
    }
}

/// Creates `path` (mode `mode`, owned by `owner`) or checks that the existing one is owned
/// by `owner` and writable by no one else.
fn private_folder(path: &Path, owner: u32, mode: u32) -> Result<(), String> {
    match std::fs::DirBuilder::new()
        .recursive(false)
        .mode(mode)
        .create(path)
    {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(path)
                .map_err(|error| error.to_string())?;
        }
        Err(error) => return Err(error.to_string()),
    }
    if !crate::process::is_private_folder(path, owner) {
        return Err(format!(
            "it must be a folder of uid {owner} that no one else may write to (remove it, or name another)"
        ));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|error| error.to_string())
}

/// Refuses, naming the missing ones, when agentd's effective capabilities (`CapEff` in
/// `/proc/self/status`) lack one of [`NEEDED_CAPABILITIES`]: every run would then fail
/// with `cannot prepare user`. Without `/proc` it cannot tell, and lets start-up go on.
fn check_capabilities() -> Result<(), String> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Ok(());
    };
    let Some(effective) = effective_capabilities(&status) else {
        return Ok(());
    };
    let missing: Vec<&str> = NEEDED_CAPABILITIES
        .iter()
        .filter(|(number, _)| effective & (1 << number) == 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "executors.command: agentd runs as root without {}: each run's own user cannot be made; grant CHOWN, DAC_OVERRIDE, SETUID and SETGID (Kubernetes: securityContext.capabilities.add; systemd: CapabilityBoundingSet=) or run agentd as a user that is not root",
        missing.join(", ")
    ))
}

/// The effective capability set of a `/proc/<pid>/status` text.
fn effective_capabilities(status: &str) -> Option<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// Whether uids `first..=last` exist in this user namespace (`/proc/self/uid_map`).
fn check_mapped(first: u32, last: u32) -> Result<(), String> {
    let Ok(map) = std::fs::read_to_string("/proc/self/uid_map") else {
        return Ok(());
    };
    let mapped = map.lines().any(|line| {
        let fields: Vec<u64> = line
            .split_whitespace()
            .filter_map(|field| field.parse().ok())
            .collect();
        matches!(fields.as_slice(), [inside, _, count]
            if u64::from(first) >= *inside && u64::from(last) < inside + count)
    });
    if mapped {
        Ok(())
    } else {
        Err(format!(
            "executors.command.uid_range: uids {first}-{last} do not exist in this user namespace (/proc/self/uid_map: {}); choose a range inside it",
            map.split_whitespace().collect::<Vec<_>>().join(" ")
        ))
    }
}

/// Removes what user `uid` left at the top of the shared temporary folders.
fn remove_files_of(uid: u32) {
    for folder in SHARED_TEMPORARY_FOLDERS {
        let Ok(entries) = std::fs::read_dir(folder) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.uid() != uid {
                continue;
            }
            let path = entry.path();
            let _ = if metadata.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_someone_else_may_write_is_refused() {
        let scratch = tempfile::tempdir().unwrap();
        let open = scratch.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let me = Uid::effective().as_raw();
        assert!(private_folder(&open, me, 0o700).is_err());
        let fresh = scratch.path().join("a/b");
        private_folder(&fresh, me, 0o700).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
    }
}
