//! The replicas of a benchmark: real `agentd run` processes of this very binary, and what
//! the kernel says they cost (CPU time, resident memory). They start either as the bench's
//! replicas (named, logging at `warn` as JSON, their artifacts in the bench's folder) or
//! plain, as a user starts `agentd run` with nothing but the database set.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// What one replica cost, read from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessCost {
    /// User plus system CPU seconds since the process started.
    pub cpu_seconds: f64,
    /// Resident memory now, MiB.
    pub rss_mib: f64,
    /// Peak resident memory, MiB.
    pub peak_rss_mib: f64,
}

/// Running replicas; dropping it kills those still running.
pub struct Fleet {
    children: Vec<Child>,
    /// Each replica's log file, named when one exits early.
    logs: Vec<PathBuf>,
}

/// How to start the replicas.
pub struct FleetOptions<'a> {
    /// The database they work on.
    pub url: &'a str,
    /// How many to start.
    pub replicas: usize,
    /// Extra settings (`AGENTD__…` variables).
    pub settings: Vec<(String, String)>,
    /// Where their logs and artifacts go.
    pub folder: &'a Path,
    /// Started as a user starts `agentd run`: the database and nothing else set (see
    /// [`Fleet::start`]), rather than as the bench's replicas.
    pub plain: bool,
}

/// Whether the bench's own environment variable `name` says something to agentd: plain
/// replicas must not inherit it, or they would not run at the defaults.
fn speaks_to_agentd(name: &str) -> bool {
    name.starts_with("AGENTD") || name == "DATABASE_URL" || name == "RUST_LOG"
}

impl Fleet {
    /// Starts the replicas. The bench's are named `bench-1`, `bench-2`, …, serve no
    /// endpoints, log at `warn` as JSON and keep their artifacts in the folder.
    ///
    /// Plain ones get `DATABASE_URL` and, of agentd's settings, only what replicas on one
    /// host cannot share: each its own port for the endpoints (`127.0.0.1:0`, a free one
    /// the kernel picks and the replica logs, where the default 127.0.0.1:9464 would let
    /// only the first start; the endpoints stay on, as they are by default). They inherit
    /// no `AGENTD…`, `DATABASE_URL` or `RUST_LOG` variable of the bench's environment, and
    /// run in the folder, so that the default relative `artifacts.dir` lands there. Their
    /// name is the default (host name and process id), their logs are `info` lines in the
    /// default format (JSON, as the log is a file).
    pub fn start(options: &FleetOptions<'_>) -> anyhow::Result<Fleet> {
        let program = std::env::current_exe()?;
        let mut children = Vec::new();
        let mut logs = Vec::new();
        for index in 1..=options.replicas {
            let log = options.folder.join(format!("replica-{index}.log"));
            let file = std::fs::File::create(&log)?;
            let mut command = Command::new(&program);
            command.arg("run");
            if options.plain {
                for (name, _) in std::env::vars_os() {
                    if name.to_str().is_some_and(speaks_to_agentd) {
                        command.env_remove(name);
                    }
                }
                command
                    .env("DATABASE_URL", options.url)
                    .env("AGENTD__HTTP__LISTEN", "127.0.0.1:0")
                    .current_dir(options.folder);
            } else {
                command
                    .env("DATABASE_URL", options.url)
                    .env("AGENTD__WORKER__ID", format!("bench-{index}"))
                    .env("AGENTD__HTTP__LISTEN", "")
                    .env("AGENTD__LOGGING__FORMAT", "json")
                    .env("AGENTD__LOGGING__LEVEL", "warn")
                    .env(
                        "AGENTD__ARTIFACTS__DIR",
                        options.folder.join("artifacts").as_os_str(),
                    );
            }
            command
                .stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file);
            for (name, value) in &options.settings {
                command.env(name, value);
            }
            children.push(command.spawn()?);
            logs.push(log);
        }
        Ok(Fleet { children, logs })
    }

    /// The log file of each replica.
    pub fn logs(&self) -> &[PathBuf] {
        &self.logs
    }

    /// The replicas' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Fails when a replica has exited (it should run until stopped).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (child, log) in self.children.iter_mut().zip(&self.logs) {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "a bench replica exited with {status}; its log: {}",
                    log.display()
                );
            }
        }
        Ok(())
    }

    /// What each replica has cost so far.
    pub fn costs(&self) -> Vec<ProcessCost> {
        self.pids().into_iter().map(process_cost).collect()
    }

    /// SIGTERM to every replica, then waits (SIGKILL after `limit`).
    pub fn stop(mut self, limit: Duration) {
        for child in &self.children {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        for child in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU seconds and memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`
/// (zeros where they cannot be read).
pub fn process_cost(pid: u32) -> ProcessCost {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu_seconds = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may hold spaces) in parentheses.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |field: &str| -> f64 {
        status
            .lines()
            .find(|line| line.starts_with(field))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    ProcessCost {
        cpu_seconds,
        rss_mib: kib("VmRSS:") / 1024.0,
        peak_rss_mib: kib("VmHWM:") / 1024.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        // Burn a little CPU so the figure cannot be zero.
        let mut x = 0u64;
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let cost = process_cost(std::process::id());
        assert!(cost.cpu_seconds > 0.0, "{cost:?}");
        assert!(
            cost.rss_mib > 1.0 && cost.peak_rss_mib >= cost.rss_mib,
            "{cost:?}"
        );
    }
}
