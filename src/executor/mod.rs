//! Executors turn a run (its target, input and context) into log lines and an outcome.
//!
//! The runner gives an executor a [`RunContext`] and awaits [`Executor::execute`]. The
//! runner owns everything around it: the lease, cancellation (it drops the future when the
//! run is cancelled, the worker shuts down or the lease is lost), writing the logs and the
//! outcome. So an executor never touches the database and never needs to check for
//! cancellation itself, though one that holds outside resources (a child process, a
//! connection) must release them when dropped.

pub mod builtin;
pub mod command;
pub mod environment;
pub mod http;
pub mod openai;
pub mod redact;
pub mod sandbox;
pub mod team;
pub mod tokens;
pub mod webhook;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::mpsc;
use uuid::Uuid;

pub use crate::artifact_store::{ArtifactContent, ArtifactFile};
pub use crate::domain::{AgentDefinition, ClaimedRun, Conversation, RunKind, Target, Variable};

/// The executors the settings ask for: `builtin` always, `command` when a program is
/// configured, chosen per agent category by `execution.default` and `execution.by_category`.
/// Fails, with one line naming the setting, when the command executor's runs cannot be
/// given places of their own (as root: capabilities missing, `uid_range` outside the user
/// namespace; a `runs_dir` that is not private).
pub fn from_settings(settings: &crate::config::Settings) -> Result<Executors, String> {
    use crate::config::ExecutorKind;
    let limits = &settings.executors;
    let builtin: Arc<dyn Executor> = Arc::new(Limited::new(
        Arc::new(
            builtin::BuiltinExecutor::new(limits.builtin.step_delay)
                .with_noop_lines(limits.builtin.noop_lines),
        ),
        limits.builtin.concurrency,
    ));
    let command: Option<Arc<dyn Executor>> = if settings.executors.command.program.is_empty() {
        None
    } else {
        let command = command::CommandExecutor::new(settings.executors.command.clone())?;
        if let Some(limitations) = command.limitations() {
            tracing::warn!("{limitations}");
        }
        Some(
            Arc::new(Limited::new(Arc::new(command), limits.command.concurrency))
                as Arc<dyn Executor>,
        )
    };
    let client = http::client(settings.executors.http);
    let openai: Option<Arc<dyn Executor>> = client.as_ref().ok().map(|client| {
        Arc::new(Limited::new(
            Arc::new(openai::OpenAiExecutor::new(
                settings.executors.openai.clone(),
                client.clone(),
            )),
            limits.openai.concurrency,
        )) as Arc<dyn Executor>
    });
    let webhook: Option<Arc<dyn Executor>> = client.as_ref().ok().map(|client| {
        Arc::new(Limited::new(
            Arc::new(webhook::WebhookExecutor::new(
                settings.executors.webhook.clone(),
                client.clone(),
                settings.artifacts.max_bytes,
            )),
            limits.webhook.concurrency,
        )) as Arc<dyn Executor>
    });
    if let Err(error) = &client {
        tracing::error!(error = %error, "the openai and webhook executors are unavailable; their agents run with builtin");
    }
    // Settings validation guarantees what each chosen executor needs.
    let pick = |kind: ExecutorKind| match kind {
        ExecutorKind::Builtin => builtin.clone(),
        ExecutorKind::Command => command.clone().unwrap_or_else(|| builtin.clone()),
        ExecutorKind::OpenAi => openai.clone().unwrap_or_else(|| builtin.clone()),
        ExecutorKind::Webhook => webhook.clone().unwrap_or_else(|| builtin.clone()),
    };
    let executors = Executors::new(
        pick(settings.executor.default),
        settings
            .executor
            .by_category
            .iter()
            .map(|(category, kind)| (category.clone(), pick(*kind)))
            .collect(),
    );
    Ok(match (&client, settings.executor.route_with_model) {
        (Ok(client), true) => executors.with_router(Arc::new(openai::ModelRouter::new(
            settings.executors.openai.clone(),
            client.clone(),
        ))),
        _ => executors,
    })
}

/// A boxed future, so executors can be trait objects chosen by configuration.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that can execute runs.
pub trait Executor: Send + Sync + 'static {
    /// The executor's name in logs and configuration (`builtin`, `command`, …).
    fn name(&self) -> &'static str;

    /// Executes one run to its outcome.
    fn execute<'a>(&'a self, run: &'a RunContext) -> BoxFuture<'a, Outcome>;

    /// This executor's own limit on a run's duration, when it has one; otherwise
    /// `execution.timeout` applies.
    fn timeout(&self) -> Option<Duration> {
        None
    }

    /// Most runs this executor executes at once, when it is limited ([`Limited`]).
    fn limit(&self) -> Option<usize> {
        None
    }
}

/// An executor that executes at most `limit` runs at once (`executors.<name>.concurrency`);
/// a run beyond waits for room, holding its slot and lease (its timeout runs meanwhile).
/// Team members go through the same limit as runs of their own.
pub struct Limited {
    inner: Arc<dyn Executor>,
    limit: usize,
    room: tokio::sync::Semaphore,
}

impl Limited {
    /// `inner`, at most `limit` runs (at least 1) at once.
    pub fn new(inner: Arc<dyn Executor>, limit: usize) -> Limited {
        let limit = limit.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Limited {
            inner,
            limit,
            room: tokio::sync::Semaphore::new(limit),
        }
    }
}

impl Executor for Limited {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn execute<'a>(&'a self, run: &'a RunContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            // The semaphore is never closed, so acquiring only waits.
            let Ok(_room) = self.room.acquire().await else {
                return Outcome::Failed {
                    error: format!("the {} executor is closed", self.inner.name()),
                    output: None,
                };
            };
            self.inner.execute(run).await
        })
    }

    fn timeout(&self) -> Option<Duration> {
        self.inner.timeout()
    }

    fn limit(&self) -> Option<usize> {
        Some(self.limit)
    }
}

/// The executors of a replica and which one runs which target: a default plus overrides by
/// agent category for agents, and the team executor for teams.
#[derive(Clone)]
pub struct Executors {
    default: Arc<dyn Executor>,
    by_category: HashMap<String, Arc<dyn Executor>>,
    /// Asks the model to route `route` teams, when configured.
    router: Option<Arc<openai::ModelRouter>>,
    /// Runs team runs, its members with the executors above ([`Executors::with_teams`]).
    team: Option<Arc<dyn Executor>>,
}

impl Executors {
    /// One executor for every run.
    pub fn single(executor: Arc<dyn Executor>) -> Executors {
        Executors {
            default: executor,
            by_category: HashMap::new(),
            router: None,
            team: None,
        }
    }

    /// A default and per-category overrides.
    pub fn new(
        default: Arc<dyn Executor>,
        by_category: HashMap<String, Arc<dyn Executor>>,
    ) -> Executors {
        Executors {
            default,
            by_category,
            router: None,
            team: None,
        }
    }

    /// The same executors, routing `route` teams with `router`.
    pub fn with_router(mut self, router: Arc<openai::ModelRouter>) -> Executors {
        self.router = Some(router);
        self
    }

    /// The model router, if teams are routed by the model.
    pub fn router(&self) -> Option<&Arc<openai::ModelRouter>> {
        self.router.as_ref()
    }

    /// The same executors, running teams too: members of a `collaborate` team run at most
    /// `concurrency` at once, each under its executor's timeout or `run_timeout`.
    pub fn with_teams(mut self, concurrency: usize, run_timeout: Duration) -> Executors {
        let members = Executors {
            team: None,
            ..self.clone()
        };
        self.team = Some(Arc::new(team::TeamExecutor::new(
            members,
            concurrency,
            run_timeout,
        )));
        self
    }

    /// Most agent runs these executors execute at once: the sum of the limits of the
    /// executors agents may go to (each counted once); `None` when one has no limit.
    pub fn capacity(&self) -> Option<usize> {
        let mut counted: Vec<*const ()> = Vec::new();
        let mut total = 0usize;
        for executor in std::iter::once(&self.default).chain(self.by_category.values()) {
            let key = Arc::as_ptr(executor) as *const ();
            if !counted.contains(&key) {
                counted.push(key);
                total = total.saturating_add(executor.limit()?);
            }
        }
        Some(total)
    }

    /// The executor for an agent of `category` (unknown categories get the default).
    pub fn for_category(&self, category: Option<&str>) -> &Arc<dyn Executor> {
        category
            .and_then(|category| self.by_category.get(category))
            .unwrap_or(&self.default)
    }

    /// The executor of a run's target: the agent's by its category, or the team executor.
    pub fn for_target(&self, target: &Target) -> Arc<dyn Executor> {
        match target {
            Target::Agent(agent) => self.for_category(Some(&agent.category)).clone(),
            Target::Team(_) => self
                .team
                .clone()
                .unwrap_or_else(|| Arc::new(NoTeams) as Arc<dyn Executor>),
        }
    }
}

/// Stands in for the team executor where none was set up: fails the run, saying so.
struct NoTeams;

impl Executor for NoTeams {
    fn name(&self) -> &'static str {
        "team"
    }

    fn execute<'a>(&'a self, _run: &'a RunContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async {
            Outcome::Failed {
                error: "this worker was built without a team executor".into(),
                output: None,
            }
        })
    }
}

/// What an executor knows about the run it executes.
pub struct RunContext {
    /// The run as claimed: id, target, owner, input, schedule.
    pub run: ClaimedRun,
    /// What the run executes: the agent with its variables, or the team with its members.
    pub target: Target,
    /// Where the run's log lines go.
    pub logs: LogSink,
    /// Where the run's artifacts go.
    pub artifacts: ArtifactSink,
    /// The executor's own figures for `resource_usage` (CPU time, tokens, …).
    pub usage: Usage,
    /// The conversation when the run is a turn: its history, cut to the budget, newest last.
    pub conversation: Option<Conversation>,
    /// Where a streaming executor sends the reply's text as it arrives (a turn's reply is
    /// written from it; outside a turn it is only kept). An executor that sends nothing
    /// answers with its output ([`crate::conversation::reply_text`]).
    pub reply: ReplySink,
}

impl RunContext {
    /// What `{{input}}` stands for: the newest user message of a turn, otherwise the run's
    /// input as text.
    pub fn input_text(&self) -> String {
        match &self.conversation {
            Some(conversation) => conversation.last_user_text().to_string(),
            None => builtin::input_text(self.run.input.as_ref()),
        }
    }
}

/// The text of a turn's reply as it streams in: appended by the executor, read by the
/// runner's reply writer. Bounded by [`crate::conversation::MAX_REPLY_BYTES`]; more is
/// dropped (the executor's own limit, such as `executors.openai.max_reply_bytes`, is
/// lower).
#[derive(Clone, Default)]
pub struct ReplySink {
    inner: Arc<ReplyInner>,
}

#[derive(Default)]
struct ReplyInner {
    text: std::sync::Mutex<String>,
    /// Woken on every append.
    changed: tokio::sync::Notify,
    /// Any text was sent.
    sent: std::sync::atomic::AtomicBool,
}

impl ReplySink {
    /// Appends streamed text.
    pub fn push(&self, text: &str) {
        if text.is_empty() {
            return;
        }
        {
            let mut reply = self
                .inner
                .text
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let room = crate::conversation::MAX_REPLY_BYTES.saturating_sub(reply.len());
            let mut end = text.len().min(room);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            reply.push_str(&text[..end]);
        }
        self.inner
            .sent
            .store(true, std::sync::atomic::Ordering::Release);
        self.inner.changed.notify_one();
    }

    /// The text so far, or `None` when nothing was sent.
    pub fn text(&self) -> Option<String> {
        self.inner
            .sent
            .load(std::sync::atomic::Ordering::Acquire)
            .then(|| {
                self.inner
                    .text
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone()
            })
    }

    /// Bytes of text so far.
    pub fn len(&self) -> usize {
        self.inner
            .text
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// No text yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes the waiter of [`ReplySink::changed`] as an append would.
    pub fn wake(&self) {
        self.inner.changed.notify_one();
    }

    /// Waits for the next append.
    pub async fn changed(&self) {
        self.inner.changed.notified().await;
    }
}

/// Figures an executor reports for `runs.resource_usage`.
#[derive(Clone, Default)]
pub struct Usage {
    figures: Arc<std::sync::Mutex<serde_json::Map<String, Value>>>,
}

impl Usage {
    /// Records one figure (a later value of the same name replaces the earlier one).
    pub fn record(&self, name: &str, value: Value) {
        if let Ok(mut figures) = self.figures.lock() {
            figures.insert(name.to_string(), value);
        }
    }

    /// Adds a team member's figures to these: numbers add up (CPU time, tokens), those
    /// named `max_*` keep the larger, and anything else (an exit status) is left out.
    pub fn add(&self, member: &Usage) {
        let member = member.take();
        let Ok(mut figures) = self.figures.lock() else {
            return;
        };
        for (name, value) in member {
            let Some(number) = value.as_f64() else {
                continue;
            };
            if name == "exit_status" {
                continue;
            }
            let current = figures.get(&name).and_then(Value::as_f64);
            let combined = match current {
                None => number,
                Some(current) if name.starts_with("max_") => current.max(number),
                Some(current) => current + number,
            };
            let value = if combined.fract() == 0.0 && combined.abs() < 9.0e15 {
                Value::from(combined as i64)
            } else {
                Value::from(combined)
            };
            figures.insert(name, value);
        }
    }

    /// Whether a figure of this name was recorded.
    pub fn contains(&self, name: &str) -> bool {
        self.figures
            .lock()
            .is_ok_and(|figures| figures.contains_key(name))
    }

    /// Everything recorded.
    pub fn take(&self) -> serde_json::Map<String, Value> {
        self.figures
            .lock()
            .map(|mut figures| std::mem::take(&mut *figures))
            .unwrap_or_default()
    }
}

/// The sending end of a run's artifacts; the runner stores them (within limits).
#[derive(Clone)]
pub struct ArtifactSink {
    sender: mpsc::Sender<ArtifactFile>,
}

impl ArtifactSink {
    /// A sink and the receiving end the runner drains.
    pub fn channel(capacity: usize) -> (ArtifactSink, mpsc::Receiver<ArtifactFile>) {
        let (sender, receiver) = mpsc::channel(capacity);
        (ArtifactSink { sender }, receiver)
    }

    /// Hands over one artifact.
    pub async fn save(&self, artifact: ArtifactFile) {
        let _ = self.sender.send(artifact).await;
    }
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The run did what it was asked; `output` becomes `runs.output`.
    Completed { output: Value },
    /// It did not; `error` is one readable sentence (plus detail) for `runs.error`.
    Failed {
        error: String,
        output: Option<Value>,
    },
}

/// Severity of a run's log line (`run_logs.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    /// The value stored in `run_logs.level`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// Longest line stored, in bytes; longer ones are cut and marked.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// `message` cut, on a character boundary, to at most [`MAX_LINE_BYTES`] bytes including a
/// marker that says how long it was, and its memory given back; a shorter one unchanged (so
/// cutting twice changes nothing). The log sink cuts each line before it is queued, so lines
/// waiting to be written cost at most this much.
pub fn cut_line(mut message: String) -> String {
    if message.len() > MAX_LINE_BYTES {
        let original = message.len();
        let widest_marker = format!(" … [line truncated: {original} bytes, {MAX_LINE_BYTES} kept]");
        let kept = message.floor_char_boundary(MAX_LINE_BYTES - widest_marker.len());
        message.truncate(kept);
        message.push_str(&format!(
            " … [line truncated: {original} bytes, {kept} kept]"
        ));
        message.shrink_to_fit();
    }
    message
}

/// One line a run emitted, stamped when it was emitted.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// UUIDv7: with `timestamp`, orders lines exactly as emitted.
    pub id: Uuid,
    pub level: Level,
    pub message: String,
    pub timestamp: DateTime<Utc>,
}

/// The sending end of a run's log pipe. Cheap to clone; sending waits when the pipe's
/// bounded buffer is full, so a chatty run slows down instead of using unbounded memory.
#[derive(Clone)]
pub struct LogSink {
    sender: mpsc::Sender<LogEntry>,
}

impl LogSink {
    /// A sink and the receiving end the runner drains. `capacity` bounds the lines in
    /// flight between the run and the writer.
    pub fn channel(capacity: usize) -> (LogSink, mpsc::Receiver<LogEntry>) {
        let (sender, receiver) = mpsc::channel(capacity);
        (LogSink { sender }, receiver)
    }

    /// Emits one line, cut to the longest line stored (so lines waiting in the pipe cost
    /// little however long a tenant's were). Lines sent after the run stopped are dropped
    /// silently: nobody can store them any more.
    pub async fn log(&self, level: Level, message: impl Into<String>) {
        let entry = LogEntry {
            id: Uuid::now_v7(),
            level,
            message: cut_line(message.into()),
            timestamp: Utc::now(),
        };
        let _ = self.sender.send(entry).await;
    }

    /// Shorthand for an `info` line.
    pub async fn info(&self, message: impl Into<String>) {
        self.log(Level::Info, message).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_members_figures_add_up_in_the_teams() {
        let team = Usage::default();
        for (cpu, rss, tokens) in [(10, 500, 3), (5, 900, 4)] {
            let member = Usage::default();
            member.record("cpu_ms", serde_json::json!(cpu));
            member.record("max_rss_kib", serde_json::json!(rss));
            member.record("total_tokens", serde_json::json!(tokens));
            member.record("exit_status", serde_json::json!(0));
            member.record("model", serde_json::json!("m"));
            team.add(&member);
        }
        let figures = team.take();
        assert_eq!(figures["cpu_ms"], 15);
        assert_eq!(figures["max_rss_kib"], 900);
        assert_eq!(figures["total_tokens"], 7);
        assert!(!figures.contains_key("exit_status") && !figures.contains_key("model"));
    }

    #[test]
    fn only_regular_files_are_opened_as_artifacts_and_none_is_read() {
        let folder = tempfile::tempdir().unwrap();
        let big = folder.path().join("big.bin");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(3 << 30)
            .unwrap();
        let artifact = ArtifactFile::open_regular("big.bin".into(), &big, None).unwrap();
        assert_eq!(artifact.size(), 3 << 30);
        assert_eq!(artifact.name, "big.bin");

        let link = folder.path().join("link");
        std::os::unix::fs::symlink(&big, &link).unwrap();
        assert_eq!(
            ArtifactFile::open_regular("link".into(), &link, None).unwrap_err(),
            "a symbolic link, which is not followed"
        );
        // A FIFO with no writer: refused at once instead of waiting for one.
        let fifo = folder.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(
            ArtifactFile::open_regular("fifo".into(), &fifo, None).unwrap_err(),
            "not a regular file"
        );
        let missing = ArtifactFile::open_regular("gone".into(), &folder.path().join("gone"), None);
        assert!(missing.unwrap_err().starts_with("cannot open it: "));
        assert_eq!(ArtifactFile::bytes("a", None, vec![1, 2, 3]).size(), 3);
    }
}
