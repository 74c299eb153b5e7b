//! The `command` executor: runs a configured program (an argument list, never a shell).
//!
//! The program gets the run as JSON on stdin (run id, agent, input; variable values only if
//! `executors.command.variables_in_input`), the agent's variables as environment variables
//! (except names that steer a loader, shell or interpreter: [`super::environment`]; and
//! nothing of agentd's own environment but PATH, LANG, LC_ALL and TZ, so the database URL
//! never reaches it), `HOME` and `TMPDIR` set to the run's own folders, and `AGENTD_RUN_ID`
//! and `AGENTD_ARTIFACTS_DIR`.
//! Each stdout line becomes an `info` log line, each stderr line a `warn` line; a stdout line
//! that is a JSON object with an `output` key sets the run's output; files written to
//! `$AGENTD_ARTIFACTS_DIR` become artifacts; exit status 0 means `completed`.
//!
//! The program runs in its own process group. When the run is stopped (timeout,
//! cancellation, shutdown) the runner drops this executor's future, and the guard sends
//! SIGTERM to the whole group, then SIGKILL after `kill_grace`; when the program exits on
//! its own, whatever it left running in its group is killed too, so no child outlives the
//! run; if agentd exits at once (a second signal), every process of the run is killed before
//! it does. Lines are read with a bounded buffer: a 10 MiB line costs 64 KiB of memory.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};

use super::environment::refusal;
use super::sandbox::{Killer, RunSpace, Sandbox};
use super::{
    ArtifactFile, BoxFuture, Executor, Level, LogSink, MAX_LINE_BYTES, Outcome, RunContext,
};
use crate::config::CommandExecutorSettings;

/// Environment variables of agentd passed on to programs; everything else stays behind
/// (`HOME` and `TMPDIR` are the run's own folders).
const PASSED_ENVIRONMENT: [&str; 4] = ["PATH", "LANG", "LC_ALL", "TZ"];

/// See the module documentation.
pub struct CommandExecutor {
    settings: CommandExecutorSettings,
    sandbox: Arc<Sandbox>,
}

impl CommandExecutor {
    /// An executor running `settings.program`, each run in a place of its own
    /// ([`Sandbox`]); fails when that place cannot be prepared.
    pub fn new(settings: CommandExecutorSettings) -> Result<CommandExecutor, String> {
        let sandbox = Sandbox::prepare(&settings)?;
        Ok(CommandExecutor {
            settings,
            sandbox: Arc::new(sandbox),
        })
    }

    /// What this replica cannot do to keep runs apart (not running as root).
    pub fn limitations(&self) -> Option<String> {
        self.sandbox.limitations()
    }
}

impl Executor for CommandExecutor {
    fn name(&self) -> &'static str {
        "command"
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.settings.timeout)
    }

    fn execute<'a>(&'a self, run: &'a RunContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            match self.run_program(run).await {
                Ok(outcome) => outcome,
                Err(error) => Outcome::Failed {
                    error,
                    output: None,
                },
            }
        })
    }
}

/// Ends the run's processes when dropped (run stopped, or finished), and with them its
/// place: after the program exited, everything it left behind is killed at once; when the
/// run is stopped early, its process group gets SIGTERM, then `kill_grace` later every
/// process of the run SIGKILL. The run's folder (and, as root, its user) goes last. Until
/// then, an exit of agentd at once kills them all first (`forced_exit`).
struct Guard {
    program: Pid,
    kill_grace: Duration,
    exited: bool,
    space: Option<RunSpace>,
    forced_exit: Option<crate::process::ForcedExitDuty>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(space) = self.space.take() else {
            return;
        };
        let program = self.program;
        let forced_exit = self.forced_exit.take();
        let grace = if self.exited {
            Duration::ZERO
        } else {
            let _ = killpg(program, Signal::SIGTERM);
            self.kill_grace
        };
        std::thread::spawn(move || {
            std::thread::sleep(grace);
            kill_run(program, &space.killer());
            drop(forced_exit);
            drop(space);
        });
    }
}

/// SIGKILL to every process of the run: the program's group, then what [`Killer`] finds.
fn kill_run(program: Pid, killer: &Killer) {
    let _ = killpg(program, Signal::SIGKILL);
    killer.kill(program.as_raw());
}

/// How long an exit of agentd at once waits for the killed program to be gone.
const FORCED_EXIT_GONE_WAIT: Duration = Duration::from_secs(1);

/// After the program exits, how long its output may take to drain; a descendant that
/// escaped and still holds the streams cannot keep the run open longer.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

impl CommandExecutor {
    async fn run_program(&self, run: &RunContext) -> Result<Outcome, String> {
        let program = &self.settings.program;
        let Some((binary, arguments)) = program.split_first() else {
            return Err("the command executor has no program configured".into());
        };
        // A place of its own per run (and per team member: members may run side by side).
        let sandbox = self.sandbox.clone();
        let run_id = run.run.run_id;
        let space = tokio::task::spawn_blocking(move || sandbox.enter(run_id))
            .await
            .map_err(|error| format!("could not prepare the run's place: {error}"))??;

        let mut command = std::process::Command::new(binary);
        command
            .args(arguments)
            .env_clear()
            .envs(
                PASSED_ENVIRONMENT
                    .iter()
                    .filter_map(|name| std::env::var_os(name).map(|value| (*name, value))),
            )
            .env("AGENTD_RUN_ID", run.run.run_id.to_string())
            .env("AGENTD_ARTIFACTS_DIR", &space.artifacts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        space.configure(&mut command);
        for variable in run
            .target
            .agent()
            .into_iter()
            .flat_map(|agent| agent.variables.iter())
        {
            match refusal(&variable.name, &self.settings.refused_env) {
                Some(why) => run.logs.log(Level::Warn, why).await,
                None => {
                    // PostgreSQL text cannot hold NUL, so a value never has one.
                    if let Some(value) = &variable.value {
                        command.env(&variable.name, value);
                    }
                }
            }
        }
        let mut child = crate::process::spawn(&mut command)
            .map_err(|error| format!("could not start {binary:?}: {error}"))?;
        let pid = Pid::from_raw(child.id() as i32);
        let artifacts_dir = space.artifacts.clone();
        let owner = space.owner();
        let killer = space.killer();
        let mut guard = Guard {
            program: pid,
            kill_grace: self.settings.kill_grace,
            exited: false,
            space: Some(space),
            forced_exit: Some(crate::process::at_forced_exit(move || {
                kill_run(pid, &killer);
                crate::process::wait_gone(&[pid.as_raw()], FORCED_EXIT_GONE_WAIT);
            })),
        };
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err("could not open the program's standard streams".into());
        };
        let stdin = tokio::process::ChildStdin::from_std(stdin).map_err(|e| e.to_string())?;
        let stdout = tokio::process::ChildStdout::from_std(stdout).map_err(|e| e.to_string())?;
        let stderr = tokio::process::ChildStderr::from_std(stderr).map_err(|e| e.to_string())?;

        let document = self.stdin_document(run);
        let feed = async move {
            let mut stdin = stdin;
            // A program that does not read its input is fine: ignore a broken pipe.
            let _ = stdin.write_all(document.to_string().as_bytes()).await;
            let _ = stdin.write_all(b"\n").await;
        };
        // The streams are read until they close, or until DRAIN_AFTER_EXIT after the
        // program exited.
        let exited = tokio_util::sync::CancellationToken::new();
        let drained = {
            let exited = exited.clone();
            async move {
                exited.cancelled().await;
                tokio::time::sleep(DRAIN_AFTER_EXIT).await;
            }
        };
        let drained = drained.shared();
        let out = pump(stdout, run.logs.clone(), Level::Info, true, drained.clone());
        let err = pump(stderr, run.logs.clone(), Level::Warn, false, drained);
        // Reap with wait4 on a blocking thread, for the child's own CPU time and peak memory;
        // once the program has exited, whatever it left is killed, so that descendants
        // holding its streams cannot keep the run open.
        let killer = guard.space.as_ref().map(RunSpace::killer);
        let waited = async {
            let waited = tokio::task::spawn_blocking(move || {
                let waited = wait_with_usage(pid);
                crate::process::forget(pid.as_raw() as u32);
                if let Some(killer) = killer {
                    killer.kill(pid.as_raw());
                }
                waited
            })
            .await;
            exited.cancel();
            waited
        };
        let ((), (output, _), (_, last_error), waited) = tokio::join!(feed, out, err, waited);
        drop(child);
        if crate::process::forced_exit_begun() {
            // Killed as agentd exits at once: nothing is recorded; the lease expires and a
            // reaper fails the run ("worker lost").
            std::future::pending::<()>().await;
        }
        let (status, cpu_ms, max_rss_kib) = waited
            .map_err(|error| format!("waiting for the program failed: {error}"))?
            .map_err(|error| format!("waiting for the program failed: {error}"))?;
        guard.exited = true;
        run.usage.record("cpu_ms", json!(cpu_ms));
        run.usage.record("max_rss_kib", json!(max_rss_kib));
        run.usage.record("exit_status", json!(status));

        self.collect_artifacts(&artifacts_dir, owner, run).await;
        drop(guard);
        if status == 0 {
            Ok(Outcome::Completed {
                output: output.unwrap_or_else(|| json!({ "exit_status": 0 })),
            })
        } else {
            let detail = last_error
                .map(|line| format!(": {line}"))
                .unwrap_or_default();
            Ok(Outcome::Failed {
                error: format!("the program exited with status {status}{detail}"),
                output,
            })
        }
    }

    fn stdin_document(&self, run: &RunContext) -> Value {
        let agent = run.target.agent().map(|agent| {
            let mut value = json!({
                "id": agent.id,
                "name": agent.name,
                "description": agent.description,
                "category": agent.category,
                "instructions": agent.instructions,
                "variables": agent.variables.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
            });
            if self.settings.variables_in_input {
                value["variable_values"] = agent
                    .variables
                    .iter()
                    .map(|v| (v.name.clone(), json!(v.value)))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
            value
        });
        json!({
            "run_id": run.run.run_id,
            "type": run.run.kind.as_str(),
            "target_id": run.run.target_id,
            "schedule_id": run.run.schedule_id,
            "input": run.run.input,
            "agent": agent,
            "conversation": run.conversation.as_ref().map(|c| c.id),
            "messages": run.conversation.as_ref().map(|c| &c.messages),
        })
    }

    /// Hands every file the program left in its artifacts folder to the store without
    /// reading it; the store decides by the size whether to read it at all.
    async fn collect_artifacts(&self, folder: &PathBuf, owner: Option<u32>, run: &RunContext) {
        let Ok(mut entries) = tokio::fs::read_dir(folder).await else {
            return;
        };
        let mut files = Vec::new();
        while let Ok(Some(entry)) = entries.next_entry().await {
            if !entry.file_type().await.is_ok_and(|kind| kind.is_dir()) {
                files.push(entry.path());
            }
        }
        files.sort();
        for path in files {
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().to_string())
                .unwrap_or_default();
            match ArtifactFile::open_regular(name.clone(), &path, owner) {
                Ok(artifact) => run.artifacts.save(artifact).await,
                Err(reason) => {
                    run.logs
                        .log(
                            Level::Warn,
                            format!("artifact {name:?} not stored: {reason}"),
                        )
                        .await
                }
            }
        }
    }
}

/// Forwards a stream's lines to the run's logs with a bounded buffer; for stdout, returns
/// the last `{"output": …}` object; for stderr, the last line (for the error message).
async fn pump(
    stream: impl AsyncRead + Unpin,
    logs: LogSink,
    level: Level,
    parse_output: bool,
    stop: impl std::future::Future<Output = ()>,
) -> (Option<Value>, Option<String>) {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut output = None;
    let mut last = None;
    tokio::pin!(stop);
    loop {
        let read = tokio::select! {
            read = read_bounded_line(&mut reader) => read,
            _ = &mut stop => break,
        };
        let (line, complete) = match read {
            Ok(Some(line)) => line,
            _ => break,
        };
        let mut text = String::from_utf8_lossy(&line).into_owned();
        if !complete {
            text.push_str(" … [line truncated]");
        }
        if parse_output
            && let Ok(Value::Object(object)) = serde_json::from_str::<Value>(&text)
            && let Some(value) = object.get("output")
        {
            output = Some(value.clone());
            continue;
        }
        last = Some(text.chars().take(500).collect::<String>());
        logs.log(level, text).await;
    }
    if parse_output {
        (output, None)
    } else {
        (None, last)
    }
}

/// Reads one line (without its newline), keeping at most [`MAX_LINE_BYTES`] bytes of it and
/// discarding the rest. `Ok(None)` at the end of the stream; the flag says whether the line
/// was kept whole.
async fn read_bounded_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    let mut line = Vec::new();
    let mut complete = true;
    let mut seen_any = false;
    loop {
        let buffer = reader.fill_buf().await?;
        if buffer.is_empty() {
            return Ok(seen_any.then_some((line, complete)));
        }
        seen_any = true;
        let (chunk, found_newline) = match buffer.iter().position(|byte| *byte == b'\n') {
            Some(index) => (&buffer[..index], true),
            None => (buffer, false),
        };
        // Room for the truncation marker within the stored line's limit.
        let room = (MAX_LINE_BYTES - 32).saturating_sub(line.len());
        if chunk.len() > room {
            complete = false;
        }
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let consumed = chunk.len() + usize::from(found_newline);
        reader.consume(consumed);
        if found_newline {
            return Ok(Some((line, complete)));
        }
    }
}

/// Waits for `pid` with wait4: exit status (128 + signal when killed), CPU time in ms and
/// peak resident memory in KiB.
fn wait_with_usage(pid: Pid) -> std::io::Result<(i32, u64, i64)> {
    let mut status: nix::libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 writes only into the two out-parameters, which live on this stack.
        let result = unsafe { nix::libc::wait4(pid.as_raw(), &mut status, 0, &mut usage) };
        if result == pid.as_raw() {
            break;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    let code = if nix::libc::WIFEXITED(status) {
        nix::libc::WEXITSTATUS(status)
    } else if nix::libc::WIFSIGNALED(status) {
        128 + nix::libc::WTERMSIG(status)
    } else {
        -1
    };
    let to_ms = |time: nix::libc::timeval| time.tv_sec as u64 * 1000 + time.tv_usec as u64 / 1000;
    Ok((
        code,
        to_ms(usage.ru_utime) + to_ms(usage.ru_stime),
        usage.ru_maxrss,
    ))
}
