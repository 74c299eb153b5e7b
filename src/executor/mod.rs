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

pub use crate::store::agents::{AgentDefinition, Variable};
pub use crate::store::runs::{ClaimedRun, RunKind};

/// The executors the settings ask for: `builtin` always, `command` when a program is
/// configured, chosen per agent category by `execution.default` and `execution.by_category`.
/// Fails when the command executor's runs cannot be given places of their own.
pub fn from_settings(settings: &crate::config::Settings) -> Result<Executors, String> {
    use crate::config::ExecutorKind;
    let builtin: Arc<dyn Executor> = Arc::new(
        builtin::BuiltinExecutor::new(settings.executors.builtin.step_delay)
            .with_noop_lines(settings.executors.builtin.noop_lines),
    );
    let command: Option<Arc<dyn Executor>> = if settings.executors.command.program.is_empty() {
        None
    } else {
        let command = command::CommandExecutor::new(settings.executors.command.clone())?;
        if let Some(limitations) = command.limitations() {
            tracing::warn!("{limitations}");
        }
        Some(Arc::new(command) as Arc<dyn Executor>)
    };
    let client = http::client(settings.executors.http);
    let openai: Option<Arc<dyn Executor>> = client.as_ref().ok().map(|client| {
        Arc::new(openai::OpenAiExecutor::new(
            settings.executors.openai.clone(),
            client.clone(),
        )) as Arc<dyn Executor>
    });
    let webhook: Option<Arc<dyn Executor>> = client.as_ref().ok().map(|client| {
        Arc::new(webhook::WebhookExecutor::new(
            settings.executors.webhook.clone(),
            client.clone(),
            settings.artifacts.max_bytes,
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
}

/// The executors of a replica and which one runs which agent: a default plus overrides by
/// agent category.
#[derive(Clone)]
pub struct Executors {
    default: Arc<dyn Executor>,
    by_category: HashMap<String, Arc<dyn Executor>>,
    /// Asks the model to route `route` teams, when configured.
    router: Option<Arc<openai::ModelRouter>>,
}

impl Executors {
    /// One executor for every run.
    pub fn single(executor: Arc<dyn Executor>) -> Executors {
        Executors {
            default: executor,
            by_category: HashMap::new(),
            router: None,
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

    /// The executor for an agent of `category` (team runs and unknown categories get the
    /// default).
    pub fn for_category(&self, category: Option<&str>) -> &Arc<dyn Executor> {
        category
            .and_then(|category| self.by_category.get(category))
            .unwrap_or(&self.default)
    }
}

/// What an executor knows about the run it executes.
pub struct RunContext {
    /// The run as claimed: id, target, owner, input, schedule.
    pub run: ClaimedRun,
    /// The agent of an agent run, with its variables.
    pub agent: Option<AgentDefinition>,
    /// Where the run's log lines go.
    pub logs: LogSink,
    /// Where the run's artifacts go.
    pub artifacts: ArtifactSink,
    /// The executor's own figures for `resource_usage` (CPU time, tokens, …).
    pub usage: Usage,
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

    /// Everything recorded.
    pub fn take(&self) -> serde_json::Map<String, Value> {
        self.figures
            .lock()
            .map(|mut figures| std::mem::take(&mut *figures))
            .unwrap_or_default()
    }
}

/// A file a run produced, on its way to the runner's artifact store, which checks its size
/// against the limits before reading any of it.
#[derive(Debug)]
pub struct ArtifactFile {
    /// The name the run gave it (the store makes it safe for a path).
    pub name: String,
    /// MIME type; `None`: guessed from the name.
    pub content_type: Option<String>,
    /// Its bytes, or the file holding them.
    pub content: ArtifactContent,
}

/// What an artifact holds: bytes already in memory, or a file nobody has read yet, so that a
/// program's huge file costs no memory before the store refuses it.
#[derive(Debug)]
pub enum ArtifactContent {
    /// Bytes an executor made or received (builtin, webhook).
    Bytes(Vec<u8>),
    /// An open regular file (command) and its size when it was opened; the store reads at
    /// most one byte more than `size`, so a file that keeps growing is noticed, not copied.
    File { file: tokio::fs::File, size: u64 },
}

impl ArtifactFile {
    /// An artifact of bytes in memory.
    pub fn bytes(
        name: impl Into<String>,
        content_type: Option<String>,
        data: Vec<u8>,
    ) -> ArtifactFile {
        ArtifactFile {
            name: name.into(),
            content_type,
            content: ArtifactContent::Bytes(data),
        }
    }

    /// The regular file at `path` as an artifact named `name`, opened without reading it: a
    /// symbolic link is not followed (`O_NOFOLLOW`), a FIFO or device is refused without
    /// waiting on it (`O_NONBLOCK`, then fstat of what was opened). The error says why.
    pub fn open_regular(
        name: String,
        path: &std::path::Path,
        owner: Option<u32>,
    ) -> Result<ArtifactFile, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(|error| match error.raw_os_error() {
                Some(nix::libc::ELOOP) => "a symbolic link, which is not followed".to_string(),
                _ => format!("cannot open it: {error}"),
            })?;
        let metadata = file
            .metadata()
            .map_err(|error| format!("cannot inspect it: {error}"))?;
        if !metadata.is_file() {
            return Err("not a regular file".into());
        }
        if let Some(owner) = owner {
            use std::os::unix::fs::MetadataExt;
            if metadata.uid() != owner {
                return Err(format!(
                    "owned by uid {}, not by the run's user (a link to someone else's file)",
                    metadata.uid()
                ));
            }
        }
        Ok(ArtifactFile {
            name,
            content_type: None,
            content: ArtifactContent::File {
                file: tokio::fs::File::from_std(file),
                size: metadata.len(),
            },
        })
    }

    /// The artifact's size in bytes (a file's when it was opened).
    pub fn size(&self) -> u64 {
        match &self.content {
            ArtifactContent::Bytes(data) => data.len() as u64,
            ArtifactContent::File { size, .. } => *size,
        }
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
            message: crate::runner::logs::cut_line(message.into()),
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
