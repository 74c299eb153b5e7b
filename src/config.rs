//! Typed settings, layered and validated once at start-up.
//!
//! Layers, later ones win: `config/default.toml` (compiled in, so it always lists every
//! key), the file named by `--config`/`AGENTD_CONFIG`, environment variables
//! `AGENTD__SECTION__KEY`, and `DATABASE_URL` for the database URL. The `config` crate
//! merges them, every value keeping its origin (`layers` reads each one), and deserializes
//! the result into the sections below: each is a serde struct that refuses unknown keys, and
//! each field's type (or its `deserialize_with` function in `value`) parses the value once,
//! so code past [`Settings::load`] only sees valid settings. A bad value is reported as one
//! line that names the key, the value and where it came from (`report`).
//!
//! Three sections were renamed (`[log]` → `[logging]`, `[logs]` → `[run_logs]`,
//! `[executor]` → `[execution]`); the old names still work, each use adding one warning to
//! [`Settings::deprecations`].

mod layers;
mod report;
mod value;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use value::{
    DatabaseUrl, EnvPattern, ExecutorKind, HttpUrl, LogFormat, MisfirePolicy, Multitask,
    NotifyMode, OverlapPolicy, Pooler, UidRange, is_env_name, parse_duration, redact_url,
};

/// The defaults, compiled in so that the binary needs no file to start.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Why the settings could not be loaded. Display is one line meant for an operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A configuration file could not be read.
    #[error("config: cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// A configuration file is not valid TOML.
    #[error("config: {path} is not valid TOML: {reason}")]
    Syntax { path: String, reason: String },
    /// A key that agentd does not know (probably a typo).
    #[error("config: unknown key {key} (from {origin})")]
    UnknownKey { key: String, origin: Source },
    /// A known key with a value that cannot be used.
    #[error("config: {key} = {value} (from {origin}): {reason}")]
    Invalid {
        key: String,
        value: String,
        origin: Source,
        reason: String,
    },
    /// A key the settings need and config/default.toml lacks (a fault of the build).
    #[error("config: {key} is missing from config/default.toml")]
    Missing { key: String },
    /// The layers could not be merged or read as settings at all, with no key to blame.
    #[error("config: {reason}")]
    Unusable { reason: String },
}

/// Where a setting's value came from, so an error can say which layer to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `config/default.toml`.
    Default,
    /// A configuration file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl Source {
    /// How a value merged by `config` remembers this source (its "origin").
    fn tag(&self) -> String {
        match self {
            Source::Default => "default:".into(),
            Source::File(path) => format!("file:{}", path.display()),
            Source::Env(name) => format!("env:{name}"),
        }
    }

    /// The source a [`Source::tag`] stands for.
    fn from_tag(tag: &str) -> Source {
        if let Some(path) = tag.strip_prefix("file:") {
            Source::File(PathBuf::from(path))
        } else if let Some(name) = tag.strip_prefix("env:") {
            Source::Env(name.to_string())
        } else {
            Source::Default
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "built-in defaults"),
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

/// All of agentd's settings, one field per section of config/default.toml. Built by
/// [`Settings::load`], which also fills in what comes from elsewhere (secrets read from the
/// variables that `*_env` settings name, and the fields marked `skip`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub embedded: EmbeddedSettings,
    /// `[logging]`: agentd's own log lines.
    #[serde(rename = "logging")]
    pub log: LogSettings,
    pub worker: WorkerSettings,
    pub scheduler: SchedulerSettings,
    pub requests: RequestSettings,
    pub conversations: ConversationSettings,
    pub lease: LeaseSettings,
    pub shutdown: ShutdownSettings,
    /// `[execution]`: which executor runs an agent, the run timeout, the team router.
    #[serde(rename = "execution")]
    pub executor: ExecutorChoice,
    pub executors: ExecutorSettings,
    /// `[run_logs]`: limits on the runs' log lines.
    #[serde(rename = "run_logs")]
    pub logs: LogLimitSettings,
    pub artifacts: ArtifactSettings,
    pub http: HttpSettings,
    pub retention: RetentionSettings,
    /// Environment variables whose values these settings hold and that are secrets
    /// (`DATABASE_URL`, the API key, the webhook secret, the endpoints' token, AWS
    /// credentials): `agentd run` wipes them from its own environment at start-up.
    #[serde(skip)]
    pub secret_variables: Vec<String>,
    /// One line per old setting name in use (a section renamed since), naming the old and
    /// the new name: logged as warnings once logging is set up.
    #[serde(skip)]
    pub deprecations: Vec<String>,
}

/// The operations endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// `None`: no HTTP server.
    #[serde(deserialize_with = "value::listen")]
    pub listen: Option<std::net::SocketAddr>,
    /// The name of the environment variable holding the token (empty: no token).
    #[serde(deserialize_with = "value::env_name_or_empty")]
    pub token_env: String,
    /// The token `/readyz` and `/metrics` require, read from the environment variable
    /// `token_env` names; `None`: they are open.
    #[serde(skip)]
    pub token: Option<BearerToken>,
}

/// A bearer token that callers must present, parsed from a secret: visible ASCII without
/// spaces (what fits an `Authorization` header). Kept with its SHA-256 digest so that a
/// presented token is compared in constant time whatever its length, and never printed.
#[derive(Clone)]
pub struct BearerToken {
    value: String,
    digest: [u8; 32],
}

impl BearerToken {
    /// The token in `text` (surrounding whitespace, such as a file's final newline, is
    /// not part of it); the error says what is wrong without repeating the text.
    pub fn parse(text: &str) -> Result<BearerToken, &'static str> {
        use sha2::Digest;
        let value = text.trim();
        if value.is_empty() {
            return Err("is empty");
        }
        if !value.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(
                "holds characters a bearer token cannot have (expected visible ASCII without spaces)",
            );
        }
        Ok(BearerToken {
            value: value.to_string(),
            digest: sha2::Sha256::digest(value.as_bytes()).into(),
        })
    }

    /// Whether `presented` is this token, in time that does not depend on where they
    /// differ.
    pub fn matches(&self, presented: &str) -> bool {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let presented: [u8; 32] = sha2::Sha256::digest(presented.as_bytes()).into();
        presented.ct_eq(&self.digest).into()
    }

    /// The token itself, for a client that sends it (`agentd healthcheck`).
    pub fn expose(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(***)")
    }
}

/// How long run history is kept (`None`: forever).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    #[serde(deserialize_with = "value::optional_duration")]
    pub run_logs: Option<Duration>,
    #[serde(deserialize_with = "value::optional_duration")]
    pub artifacts: Option<Duration>,
    #[serde(deserialize_with = "value::optional_duration")]
    pub runs: Option<Duration>,
    #[serde(deserialize_with = "value::positive_duration")]
    pub interval: Duration,
    #[serde(deserialize_with = "value::whole::<_, _, 1, 100_000>")]
    pub batch_size: u32,
}

impl RetentionSettings {
    /// Whether anything is ever deleted.
    pub fn enabled(&self) -> bool {
        self.run_logs.is_some() || self.artifacts.is_some() || self.runs.is_some()
    }
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `None`: run the embedded server.
    #[serde(deserialize_with = "value::empty_or")]
    pub url: Option<DatabaseUrl>,
    /// The one connection that LISTENs, for when `url` goes through a transaction-mode
    /// pooler (which cannot LISTEN); `None`: the same server and database as `url`.
    #[serde(deserialize_with = "value::empty_or")]
    pub listen_url: Option<DatabaseUrl>,
    /// How the worker learns of new work between its looks: LISTEN, or polling only.
    pub notify: NotifyMode,
    #[serde(deserialize_with = "value::flag")]
    pub migrate: bool,
    #[serde(deserialize_with = "value::whole::<_, _, 1, 10_000>")]
    pub max_connections: u32,
    #[serde(deserialize_with = "value::positive_duration")]
    pub connect_timeout: Duration,
    #[serde(deserialize_with = "value::positive_duration")]
    pub max_backoff: Duration,
    /// What stands between agentd and the server: `auto`, `none` or `transaction`.
    pub pooler: Pooler,
}

/// The private PostgreSQL run when no database URL is configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedSettings {
    #[serde(deserialize_with = "value::folder")]
    pub data_dir: PathBuf,
    #[serde(deserialize_with = "value::optional_folder")]
    pub bin_dir: Option<PathBuf>,
    #[serde(deserialize_with = "value::positive_duration")]
    pub start_timeout: Duration,
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// A tracing filter directive (`info`, `debug,sqlx=warn`, …), already validated.
    #[serde(deserialize_with = "value::log_filter")]
    pub level: String,
    pub format: LogFormat,
}

/// This replica's identity and capacity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Never empty: defaults to host name and process id.
    #[serde(deserialize_with = "value::worker_id")]
    pub id: String,
    /// Most runs this replica holds at once, whatever their executor (each executor also
    /// has a limit of its own: `executors.<name>.concurrency`).
    #[serde(deserialize_with = "value::whole::<_, _, 1, 100_000>")]
    pub max_runs: usize,
    /// The single limit of earlier versions; 0: not set. When set, it is `max_runs` and
    /// every executor's limit, as before (see [`Settings::load`]).
    #[serde(deserialize_with = "value::whole::<_, _, 0, 100_000>")]
    pub concurrency: usize,
}

/// The claim loop.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    #[serde(deserialize_with = "value::positive_duration")]
    pub poll_interval: Duration,
    #[serde(deserialize_with = "value::whole::<_, _, 1, 10_000>")]
    pub batch_size: usize,
    #[serde(deserialize_with = "value::duration")]
    pub misfire_grace: Duration,
    /// How far ahead of their instant schedules are claimed (0 to [`MAX_FIRE_AHEAD`]).
    #[serde(deserialize_with = "value::duration")]
    pub fire_ahead: Duration,
    pub misfire_policy: MisfirePolicy,
    pub overlap_policy: OverlapPolicy,
}

/// Limits on what users may ask for (`[requests]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSettings {
    /// Most runs one user may have queued; `request_run` refuses more.
    #[serde(deserialize_with = "value::whole::<_, _, 1, 1_000_000>")]
    pub max_pending_per_user: u32,
}

/// How agentd answers chat messages (`[conversations]`, docs/conversations.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationSettings {
    /// Answer user messages at all (a replica with `false` claims no turns).
    #[serde(deserialize_with = "value::flag")]
    pub enabled: bool,
    /// A user message arriving while its conversation's turn runs.
    pub multitask: Multitask,
    /// A turn starts once no user message arrived for this long…
    #[serde(deserialize_with = "value::duration")]
    pub debounce: Duration,
    /// …and at the latest this long after the first unanswered one.
    #[serde(deserialize_with = "value::duration")]
    pub debounce_max: Duration,
    /// Most messages of the history handed to the executor.
    #[serde(deserialize_with = "value::whole::<_, _, 1, 10_000>")]
    pub history_messages: usize,
    /// Most bytes of message text in that history.
    #[serde(deserialize_with = "value::whole::<_, _, 1024, 16_777_216>")]
    pub history_bytes: usize,
    /// Most user messages one turn covers; later ones wait for the next turn.
    #[serde(deserialize_with = "value::whole::<_, _, 1, 10_000>")]
    pub max_turn_messages: usize,
    /// The reply row is written at most once per this interval while text streams in.
    #[serde(deserialize_with = "value::positive_duration")]
    pub stream_interval: Duration,
}

/// Run leases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSettings {
    #[serde(deserialize_with = "value::lease_ttl")]
    pub ttl: Duration,
}

impl LeaseSettings {
    /// How often the owner renews its leases: a third of the TTL, so two renewals may fail
    /// before the lease is lost.
    pub fn renew_interval(&self) -> Duration {
        self.ttl / 3
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    #[serde(deserialize_with = "value::duration")]
    pub grace: Duration,
}

/// The OpenAI-compatible executor.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiExecutorSettings {
    pub base_url: HttpUrl,
    pub model: String,
    pub model_by_category: HashMap<String, String>,
    /// The name of the environment variable holding the API key.
    #[serde(deserialize_with = "value::env_name_or_empty")]
    pub api_key_env: String,
    /// The API key, read from the environment variable `api_key_env` names.
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Most bytes of streamed reply text kept; past it the run fails (a hostile endpoint
    /// could stream forever).
    #[serde(deserialize_with = "value::whole::<_, _, 1, 4_294_967_295>")]
    pub max_reply_bytes: usize,
    /// Most runs executing with this executor at once.
    #[serde(deserialize_with = "value::whole::<_, _, 1, 100_000>")]
    pub concurrency: usize,
}

impl fmt::Debug for OpenAiExecutorSettings {
    // The API key is a secret: its variable's name only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiExecutorSettings")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("model_by_category", &self.model_by_category)
            .field("api_key_env", &self.api_key_env)
            .field("max_reply_bytes", &self.max_reply_bytes)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// The webhook executor.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookExecutorSettings {
    /// An http(s) URL; empty when not configured.
    #[serde(deserialize_with = "value::http_url_or_empty")]
    pub url: String,
    /// The signing secret, read from the environment variable `secret_env` names.
    #[serde(skip)]
    pub secret: Option<String>,
    #[serde(deserialize_with = "value::env_name_or_empty")]
    pub secret_env: String,
    /// Most runs executing with this executor at once.
    #[serde(deserialize_with = "value::whole::<_, _, 1, 100_000>")]
    pub concurrency: usize,
}

impl fmt::Debug for WebhookExecutorSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookExecutorSettings")
            .field("url", &self.url)
            .field("secret_env", &self.secret_env)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// Which executor runs which agent, and for how long at most (`[execution]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorChoice {
    pub default: ExecutorKind,
    /// agents.category → executor.
    pub by_category: HashMap<String, ExecutorKind>,
    #[serde(deserialize_with = "value::positive_duration")]
    pub timeout: Duration,
    /// Route teams by asking the model (`team_router = "openai"`) or by word overlap
    /// (`"words"`).
    #[serde(rename = "team_router", deserialize_with = "value::team_router")]
    pub route_with_model: bool,
}

impl ExecutorChoice {
    /// Whether `kind` runs some agent: the default, or some category's choice.
    fn chooses(&self, kind: ExecutorKind) -> bool {
        self.default == kind || self.by_category.values().any(|chosen| *chosen == kind)
    }
}

/// Settings of each executor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSettings {
    pub http: HttpClientSettings,
    pub builtin: BuiltinExecutorSettings,
    pub command: CommandExecutorSettings,
    pub openai: OpenAiExecutorSettings,
    pub webhook: WebhookExecutorSettings,
}

/// The HTTP client of the openai and webhook executors: endpoints are driven by tenants,
/// so a connection attempt and every silence while reading an answer have a limit.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpClientSettings {
    /// Longest a connection (TCP and TLS) may take to open.
    #[serde(deserialize_with = "value::positive_duration")]
    pub connect_timeout: Duration,
    /// Longest silence while waiting for or reading a response.
    #[serde(deserialize_with = "value::positive_duration")]
    pub read_timeout: Duration,
}

/// The command executor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandExecutorSettings {
    /// Program and arguments; empty when not configured.
    #[serde(deserialize_with = "value::program")]
    pub program: Vec<String>,
    /// Longest the program may run (`execution.timeout` unless set).
    #[serde(deserialize_with = "value::duration_or_run_timeout")]
    pub timeout: Duration,
    #[serde(deserialize_with = "value::flag")]
    pub variables_in_input: bool,
    #[serde(deserialize_with = "value::duration")]
    pub kill_grace: Duration,
    /// Variable names refused besides the built-in list.
    #[serde(deserialize_with = "value::env_patterns")]
    pub refused_env: Vec<EnvPattern>,
    /// As root: the users runs run as (each run has one of its own).
    pub uid_range: UidRange,
    /// Where runs get their folders; `None`: `agentd-runs` in the temporary folder.
    #[serde(deserialize_with = "value::optional_trimmed_folder")]
    pub runs_dir: Option<PathBuf>,
    /// As root: most processes a run's user may have at once.
    #[serde(deserialize_with = "value::whole::<_, _, 1, 1_000_000>")]
    pub max_processes: u64,
    /// Most programs running at once; 0 in the settings: the number of CPUs (resolved when
    /// the settings are loaded, so never 0 here).
    #[serde(deserialize_with = "value::whole::<_, _, 0, 100_000>")]
    pub concurrency: usize,
}

impl fmt::Debug for ArtifactSettings {
    // The AWS options hold credentials: names only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArtifactSettings")
            .field("dir", &self.dir)
            .field("url", &self.url)
            .field(
                "s3_options",
                &self
                    .s3_options
                    .iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            )
            .field("max_bytes", &self.max_bytes)
            .field("max_bytes_per_run", &self.max_bytes_per_run)
            .finish()
    }
}

/// Per-run log storage limits (`[run_logs]`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogLimitSettings {
    #[serde(deserialize_with = "value::whole::<_, _, 1, { i64::MAX }>")]
    pub max_lines_per_run: u64,
    #[serde(deserialize_with = "value::whole::<_, _, 1, { i64::MAX }>")]
    pub max_bytes_per_run: u64,
}

/// Where and how much artifacts are stored.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactSettings {
    #[serde(deserialize_with = "value::folder")]
    pub dir: PathBuf,
    /// `s3://bucket/prefix` when artifacts go to a bucket.
    #[serde(deserialize_with = "value::bucket_url")]
    pub url: Option<String>,
    /// AWS_* environment variables (lower-cased names), for the bucket's client.
    #[serde(skip)]
    pub s3_options: Vec<(String, String)>,
    #[serde(deserialize_with = "value::whole::<_, _, 1, { i64::MAX }>")]
    pub max_bytes: u64,
    #[serde(deserialize_with = "value::whole::<_, _, 1, { i64::MAX }>")]
    pub max_bytes_per_run: u64,
}

/// The built-in executor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuiltinExecutorSettings {
    /// Pause between steps (may be zero).
    #[serde(deserialize_with = "value::duration")]
    pub step_delay: Duration,
    /// 0: normal; N: a no-op logging N lines (benchmarks).
    #[serde(deserialize_with = "value::whole::<_, _, 0, 10_000_000>")]
    pub noop_lines: u64,
    /// Most runs executing with this executor at once.
    #[serde(deserialize_with = "value::whole::<_, _, 1, 100_000>")]
    pub concurrency: usize,
}

/// Keys named by the rules that span sections (each is also a field above; a test checks
/// that config/default.toml has them).
const PROGRAM_KEY: &str = "executors.command.program";
const WEBHOOK_URL_KEY: &str = "executors.webhook.url";
const WEBHOOK_SECRET_KEY: &str = "executors.webhook.secret_env";
const HTTP_TOKEN_KEY: &str = "http.token_env";
const FIRE_AHEAD_KEY: &str = "scheduler.fire_ahead";

/// Longest `scheduler.fire_ahead`: slots claimed ahead hold their runs' slots idle until
/// their instant.
pub const MAX_FIRE_AHEAD: Duration = Duration::from_secs(60);

impl Settings {
    /// How long a replica may go unseen before `agentd status` calls it stale: a busy
    /// replica is seen every `lease.ttl / 3`, an idle one at each look at the database
    /// (every `scheduler.poll_interval` at the latest); past that and a ttl more, its
    /// heartbeat has stopped (killed, frozen or cut off).
    pub fn worker_stale_after(&self) -> Duration {
        self.lease.ttl.max(self.scheduler.poll_interval) + self.lease.ttl
    }

    /// How long a replica may go unseen before the others delete its row from
    /// `agentd.workers`: twice [`Settings::worker_stale_after`], so `agentd status` shows it
    /// stale for a while first. A replica that comes back registers again.
    pub fn worker_forget_after(&self) -> Duration {
        2 * self.worker_stale_after()
    }

    /// Loads the settings from the defaults, an optional file, and the given environment
    /// (passed in rather than read, so tests can give their own).
    pub fn load(
        config_file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let defaults = layers::defaults()?;
        let mut deprecations = Vec::new();
        let mut builder = config::Config::builder().add_source(layers::default_layer(&defaults));
        if let Some(path) = config_file {
            builder = builder.add_source(layers::file(path, &mut deprecations)?);
        }
        for layer in layers::environment(env, &defaults, &mut deprecations) {
            builder = builder.add_source(layer);
        }
        if let Some(layer) = layers::database_url(env) {
            builder = builder.add_source(layer);
        }
        if let Some(layer) = layers::rust_log(env) {
            builder = builder.add_source(layer);
        }
        // Our sources cannot fail, and nothing here is frozen.
        let merged = builder
            .build()
            .map_err(|error| ConfigError::Unusable {
                reason: error.to_string(),
            })?
            .cache;
        let report = report::Report::new(&merged);
        let mut settings: Settings = merged
            .clone()
            .try_deserialize()
            .map_err(|error| report.explain(error))?;
        settings.complete(env, &report)?;
        settings.deprecations = deprecations;
        if let Some(note) = settings.resolve_limits() {
            settings.deprecations.push(note);
        }
        Ok(settings)
    }

    /// The runs limits: `executors.command.concurrency = 0` becomes the number of CPUs, and
    /// the former single limit `worker.concurrency`, when set, keeps its meaning (that many
    /// runs at once, whatever the executor): it becomes `worker.max_runs` and every
    /// executor's limit. Returns the warning that says so.
    fn resolve_limits(&mut self) -> Option<String> {
        let executors = &mut self.executors;
        if executors.command.concurrency == 0 {
            executors.command.concurrency = std::thread::available_parallelism()
                .map(std::num::NonZeroUsize::get)
                .unwrap_or(1);
        }
        let old = self.worker.concurrency;
        if old == 0 {
            return None;
        }
        self.worker.max_runs = old;
        executors.builtin.concurrency = old;
        executors.command.concurrency = old;
        executors.openai.concurrency = old;
        executors.webhook.concurrency = old;
        Some(format!(
            "config: worker.concurrency = {old} is deprecated: it sets worker.max_runs and every \
             executor's concurrency (executors.<name>.concurrency) to {old}, as before; set those \
             instead"
        ))
    }

    /// What the sections cannot say alone: rules across sections, and values read from the
    /// environment variables that settings name.
    fn complete(
        &mut self,
        env: &HashMap<String, String>,
        report: &report::Report<'_>,
    ) -> Result<(), ConfigError> {
        let env_value = |name: &str| -> Option<String> {
            env.get(name.trim())
                .filter(|value| !value.is_empty())
                .cloned()
        };
        if self.scheduler.fire_ahead > MAX_FIRE_AHEAD {
            return Err(report.invalid(
                FIRE_AHEAD_KEY,
                "longer than 60s; expected a duration from 0s (claim at the instant) to 60s",
            ));
        }
        let command = &mut self.executors.command;
        if command.timeout.is_zero() {
            command.timeout = self.executor.timeout;
        }
        if self.executor.chooses(ExecutorKind::Command) && command.program.is_empty() {
            return Err(report.invalid(
                PROGRAM_KEY,
                "the command executor is chosen in [execution] but no program is configured",
            ));
        }

        let openai = &mut self.executors.openai;
        openai.api_key = env_value(&openai.api_key_env);
        let webhook = &mut self.executors.webhook;
        webhook.secret = env_value(&webhook.secret_env);
        if self.executor.chooses(ExecutorKind::Webhook) {
            if webhook.url.is_empty() {
                return Err(report.invalid(
                    WEBHOOK_URL_KEY,
                    "the webhook executor is chosen in [execution]; expected an http:// or https:// URL",
                ));
            }
            if webhook.secret.is_none() {
                return Err(report.invalid(
                    WEBHOOK_SECRET_KEY,
                    "the webhook executor is chosen but this environment variable is not set",
                ));
            }
        }

        let name = self.http.token_env.trim();
        if !name.is_empty() {
            let value = env_value(name).ok_or_else(|| {
                report.invalid(
                    HTTP_TOKEN_KEY,
                    format!("the environment variable {name} is not set or empty"),
                )
            })?;
            self.http.token = Some(BearerToken::parse(&value).map_err(|reason| {
                report.invalid(
                    HTTP_TOKEN_KEY,
                    format!("the token in the environment variable {name} {reason}"),
                )
            })?);
        }

        let mut s3_options: Vec<(String, String)> = env
            .iter()
            .filter(|(name, _)| name.starts_with("AWS_"))
            .map(|(name, value)| (name.to_lowercase(), value.clone()))
            .collect();
        s3_options.sort();
        self.artifacts.s3_options = s3_options;

        let mut secret_variables: Vec<String> = [
            "DATABASE_URL",
            "AGENTD__DATABASE__URL",
            "AGENTD__DATABASE__LISTEN_URL",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_ACCESS_KEY_ID",
        ]
        .into_iter()
        .chain([
            self.executors.openai.api_key_env.trim(),
            self.executors.webhook.secret_env.trim(),
            self.http.token_env.trim(),
        ])
        .filter(|name| !name.is_empty() && env.contains_key(*name))
        .map(String::from)
        .collect();
        secret_variables.sort();
        secret_variables.dedup();
        self.secret_variables = secret_variables;
        Ok(())
    }
}

/// The dotted keys the text of a configuration file sets, as written (an old section name
/// stays old; a map setting such as `execution.by_category` counts as one key). For checking
/// deployment files.
pub fn file_keys(text: &str) -> Result<Vec<String>, ConfigError> {
    let defaults = layers::defaults()?;
    Ok(flatten(
        &layers::parse_toml(text, "configuration file")?,
        &defaults,
    ))
}

/// Every setting's key, section by section (for docs checks).
pub fn default_keys() -> Vec<String> {
    layers::defaults()
        .map(|defaults| flatten(&defaults, &defaults))
        .unwrap_or_default()
}

/// `section.key` (or `section.sub.key`) for every setting in `table`. A table that is empty
/// in `defaults` is a map with free-form keys (categories), so one setting, not a section.
fn flatten(table: &toml::Table, defaults: &toml::Table) -> Vec<String> {
    fn walk(
        path: &mut Vec<String>,
        table: &toml::Table,
        defaults: &toml::Table,
        out: &mut Vec<String>,
    ) {
        for (name, value) in table {
            path.push(name.clone());
            let is_map = matches!(
                layers::lookup(defaults, path),
                Some(toml::Value::Table(map)) if map.is_empty()
            );
            match value {
                toml::Value::Table(inner) if !is_map => walk(path, inner, defaults, out),
                _ => out.push(path.join(".")),
            }
            path.pop();
        }
    }
    let mut out = Vec::new();
    walk(&mut Vec::new(), table, defaults, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_wins_over_logging_level_and_is_checked_as_it_is() {
        let settings = Settings::load(
            None,
            &env(&[
                ("AGENTD__LOGGING__LEVEL", "warn"),
                ("RUST_LOG", "debug,sqlx=info"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.log.level, "debug,sqlx=info");
        let settings = Settings::load(None, &env(&[("RUST_LOG", " ")])).unwrap();
        assert_eq!(settings.log.level, "info");
        // A misspelled level would silence every line (a filter for a module "warning").
        let error = Settings::load(None, &env(&[("RUST_LOG", "warning")]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("logging.level") && error.contains("environment variable RUST_LOG"),
            "{error}"
        );
        assert!(error.contains("\"warning\" is not a level"), "{error}");
    }

    #[test]
    fn a_log_level_is_a_level_or_a_filter_never_a_bare_misspelled_word() {
        for good in [
            "info",
            "WARN",
            "debug,sqlx=warn",
            "agentd=trace",
            "off",
            "info,[run]=debug",
        ] {
            let settings = Settings::load(None, &env(&[("AGENTD__LOGGING__LEVEL", good)]));
            assert!(settings.is_ok(), "{good}: {:?}", settings.err());
        }
        for bad in ["warning", "verbose", "info,chatty", ""] {
            let error = Settings::load(None, &env(&[("AGENTD__LOGGING__LEVEL", bad)]))
                .unwrap_err()
                .to_string();
            assert!(error.contains("logging.level"), "{bad}: {error}");
            assert!(
                error.contains("expected trace, debug, info, warn, error"),
                "{error}"
            );
        }
    }

    #[test]
    fn the_pooler_is_recognised_from_the_url_of_the_well_known_transaction_poolers() {
        let settings = Settings::load(None, &env(&[])).unwrap();
        assert_eq!(settings.database.pooler, Pooler::Auto);
        let auto = Pooler::Auto;
        assert!(auto.is_transaction("aws-0-eu-central-1.pooler.supabase.com", 6543));
        assert!(!auto.is_transaction("aws-0-eu-central-1.pooler.supabase.com", 5432));
        assert!(!auto.is_transaction("db.abcdefgh.supabase.co", 5432));
        assert!(auto.is_transaction("ep-cool-name-123456-pooler.us-east-2.aws.neon.tech", 5432));
        assert!(!auto.is_transaction("ep-cool-name-123456.us-east-2.aws.neon.tech", 5432));
        assert!(!auto.is_transaction("127.0.0.1", 6432));
        assert!(Pooler::Transaction.is_transaction("127.0.0.1", 6432));
        assert!(!Pooler::None.is_transaction("x.pooler.supabase.com", 6543));
        let error = Settings::load(None, &env(&[("AGENTD__DATABASE__POOLER", "pgbouncer")]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("database.pooler")
                && error.contains("expected auto, none or transaction"),
            "{error}"
        );
    }

    #[test]
    fn runs_limits_default_per_executor_and_the_former_single_limit_sets_them_all() {
        let settings = Settings::load(None, &env(&[])).unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(settings.worker.max_runs, 5000);
        assert_eq!(
            settings.executors.command.concurrency, cpus,
            "0 is the CPUs"
        );
        assert_eq!(settings.executors.builtin.concurrency, 5000);
        assert_eq!(settings.executors.openai.concurrency, 500);
        assert_eq!(settings.executors.webhook.concurrency, 500);
        assert!(
            settings.deprecations.is_empty(),
            "{:?}",
            settings.deprecations
        );

        let settings = Settings::load(
            None,
            &env(&[
                ("AGENTD__WORKER__CONCURRENCY", "16"),
                ("AGENTD__EXECUTORS__BUILTIN__CONCURRENCY", "300"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.worker.max_runs, 16);
        for limit in [
            settings.executors.builtin.concurrency,
            settings.executors.command.concurrency,
            settings.executors.openai.concurrency,
            settings.executors.webhook.concurrency,
        ] {
            assert_eq!(limit, 16, "the old limit applies to every executor");
        }
        assert_eq!(settings.deprecations.len(), 1);
        assert!(
            settings.deprecations[0].contains("worker.concurrency = 16 is deprecated"),
            "{:?}",
            settings.deprecations
        );

        let error = Settings::load(
            None,
            &env(&[("AGENTD__EXECUTORS__OPENAI__CONCURRENCY", "0")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("executors.openai.concurrency"),
            "the error names the key: {error}"
        );
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_alone_load() {
        let settings = Settings::load(None, &env(&[])).unwrap();
        assert_eq!(settings.database.url, None);
        assert_eq!(settings.database.max_connections, 10);
        assert_eq!(settings.log.format, LogFormat::Auto);
        assert!(
            settings
                .worker
                .id
                .ends_with(&format!("-{}", std::process::id()))
        );
    }

    #[test]
    fn environment_overrides_nested_keys_with_types() {
        let settings = Settings::load(
            None,
            &env(&[
                ("AGENTD__DATABASE__MAX_CONNECTIONS", "3"),
                ("AGENTD__DATABASE__MIGRATE", "true"),
                ("AGENTD__WORKER__ID", "replica-a"),
                ("AGENTD__DATABASE__CONNECT_TIMEOUT", "1500ms"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.database.max_connections, 3);
        assert!(settings.database.migrate);
        assert_eq!(settings.worker.id, "replica-a");
        assert_eq!(
            settings.database.connect_timeout,
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn database_url_wins_over_everything() {
        let settings = Settings::load(
            None,
            &env(&[
                ("AGENTD__DATABASE__URL", "postgres://a@h/x"),
                ("DATABASE_URL", "postgres://b@h/y"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.database.url.as_deref(), Some("postgres://b@h/y"));
    }

    #[test]
    fn bad_values_name_key_value_and_source() {
        let error = Settings::load(None, &env(&[("AGENTD__DATABASE__MAX_CONNECTIONS", "many")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "config: database.max_connections = \"many\" (from environment variable \
             AGENTD__DATABASE__MAX_CONNECTIONS): expected a whole number from 1 to 10000"
        );
        let error = Settings::load(None, &env(&[("AGENTD__DATABASE__MAX_BACKOFF", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("config: database.max_backoff = \"soon\""),
            "{error}"
        );
        let error = Settings::load(None, &env(&[("AGENTD__LOGGING__FORMAT", "xml")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "config: logging.format = \"xml\" (from environment variable \
             AGENTD__LOGGING__FORMAT): expected auto, json or text"
        );
        let error = Settings::load(None, &env(&[("AGENTD__NOPE__KEY", "1")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "config: unknown key nope.key (from environment variable AGENTD__NOPE__KEY)"
        );
    }

    #[test]
    fn http_and_retention_settings() {
        let defaults = Settings::load(None, &env(&[])).unwrap();
        assert_eq!(
            defaults.http.listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert!(!defaults.retention.enabled(), "keeps everything by default");
        let settings = Settings::load(
            None,
            &env(&[
                ("AGENTD__HTTP__LISTEN", ""),
                ("AGENTD__RETENTION__RUN_LOGS", "30d"),
                ("AGENTD__RETENTION__BATCH_SIZE", "50"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.http.listen, None);
        assert_eq!(
            settings.retention.run_logs,
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(settings.retention.runs, None);
        assert_eq!(settings.retention.batch_size, 50);
        assert!(settings.retention.enabled());
        let error = Settings::load(None, &env(&[("AGENTD__HTTP__LISTEN", "localhost")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("http.listen = \"localhost\""), "{error}");
        let error = Settings::load(None, &env(&[("AGENTD__RETENTION__RUNS", "0s")]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("retention.runs = \"0s\"") && error.contains("above zero"),
            "{error}"
        );
    }

    #[test]
    fn http_client_timeouts_and_the_reply_cap() {
        let defaults = Settings::load(None, &env(&[])).unwrap();
        assert_eq!(
            defaults.executors.http.connect_timeout,
            Duration::from_secs(10)
        );
        assert_eq!(
            defaults.executors.http.read_timeout,
            Duration::from_secs(60)
        );
        assert_eq!(defaults.executors.openai.max_reply_bytes, 1024 * 1024);
        let settings = Settings::load(
            None,
            &env(&[
                ("AGENTD__EXECUTORS__HTTP__READ_TIMEOUT", "2s"),
                ("AGENTD__EXECUTORS__OPENAI__MAX_REPLY_BYTES", "4096"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.executors.http.read_timeout, Duration::from_secs(2));
        assert_eq!(settings.executors.openai.max_reply_bytes, 4096);
        let error = Settings::load(
            None,
            &env(&[("AGENTD__EXECUTORS__HTTP__CONNECT_TIMEOUT", "0s")]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            error,
            "config: executors.http.connect_timeout = \"0s\" (from environment variable \
             AGENTD__EXECUTORS__HTTP__CONNECT_TIMEOUT): expected a duration above zero"
        );
        let error = Settings::load(
            None,
            &env(&[("AGENTD__EXECUTORS__OPENAI__MAX_REPLY_BYTES", "0")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("config: executors.openai.max_reply_bytes = 0 ")
                && error.ends_with("expected a whole number from 1 to 4294967295"),
            "{error}"
        );
    }

    #[test]
    fn the_http_token_comes_from_the_variable_http_token_env_names() {
        let open = Settings::load(None, &env(&[])).unwrap();
        assert!(open.http.token.is_none(), "no token by default");
        let settings = Settings::load(
            None,
            &env(&[
                ("AGENTD__HTTP__TOKEN_ENV", "OPS_TOKEN"),
                ("OPS_TOKEN", "s3cr3t-token\n"),
            ]),
        )
        .unwrap();
        let token = settings.http.token.as_ref().expect("a token");
        assert!(token.matches("s3cr3t-token"));
        assert!(!token.matches("s3cr3t-toke"));
        assert!(!token.matches("s3cr3t-token2"));
        assert!(!token.matches(""));
        assert_eq!(token.expose(), "s3cr3t-token");
        let shown = format!("{:?}", settings.http);
        assert!(!shown.contains("s3cr3t"), "{shown}");

        for value in [None, Some(""), Some("two words"), Some("caf\u{e9}")] {
            let mut pairs = vec![("AGENTD__HTTP__TOKEN_ENV", "OPS_TOKEN")];
            if let Some(value) = value {
                pairs.push(("OPS_TOKEN", value));
            }
            let error = Settings::load(None, &env(&pairs)).unwrap_err().to_string();
            assert!(
                error.starts_with(
                    "config: http.token_env = \"OPS_TOKEN\" (from environment variable \
                     AGENTD__HTTP__TOKEN_ENV): "
                ) && error.contains("OPS_TOKEN"),
                "{error}"
            );
            if let Some(value) = value.filter(|value| !value.is_empty()) {
                assert!(!error.contains(value), "{error}");
            }
        }
    }

    #[test]
    fn invalid_url_error_hides_the_password() {
        let error = Settings::load(None, &env(&[("DATABASE_URL", "mysql://u:hunter2@h/db")]))
            .unwrap_err()
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("database.url"), "{error}");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://h/db?sslmode=require&password=x"),
            "postgres://h/db?sslmode=require&password=***"
        );
    }

    /// A configuration file in a folder of its own, removed with the folder.
    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("agentd.toml");
        std::fs::write(&path, text).unwrap();
        (folder, path)
    }

    fn load_error(file: Option<&Path>, pairs: &[(&str, &str)]) -> String {
        Settings::load(file, &env(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_are_refused_naming_the_key_and_its_origin() {
        let (_folder, path) = file("[database]\nmax_conections = 3\n");
        assert_eq!(
            load_error(Some(&path), &[]),
            format!(
                "config: unknown key database.max_conections (from {})",
                path.display()
            )
        );
        let (_folder, path) = file("[schedular]\nbatch_size = 10\n");
        assert_eq!(
            load_error(Some(&path), &[]),
            format!(
                "config: unknown key schedular.batch_size (from {})",
                path.display()
            )
        );
        // Fields filled from elsewhere are not settings.
        let (_folder, path) = file("[http]\ntoken = \"s3cr3t\"\n");
        let error = load_error(Some(&path), &[]);
        assert!(
            error.starts_with("config: unknown key http.token (from ") && !error.contains("s3cr3t"),
            "{error}"
        );
        assert_eq!(
            load_error(None, &[("AGENTD__EXECUTORS__COMMAND__PROGAM", "[\"sh\"]")]),
            "config: unknown key executors.command.progam (from environment variable \
             AGENTD__EXECUTORS__COMMAND__PROGAM)"
        );
        assert_eq!(
            load_error(None, &[("AGENTD__EXECUTORS__SHELL__PROGRAM", "sh")]),
            "config: unknown key executors.shell.program (from environment variable \
             AGENTD__EXECUTORS__SHELL__PROGRAM)"
        );
    }

    #[test]
    fn a_bad_choice_lists_the_valid_values() {
        assert_eq!(
            load_error(None, &[("AGENTD__EXECUTION__DEFAULT", "docker")]),
            "config: execution.default = \"docker\" (from environment variable \
             AGENTD__EXECUTION__DEFAULT): expected builtin, command, openai or webhook"
        );
        let (_folder, path) = file("[execution]\nby_category = { research = \"gpu\" }\n");
        assert_eq!(
            load_error(Some(&path), &[]),
            format!(
                "config: execution.by_category.research = \"gpu\" (from {}): expected builtin, \
                 command, openai or webhook",
                path.display()
            )
        );
        for (variable, value, expected) in [
            (
                "AGENTD__SCHEDULER__MISFIRE_POLICY",
                "later",
                "expected coalesce or skip",
            ),
            (
                "AGENTD__SCHEDULER__OVERLAP_POLICY",
                "queue",
                "expected skip or allow",
            ),
            (
                "AGENTD__EXECUTION__TEAM_ROUTER",
                "dice",
                "expected words or openai",
            ),
        ] {
            let error = load_error(None, &[(variable, value)]);
            assert!(
                error.contains(&format!(
                    "= \"{value}\" (from environment variable {variable}): "
                )) && error.ends_with(expected),
                "{error}"
            );
        }
    }

    #[test]
    fn values_have_their_types_in_a_file_too() {
        for (text, key, reason) in [
            (
                "[database]\nmax_connections = \"3\"",
                "database.max_connections = \"3\"",
                "expected a whole number from 1 to 10000",
            ),
            (
                "[database]\nmax_connections = 2.5",
                "database.max_connections = 2.5",
                "expected a whole number from 1 to 10000",
            ),
            (
                "[database]\nmigrate = \"yes\"",
                "database.migrate = \"yes\"",
                "expected true or false",
            ),
            (
                "[lease]\nttl = 30",
                "lease.ttl = 30",
                "expected a duration such as \"500ms\", \"30s\", \"15m\", \"2h\" or \"30d\"",
            ),
            (
                "[lease]\nttl = \"500ms\"",
                "lease.ttl = \"500ms\"",
                "expected at least 1s",
            ),
            (
                "[executors.command]\nprogram = \"python3 agent.py\"",
                "executors.command.program = \"python3 agent.py\"",
                "expected an array of strings such as [\"python3\", \"agent.py\"]",
            ),
            (
                "[executors.command]\nrefused_env = [\"OK\", \"A-B*\"]",
                "executors.command.refused_env = [\"OK\", \"A-B*\"]",
                "expected an array of names or prefixes such as [\"MY_TOOL_*\", \"SECRET_CONFIG\"]",
            ),
            (
                "[executors.command]\nuid_range = \"500-900\"",
                "executors.command.uid_range = \"500-900\"",
                "expected a range of uids such as \"100000-165535\" (from 1000 up, first not above last)",
            ),
            (
                "[http]\ntoken_env = \"OPS-TOKEN\"",
                "http.token_env = \"OPS-TOKEN\"",
                "expected an environment variable name ([A-Za-z_][A-Za-z0-9_]*), or empty",
            ),
            (
                "[executors.openai]\napi_key_env = \"$KEY\"",
                "executors.openai.api_key_env = \"$KEY\"",
                "expected an environment variable name ([A-Za-z_][A-Za-z0-9_]*), or empty",
            ),
            (
                "[executors.openai]\nbase_url = \"api.example.com\"",
                "executors.openai.base_url = \"api.example.com\"",
                "expected an http:// or https:// URL",
            ),
            (
                "[execution]\nby_category = \"research\"",
                "execution.by_category = \"research\"",
                "expected a table such as { name = \"value\" }",
            ),
            (
                "database = 5",
                "database = 5",
                "expected a table of settings",
            ),
        ] {
            let (_folder, path) = file(text);
            assert_eq!(
                load_error(Some(&path), &[]),
                format!("config: {key} (from {}): {reason}", path.display()),
                "{text}"
            );
        }
    }

    #[test]
    fn every_flag_is_true_or_false_and_nothing_else() {
        for (variable, value) in [
            ("AGENTD__CONVERSATIONS__ENABLED", "yes"),
            ("AGENTD__CONVERSATIONS__ENABLED", "off"),
            ("AGENTD__CONVERSATIONS__ENABLED", "0"),
            ("AGENTD__DATABASE__MIGRATE", "yes"),
            ("AGENTD__EXECUTORS__COMMAND__VARIABLES_IN_INPUT", "1"),
        ] {
            let error = load_error(None, &[(variable, value)]);
            assert!(
                error.contains(&format!("(from environment variable {variable}): "))
                    && error.ends_with("expected true or false"),
                "{variable}={value}: {error}"
            );
        }
        let settings =
            Settings::load(None, &env(&[("AGENTD__CONVERSATIONS__ENABLED", "false")])).unwrap();
        assert!(!settings.conversations.enabled);
    }

    #[test]
    fn typed_values_from_the_environment() {
        let settings = Settings::load(
            None,
            &env(&[
                (
                    "AGENTD__EXECUTION__BY_CATEGORY",
                    "{ research = \"command\" }",
                ),
                (
                    "AGENTD__EXECUTORS__COMMAND__PROGRAM",
                    "[\"sh\", \"-c\", \"true\"]",
                ),
                (
                    "AGENTD__EXECUTORS__COMMAND__REFUSED_ENV",
                    "[\"TOOL_*\", \"SECRET\"]",
                ),
                ("AGENTD__EXECUTORS__COMMAND__UID_RANGE", "200000-200009"),
                ("AGENTD__WORKER__ID", "42"),
            ]),
        )
        .unwrap();
        assert_eq!(
            settings.executor.by_category.get("research"),
            Some(&ExecutorKind::Command)
        );
        assert_eq!(settings.executors.command.program, ["sh", "-c", "true"]);
        assert_eq!(settings.executors.command.refused_env.len(), 2);
        let range = settings.executors.command.uid_range;
        assert_eq!((range.first(), range.last()), (200_000, 200_009));
        assert_eq!(settings.worker.id, "42", "text stays text");
        assert_eq!(
            settings.executors.command.timeout, settings.executor.timeout,
            "an empty command timeout is the run timeout"
        );
        assert!(settings.deprecations.is_empty());
    }

    #[test]
    fn maps_merge_key_by_key_across_layers() {
        let (_folder, path) =
            file("[execution]\nby_category = { a = \"builtin\", b = \"builtin\" }\n");
        let settings = Settings::load(
            Some(&path),
            &env(&[
                ("AGENTD__EXECUTION__BY_CATEGORY", "{ b = \"openai\" }"),
                ("AGENTD__EXECUTION__BY_CATEGORY__C", "openai"),
            ]),
        )
        .unwrap();
        let mut chosen: Vec<(&str, ExecutorKind)> = settings
            .executor
            .by_category
            .iter()
            .map(|(category, kind)| (category.as_str(), *kind))
            .collect();
        chosen.sort_by_key(|(category, _)| *category);
        assert_eq!(
            chosen,
            [
                ("a", ExecutorKind::Builtin),
                ("b", ExecutorKind::OpenAi),
                ("c", ExecutorKind::OpenAi),
            ]
        );
    }

    #[test]
    fn old_section_names_work_with_one_warning_each() {
        let settings = Settings::load(
            None,
            &env(&[
                ("AGENTD__LOG__LEVEL", "debug"),
                ("AGENTD__LOGS__MAX_LINES_PER_RUN", "5"),
                ("AGENTD__EXECUTOR__TIMEOUT", "2m"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.log.level, "debug");
        assert_eq!(settings.logs.max_lines_per_run, 5);
        assert_eq!(settings.executor.timeout, Duration::from_secs(120));
        assert_eq!(
            settings.deprecations,
            [
                "config: environment variable AGENTD__EXECUTOR__TIMEOUT is deprecated, rename \
                 it AGENTD__EXECUTION__TIMEOUT",
                "config: environment variable AGENTD__LOGS__MAX_LINES_PER_RUN is deprecated, \
                 rename it AGENTD__RUN_LOGS__MAX_LINES_PER_RUN",
                "config: environment variable AGENTD__LOG__LEVEL is deprecated, rename it \
                 AGENTD__LOGGING__LEVEL",
            ]
        );

        let (_folder, path) = file(
            "[log]\nlevel = \"warn\"\nformat = \"json\"\n\n[executor]\ndefault = \"command\"\n\
             by_category = { research = \"builtin\" }\n\n[executors.command]\nprogram = [\"true\"]\n",
        );
        let settings = Settings::load(Some(&path), &env(&[])).unwrap();
        assert_eq!(settings.log.level, "warn");
        assert_eq!(settings.log.format, LogFormat::Json);
        assert_eq!(settings.executor.default, ExecutorKind::Command);
        assert_eq!(
            settings.deprecations,
            [
                format!(
                    "config: {}: section [log] is deprecated, rename it [logging]",
                    path.display()
                ),
                format!(
                    "config: {}: section [executor] is deprecated, rename it [execution]",
                    path.display()
                ),
            ]
        );

        // An error about a value under an old name says where it was written.
        assert_eq!(
            load_error(None, &[("AGENTD__EXECUTOR__DEFAULT", "docker")]),
            "config: execution.default = \"docker\" (from environment variable \
             AGENTD__EXECUTOR__DEFAULT): expected builtin, command, openai or webhook"
        );
        assert!(
            Settings::load(None, &env(&[]))
                .unwrap()
                .deprecations
                .is_empty()
        );
    }

    #[test]
    fn given_both_names_the_new_one_wins_and_the_warning_says_so() {
        let settings = Settings::load(
            None,
            &env(&[
                ("AGENTD__LOG__LEVEL", "debug"),
                ("AGENTD__LOGGING__LEVEL", "warn"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.log.level, "warn");
        assert_eq!(
            settings.deprecations,
            [
                "config: environment variable AGENTD__LOG__LEVEL is deprecated and ignored: \
              AGENTD__LOGGING__LEVEL is set too and wins"
            ]
        );

        let (_folder, path) = file(
            "[logs]\nmax_lines_per_run = 5\nmax_bytes_per_run = 7\n\n\
             [run_logs]\nmax_lines_per_run = 9\n",
        );
        let settings = Settings::load(Some(&path), &env(&[])).unwrap();
        assert_eq!(settings.logs.max_lines_per_run, 9, "the new name wins");
        assert_eq!(
            settings.logs.max_bytes_per_run, 7,
            "the old name still counts"
        );
        assert_eq!(
            settings.deprecations,
            [format!(
                "config: {}: section [logs] is deprecated, rename it [run_logs]; \
                 run_logs.max_lines_per_run set under both names, the value in [run_logs] wins",
                path.display()
            )]
        );

        // Across layers the later layer wins, whatever the names: the environment over the file.
        let (_folder, path) = file("[logging]\nlevel = \"warn\"\n");
        let settings =
            Settings::load(Some(&path), &env(&[("AGENTD__LOG__LEVEL", "error")])).unwrap();
        assert_eq!(settings.log.level, "error");
        assert_eq!(settings.deprecations.len(), 1);
    }

    #[test]
    fn secrets_never_appear_in_errors() {
        let secret = "hunter2";
        for (file_text, pairs) in [
            (None, vec![("DATABASE_URL", "mysql://u:hunter2@h/db")]),
            (None, vec![("AGENTD__DATABASE__URL", "hunter2")]),
            (None, vec![("AGENTD__DATABASE__PASSWORD", "hunter2")]),
            (
                None,
                vec![(
                    "AGENTD__EXECUTORS__OPENAI__BASE_URL",
                    "ftp://u:hunter2@h/v1",
                )],
            ),
            (
                None,
                vec![("AGENTD__EXECUTORS__OPENAI__API_KEY", "hunter2")],
            ),
            (
                Some("[database]\nurl = \"mysql://u:hunter2@h/db\"\n"),
                vec![],
            ),
            (
                Some("[database]\nurl = [\"postgres://u:hunter2@h/db\"]\n"),
                vec![],
            ),
            (Some("[executors.webhook]\nsecret = \"hunter2\"\n"), vec![]),
            (
                None,
                vec![
                    ("AGENTD__EXECUTION__DEFAULT", "webhook"),
                    (
                        "AGENTD__EXECUTORS__WEBHOOK__URL",
                        "https://u:hunter2@hooks.example.com/x",
                    ),
                ],
            ),
        ] {
            let folder = file_text.map(file);
            let error = load_error(folder.as_ref().map(|(_, path)| path.as_path()), &pairs);
            assert!(error.starts_with("config: "), "{error}");
            assert!(!error.contains(secret), "{error}");
        }
    }

    #[test]
    fn the_keys_named_by_rules_across_sections_exist() {
        let keys = default_keys();
        for key in [
            PROGRAM_KEY,
            WEBHOOK_URL_KEY,
            WEBHOOK_SECRET_KEY,
            HTTP_TOKEN_KEY,
        ] {
            assert!(keys.iter().any(|known| known == key), "{key}");
        }
        for (old, new) in layers::RENAMED_SECTIONS {
            assert!(
                keys.iter().any(|key| key.starts_with(&format!("{new}."))),
                "{new}"
            );
            assert!(
                !keys.iter().any(|key| key.starts_with(&format!("{old}."))),
                "{old}"
            );
        }
        assert!(keys.iter().any(|key| key == "execution.by_category"));
        assert_eq!(
            file_keys("[log]\nlevel = \"debug\"\n[execution]\nby_category = { a = \"command\" }\n")
                .unwrap(),
            ["execution.by_category", "log.level"]
        );
    }

    #[test]
    fn cross_section_rules_name_the_key() {
        assert_eq!(
            load_error(None, &[("AGENTD__EXECUTION__DEFAULT", "command")]),
            "config: executors.command.program = [] (from built-in defaults): the command \
             executor is chosen in [execution] but no program is configured"
        );
        let error = load_error(
            None,
            &[
                ("AGENTD__EXECUTION__BY_CATEGORY", "{ hooks = \"webhook\" }"),
                (
                    "AGENTD__EXECUTORS__WEBHOOK__URL",
                    "https://hooks.example.com/run",
                ),
            ],
        );
        assert_eq!(
            error,
            "config: executors.webhook.secret_env = \"AGENTD_WEBHOOK_SECRET\" (from built-in \
             defaults): the webhook executor is chosen but this environment variable is not set"
        );
    }
}
