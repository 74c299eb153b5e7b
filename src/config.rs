//! Typed settings, layered and validated once at start-up.
//!
//! Layers, later ones win: `config/default.toml` (compiled in, so it always lists every
//! key), the file named by `--config`/`AGENTD_CONFIG`, environment variables
//! `AGENTD__SECTION__KEY`, and `DATABASE_URL` for the database URL. Every key of every layer
//! must exist in the defaults, so a typo is an error instead of a silently ignored setting.
//! Values are checked here, once: code past [`Settings::load`] only sees valid settings, and
//! a bad value is reported as one line that names the key, the value and where it came from.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The defaults, compiled in so that the binary needs no file to start.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override settings.
const ENV_PREFIX: &str = "AGENTD__";

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

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "built-in defaults"),
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

/// All of agentd's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub embedded: EmbeddedSettings,
    pub log: LogSettings,
    pub worker: WorkerSettings,
    pub scheduler: SchedulerSettings,
    pub requests: RequestSettings,
    pub lease: LeaseSettings,
    pub shutdown: ShutdownSettings,
    pub executor: ExecutorChoice,
    pub executors: ExecutorSettings,
    pub logs: LogLimitSettings,
    pub artifacts: ArtifactSettings,
    pub http: HttpSettings,
    pub retention: RetentionSettings,
    /// Environment variables whose values these settings hold and that are secrets
    /// (`DATABASE_URL`, the API key, the webhook secret, the endpoints' token, AWS
    /// credentials): `agentd run` wipes them from its own environment at start-up.
    pub secret_variables: Vec<String>,
}

/// The operations endpoints.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// `None`: no HTTP server.
    pub listen: Option<std::net::SocketAddr>,
    /// The token `/readyz` and `/metrics` require, read from the environment variable
    /// `http.token_env` names; `None`: they are open.
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
#[derive(Debug, Clone)]
pub struct RetentionSettings {
    pub run_logs: Option<Duration>,
    pub artifacts: Option<Duration>,
    pub runs: Option<Duration>,
    pub interval: Duration,
    pub batch_size: u32,
}

impl RetentionSettings {
    /// Whether anything is ever deleted.
    pub fn enabled(&self) -> bool {
        self.run_logs.is_some() || self.artifacts.is_some() || self.runs.is_some()
    }
}

/// How to reach PostgreSQL.
#[derive(Clone)]
pub struct DatabaseSettings {
    /// `None`: run the embedded server.
    pub url: Option<String>,
    pub migrate: bool,
    pub max_connections: u32,
    pub connect_timeout: Duration,
    pub max_backoff: Duration,
}

impl fmt::Debug for DatabaseSettings {
    // The URL may carry a password: never print it whole.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("migrate", &self.migrate)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

/// The private PostgreSQL run when no database URL is configured.
#[derive(Debug, Clone)]
pub struct EmbeddedSettings {
    pub data_dir: PathBuf,
    pub bin_dir: Option<PathBuf>,
    pub start_timeout: Duration,
}

/// Log output.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// A tracing filter directive (`info`, `debug,sqlx=warn`, …), already validated.
    pub level: String,
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    Json,
    Text,
}

/// This replica's identity and capacity.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Never empty: defaults to host name and process id.
    pub id: String,
    /// Runs executed at once, at least 1.
    pub concurrency: usize,
}

/// The claim loop.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub poll_interval: Duration,
    pub batch_size: usize,
    pub misfire_grace: Duration,
    pub misfire_policy: MisfirePolicy,
    pub overlap_policy: OverlapPolicy,
}

/// What to do with a slot fired later than `misfire_grace` after its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MisfirePolicy {
    /// Fire one run anyway.
    Coalesce,
    /// Fire nothing; only advance to the next slot.
    Skip,
}

/// What to do when a schedule's previous run is still running at its next slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlapPolicy {
    Skip,
    Allow,
}

/// Limits on what users may ask for (`[requests]`).
#[derive(Debug, Clone)]
pub struct RequestSettings {
    /// Most runs one user may have queued; `request_run` refuses more.
    pub max_pending_per_user: u32,
}

/// Run leases.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
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
#[derive(Debug, Clone)]
pub struct ShutdownSettings {
    pub grace: Duration,
}

/// The executors agentd can run agents with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecutorKind {
    Builtin,
    Command,
    OpenAi,
    Webhook,
}

impl ExecutorKind {
    fn parse(name: &str) -> Option<ExecutorKind> {
        match name {
            "builtin" => Some(ExecutorKind::Builtin),
            "command" => Some(ExecutorKind::Command),
            "openai" => Some(ExecutorKind::OpenAi),
            "webhook" => Some(ExecutorKind::Webhook),
            _ => None,
        }
    }
}

/// The OpenAI-compatible executor.
#[derive(Debug, Clone)]
pub struct OpenAiExecutorSettings {
    pub base_url: String,
    pub model: String,
    pub model_by_category: std::collections::HashMap<String, String>,
    /// The API key, read from the environment variable `api_key_env` names.
    pub api_key: Option<String>,
    /// Most bytes of streamed reply text kept; past it the run fails (a hostile endpoint
    /// could stream forever).
    pub max_reply_bytes: usize,
}

/// The webhook executor.
#[derive(Clone)]
pub struct WebhookExecutorSettings {
    /// Empty when not configured.
    pub url: String,
    /// The signing secret, read from the environment variable `secret_env` names.
    pub secret: Option<String>,
    pub secret_env: String,
}

impl fmt::Debug for WebhookExecutorSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookExecutorSettings")
            .field("url", &self.url)
            .field("secret_env", &self.secret_env)
            .finish_non_exhaustive()
    }
}

/// Which executor runs which agent, and for how long at most.
#[derive(Debug, Clone)]
pub struct ExecutorChoice {
    pub default: ExecutorKind,
    /// agents.category → executor.
    pub by_category: std::collections::HashMap<String, ExecutorKind>,
    pub timeout: Duration,
    /// Route teams by asking the model (true) or by word overlap (false).
    pub route_with_model: bool,
}

/// Settings of each executor.
#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    pub http: HttpClientSettings,
    pub builtin: BuiltinExecutorSettings,
    pub command: CommandExecutorSettings,
    pub openai: OpenAiExecutorSettings,
    pub webhook: WebhookExecutorSettings,
}

/// The HTTP client of the openai and webhook executors: endpoints are driven by tenants,
/// so a connection attempt and every silence while reading an answer have a limit.
#[derive(Debug, Clone, Copy)]
pub struct HttpClientSettings {
    /// Longest a connection (TCP and TLS) may take to open.
    pub connect_timeout: Duration,
    /// Longest silence while waiting for or reading a response.
    pub read_timeout: Duration,
}

/// The command executor.
#[derive(Debug, Clone)]
pub struct CommandExecutorSettings {
    /// Program and arguments; empty when not configured.
    pub program: Vec<String>,
    pub timeout: Duration,
    pub variables_in_input: bool,
    pub kill_grace: Duration,
    /// Variable names refused besides the built-in list (names, or prefixes ending in `*`).
    pub refused_env: Vec<String>,
    /// As root: the users runs run as, first and last uid (each run has one of its own).
    pub uid_range: (u32, u32),
    /// Where runs get their folders; `None`: `agentd-runs` in the temporary folder.
    pub runs_dir: Option<PathBuf>,
    /// As root: most processes a run's user may have at once.
    pub max_processes: u64,
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

/// Per-run log storage limits.
#[derive(Debug, Clone, Copy)]
pub struct LogLimitSettings {
    pub max_lines_per_run: u64,
    pub max_bytes_per_run: u64,
}

/// Where and how much artifacts are stored.
#[derive(Clone)]
pub struct ArtifactSettings {
    pub dir: PathBuf,
    /// `s3://bucket/prefix` when artifacts go to a bucket.
    pub url: Option<String>,
    /// AWS_* environment variables (lower-cased names), for the bucket's client.
    pub s3_options: Vec<(String, String)>,
    pub max_bytes: u64,
    pub max_bytes_per_run: u64,
}

/// The built-in executor.
#[derive(Debug, Clone)]
pub struct BuiltinExecutorSettings {
    /// Pause between steps (may be zero).
    pub step_delay: Duration,
    /// 0: normal; N: a no-op logging N lines (benchmarks).
    pub noop_lines: u64,
}

impl Settings {
    /// Loads the settings from the defaults, an optional file, and the given environment
    /// (passed in rather than read, so tests can give their own).
    pub fn load(
        config_file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let mut layers = Layers::from_defaults()?;
        if let Some(path) = config_file {
            let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                path: path.to_path_buf(),
                reason: error.to_string(),
            })?;
            layers.apply_file(&text, Source::File(path.to_path_buf()))?;
        }
        layers.apply_env(env)?;
        layers.env = env.clone();
        if let Some(url) = env.get("DATABASE_URL") {
            layers.set(
                "database.url",
                toml::Value::String(url.clone()),
                Source::Env("DATABASE_URL".into()),
            );
        }
        layers.build()
    }
}

/// The merged key/value view of every layer, with the source of each value.
struct Layers {
    values: BTreeMap<String, (toml::Value, Source)>,
    /// The environment, for settings that name an environment variable (secrets).
    env: HashMap<String, String>,
}

impl Layers {
    fn from_defaults() -> Result<Layers, ConfigError> {
        let table = parse_toml(DEFAULT_TOML, "config/default.toml")?;
        let mut values = BTreeMap::new();
        for (key, value) in flatten(&table) {
            values.insert(key, (value, Source::Default));
        }
        Ok(Layers {
            values,
            env: HashMap::new(),
        })
    }

    fn apply_file(&mut self, text: &str, source: Source) -> Result<(), ConfigError> {
        let name = source.to_string();
        let table = parse_toml(text, &name)?;
        for (key, value) in flatten(&table) {
            if !self.values.contains_key(&key) {
                return Err(ConfigError::UnknownKey {
                    key,
                    origin: source,
                });
            }
            // Types are checked in build(), with the key and the value in the error.
            self.set(&key, value, source.clone());
        }
        Ok(())
    }

    fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        let mut names: Vec<&String> = env.keys().filter(|k| k.starts_with(ENV_PREFIX)).collect();
        names.sort();
        for name in names {
            let raw = &env[name];
            let source = Source::Env(name.clone());
            let key = name[ENV_PREFIX.len()..].to_lowercase().replace("__", ".");
            let Some((default, _)) = self.values.get(&key) else {
                return Err(ConfigError::UnknownKey {
                    key,
                    origin: source,
                });
            };
            // An environment variable is text; read it as the type its default has.
            let value = match default {
                toml::Value::String(_) => toml::Value::String(raw.clone()),
                _ => parse_env_value(raw).ok_or_else(|| ConfigError::Invalid {
                    key: key.clone(),
                    value: quote(raw),
                    origin: source.clone(),
                    reason: format!("expected {}", type_name(default)),
                })?,
            };
            self.set(&key, value, source);
        }
        Ok(())
    }

    fn set(&mut self, key: &str, value: toml::Value, source: Source) {
        self.values.insert(key.to_string(), (value, source));
    }

    fn get(&self, key: &str) -> &(toml::Value, Source) {
        // Every key read by build() is in config/default.toml; a test checks that
        // loading the defaults alone succeeds, so a missing key cannot ship.
        self.values
            .get(key)
            .unwrap_or_else(|| panic!("config/default.toml lacks {key}"))
    }

    fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        let (value, source) = self.get(key);
        ConfigError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
            origin: source.clone(),
            reason: reason.into(),
        }
    }

    fn string(&self, key: &str) -> Result<String, ConfigError> {
        match &self.get(key).0 {
            toml::Value::String(text) => Ok(text.clone()),
            _ => Err(self.invalid(key, "expected a string")),
        }
    }

    fn bool(&self, key: &str) -> Result<bool, ConfigError> {
        match &self.get(key).0 {
            toml::Value::Boolean(flag) => Ok(*flag),
            _ => Err(self.invalid(key, "expected true or false")),
        }
    }

    fn integer(&self, key: &str, min: i64, max: i64) -> Result<i64, ConfigError> {
        match &self.get(key).0 {
            toml::Value::Integer(n) if (min..=max).contains(n) => Ok(*n),
            _ => Err(self.invalid(key, format!("expected a whole number from {min} to {max}"))),
        }
    }

    fn duration(&self, key: &str) -> Result<Duration, ConfigError> {
        let text = self.string(key)?;
        parse_duration(&text).map_err(|reason| self.invalid(key, reason))
    }

    fn build(&self) -> Result<Settings, ConfigError> {
        let url = self.string("database.url")?;
        let url = if url.trim().is_empty() {
            None
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(url)
        } else {
            // The value may hold a password: name the key and the scheme only.
            let (_, source) = self.get("database.url");
            return Err(ConfigError::Invalid {
                key: "database.url".into(),
                value: quote(&redact_url(&url)),
                origin: source.clone(),
                reason: "expected a postgres:// or postgresql:// URL".into(),
            });
        };
        let database = DatabaseSettings {
            url,
            migrate: self.bool("database.migrate")?,
            max_connections: self.integer("database.max_connections", 1, 10_000)? as u32,
            connect_timeout: self.positive_duration("database.connect_timeout")?,
            max_backoff: self.positive_duration("database.max_backoff")?,
        };

        let data_dir = self.string("embedded.data_dir")?;
        if data_dir.trim().is_empty() {
            return Err(self.invalid("embedded.data_dir", "expected a folder path"));
        }
        let bin_dir = self.string("embedded.bin_dir")?;
        let embedded = EmbeddedSettings {
            data_dir: PathBuf::from(data_dir),
            bin_dir: (!bin_dir.trim().is_empty()).then(|| PathBuf::from(bin_dir)),
            start_timeout: self.positive_duration("embedded.start_timeout")?,
        };

        let level = self.string("log.level")?;
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() || level.trim().is_empty() {
            return Err(self.invalid(
                "log.level",
                "expected trace, debug, info, warn, error or a tracing filter",
            ));
        }
        let format = match self.string("log.format")?.as_str() {
            "auto" => LogFormat::Auto,
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            _ => return Err(self.invalid("log.format", "expected auto, json or text")),
        };
        let log = LogSettings { level, format };

        let id = self.string("worker.id")?;
        let id = id.trim();
        if id.chars().any(|c| c.is_control()) || id.len() > 200 {
            return Err(self.invalid("worker.id", "expected at most 200 printable characters"));
        }
        let worker = WorkerSettings {
            id: if id.is_empty() {
                default_worker_id()
            } else {
                id.to_string()
            },
            concurrency: self.integer("worker.concurrency", 1, 10_000)? as usize,
        };

        let scheduler = SchedulerSettings {
            poll_interval: self.positive_duration("scheduler.poll_interval")?,
            batch_size: self.integer("scheduler.batch_size", 1, 10_000)? as usize,
            misfire_grace: self.duration("scheduler.misfire_grace")?,
            misfire_policy: match self.string("scheduler.misfire_policy")?.as_str() {
                "coalesce" => MisfirePolicy::Coalesce,
                "skip" => MisfirePolicy::Skip,
                _ => {
                    return Err(
                        self.invalid("scheduler.misfire_policy", "expected coalesce or skip")
                    );
                }
            },
            overlap_policy: match self.string("scheduler.overlap_policy")?.as_str() {
                "skip" => OverlapPolicy::Skip,
                "allow" => OverlapPolicy::Allow,
                _ => return Err(self.invalid("scheduler.overlap_policy", "expected skip or allow")),
            },
        };
        let requests = RequestSettings {
            max_pending_per_user: self.integer("requests.max_pending_per_user", 1, 1_000_000)?
                as u32,
        };
        let ttl = self.positive_duration("lease.ttl")?;
        if ttl < Duration::from_secs(1) {
            return Err(self.invalid("lease.ttl", "expected at least 1s"));
        }
        let lease = LeaseSettings { ttl };
        let shutdown = ShutdownSettings {
            grace: self.duration("shutdown.grace")?,
        };
        let executor_name = |key: &str, name: &str| {
            ExecutorKind::parse(name)
                .ok_or_else(|| self.invalid(key, "expected builtin or command"))
        };
        let default = executor_name("executor.default", &self.string("executor.default")?)?;
        let mut by_category = std::collections::HashMap::new();
        match &self.get("executor.by_category").0 {
            toml::Value::Table(table) => {
                for (category, name) in table {
                    let kind = name.as_str().and_then(ExecutorKind::parse).ok_or_else(|| {
                        self.invalid(
                            "executor.by_category",
                            format!("category {category:?}: expected builtin or command"),
                        )
                    })?;
                    by_category.insert(category.clone(), kind);
                }
            }
            _ => {
                return Err(self.invalid(
                    "executor.by_category",
                    "expected a table such as { research = \"command\" }",
                ));
            }
        }
        let run_timeout = self.positive_duration("executor.timeout")?;
        let route_with_model = match self.string("executor.team_router")?.as_str() {
            "words" => false,
            "openai" => true,
            _ => return Err(self.invalid("executor.team_router", "expected words or openai")),
        };
        let executor = ExecutorChoice {
            default,
            by_category,
            timeout: run_timeout,
            route_with_model,
        };

        let program = match &self.get("executors.command.program").0 {
            toml::Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| {
                    self.invalid("executors.command.program", "expected an array of strings")
                })?,
            _ => {
                return Err(self.invalid(
                    "executors.command.program",
                    "expected an array of strings such as [\"python3\", \"agent.py\"]",
                ));
            }
        };
        let uses_command = executor.default == ExecutorKind::Command
            || executor
                .by_category
                .values()
                .any(|k| *k == ExecutorKind::Command);
        if uses_command && program.is_empty() {
            return Err(self.invalid(
                "executors.command.program",
                "the command executor is chosen in [executor] but no program is configured",
            ));
        }
        let command_timeout = if self.string("executors.command.timeout")?.trim().is_empty() {
            run_timeout
        } else {
            self.positive_duration("executors.command.timeout")?
        };
        let chosen = |kind: ExecutorKind| {
            executor.default == kind || executor.by_category.values().any(|k| *k == kind)
        };
        let mut model_by_category = std::collections::HashMap::new();
        match &self.get("executors.openai.model_by_category").0 {
            toml::Value::Table(table) => {
                for (category, model) in table {
                    let model = model.as_str().ok_or_else(|| {
                        self.invalid(
                            "executors.openai.model_by_category",
                            format!("category {category:?}: expected a model name"),
                        )
                    })?;
                    model_by_category.insert(category.clone(), model.to_string());
                }
            }
            _ => {
                return Err(self.invalid(
                    "executors.openai.model_by_category",
                    "expected a table such as { research = \"gpt-4o\" }",
                ));
            }
        }
        let base_url = self.string("executors.openai.base_url")?;
        if (chosen(ExecutorKind::OpenAi) || executor.route_with_model)
            && !(base_url.starts_with("http://") || base_url.starts_with("https://"))
        {
            return Err(self.invalid(
                "executors.openai.base_url",
                "expected an http:// or https:// URL",
            ));
        }
        let api_key_env = self.string("executors.openai.api_key_env")?;
        let openai = OpenAiExecutorSettings {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: self.string("executors.openai.model")?,
            model_by_category,
            api_key: self.env_value(&api_key_env),
            max_reply_bytes: self.integer(
                "executors.openai.max_reply_bytes",
                1,
                i64::from(u32::MAX),
            )? as usize,
        };
        let webhook_url = self.string("executors.webhook.url")?;
        let secret_env = self.string("executors.webhook.secret_env")?;
        let secret_env_name = secret_env.clone();
        let webhook = WebhookExecutorSettings {
            secret: self.env_value(&secret_env),
            url: webhook_url,
            secret_env,
        };
        if chosen(ExecutorKind::Webhook) {
            if !(webhook.url.starts_with("http://") || webhook.url.starts_with("https://")) {
                return Err(self.invalid(
                    "executors.webhook.url",
                    "the webhook executor is chosen in [executor]; expected an http:// or https:// URL",
                ));
            }
            if webhook.secret.is_none() {
                return Err(self.invalid(
                    "executors.webhook.secret_env",
                    "the webhook executor is chosen but this environment variable is not set",
                ));
            }
        }
        let executors = ExecutorSettings {
            http: HttpClientSettings {
                connect_timeout: self.positive_duration("executors.http.connect_timeout")?,
                read_timeout: self.positive_duration("executors.http.read_timeout")?,
            },
            openai,
            webhook,
            builtin: BuiltinExecutorSettings {
                step_delay: self.duration("executors.builtin.step_delay")?,
                noop_lines: self.integer("executors.builtin.noop_lines", 0, 10_000_000)? as u64,
            },
            command: CommandExecutorSettings {
                program,
                timeout: command_timeout,
                variables_in_input: self.bool("executors.command.variables_in_input")?,
                kill_grace: self.duration("executors.command.kill_grace")?,
                refused_env: self.names("executors.command.refused_env")?,
                uid_range: self.uid_range("executors.command.uid_range")?,
                runs_dir: {
                    let dir = self.string("executors.command.runs_dir")?;
                    (!dir.trim().is_empty()).then(|| PathBuf::from(dir.trim()))
                },
                max_processes: self.integer("executors.command.max_processes", 1, 1_000_000)?
                    as u64,
            },
        };
        let logs = LogLimitSettings {
            max_lines_per_run: self.integer("logs.max_lines_per_run", 1, i64::MAX)? as u64,
            max_bytes_per_run: self.integer("logs.max_bytes_per_run", 1, i64::MAX)? as u64,
        };
        let artifacts_dir = self.string("artifacts.dir")?;
        if artifacts_dir.trim().is_empty() {
            return Err(self.invalid("artifacts.dir", "expected a folder path"));
        }
        let artifacts_url = self.string("artifacts.url")?;
        let artifacts_url = artifacts_url.trim();
        let url = if artifacts_url.is_empty() {
            None
        } else if !artifacts_url.starts_with("s3://") || artifacts_url.len() <= "s3://".len() {
            return Err(self.invalid(
                "artifacts.url",
                "expected an s3://bucket/prefix URL, or empty",
            ));
        } else if !cfg!(feature = "s3") {
            return Err(self.invalid(
                "artifacts.url",
                "this agentd was built without the s3 feature (cargo build --features s3)",
            ));
        } else {
            Some(artifacts_url.to_string())
        };
        let mut s3_options: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(name, _)| name.starts_with("AWS_"))
            .map(|(name, value)| (name.to_lowercase(), value.clone()))
            .collect();
        s3_options.sort();
        let artifacts = ArtifactSettings {
            dir: PathBuf::from(artifacts_dir),
            url,
            s3_options,
            max_bytes: self.integer("artifacts.max_bytes", 1, i64::MAX)? as u64,
            max_bytes_per_run: self.integer("artifacts.max_bytes_per_run", 1, i64::MAX)? as u64,
        };
        let listen = self.string("http.listen")?;
        let token_env = self.string("http.token_env")?;
        let token = if token_env.trim().is_empty() {
            None
        } else {
            let name = token_env.trim();
            let value = self.env_value(name).ok_or_else(|| {
                self.invalid(
                    "http.token_env",
                    format!("the environment variable {name} is not set or empty"),
                )
            })?;
            Some(BearerToken::parse(&value).map_err(|reason| {
                self.invalid(
                    "http.token_env",
                    format!("the token in the environment variable {name} {reason}"),
                )
            })?)
        };
        let http = HttpSettings {
            listen: if listen.trim().is_empty() {
                None
            } else {
                Some(listen.trim().parse().map_err(|_| {
                    self.invalid(
                        "http.listen",
                        "expected an address and port such as \"127.0.0.1:9464\", or empty",
                    )
                })?)
            },
            token,
        };
        let retention = RetentionSettings {
            run_logs: self.optional_age("retention.run_logs")?,
            artifacts: self.optional_age("retention.artifacts")?,
            runs: self.optional_age("retention.runs")?,
            interval: self.positive_duration("retention.interval")?,
            batch_size: self.integer("retention.batch_size", 1, 100_000)? as u32,
        };

        let mut secret_variables: Vec<String> = [
            "DATABASE_URL",
            "AGENTD__DATABASE__URL",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_ACCESS_KEY_ID",
        ]
        .into_iter()
        .map(String::from)
        .chain([api_key_env.trim(), secret_env_name.trim(), token_env.trim()].map(String::from))
        .filter(|name| !name.is_empty() && self.env.contains_key(name))
        .collect();
        secret_variables.sort();
        secret_variables.dedup();

        Ok(Settings {
            secret_variables,
            database,
            embedded,
            log,
            worker,
            scheduler,
            requests,
            lease,
            shutdown,
            executor,
            executors,
            logs,
            artifacts,
            http,
            retention,
        })
    }

    /// `FIRST-LAST`: a range of unprivileged uids (at least 1000, at most 4294967294).
    fn uid_range(&self, key: &str) -> Result<(u32, u32), ConfigError> {
        let text = self.string(key)?;
        let expected = "expected a range of uids such as \"100000-165535\" (from 1000 up, first not above last)";
        let (first, last) = text
            .trim()
            .split_once('-')
            .ok_or_else(|| self.invalid(key, expected))?;
        let parse = |part: &str| part.trim().parse::<u32>().ok();
        match (parse(first), parse(last)) {
            (Some(first), Some(last)) if first >= 1000 && first <= last && last < u32::MAX => {
                Ok((first, last))
            }
            _ => Err(self.invalid(key, expected)),
        }
    }

    /// A list of environment variable names or prefixes (`NAME`, `PREFIX_*`).
    fn names(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        let expected =
            "expected an array of names or prefixes such as [\"MY_TOOL_*\", \"SECRET_CONFIG\"]";
        let toml::Value::Array(items) = &self.get(key).0 else {
            return Err(self.invalid(key, expected));
        };
        items
            .iter()
            .map(|item| match item.as_str() {
                Some(name) if crate::executor::environment::is_pattern(name) => {
                    Ok(name.to_string())
                }
                _ => Err(self.invalid(key, expected)),
            })
            .collect()
    }

    /// The value of an environment variable named by a setting, if set and not empty.
    fn env_value(&self, name: &str) -> Option<String> {
        self.env
            .get(name.trim())
            .filter(|value| !value.is_empty())
            .cloned()
    }

    /// A retention age: empty means keep forever; otherwise a duration above zero.
    fn optional_age(&self, key: &str) -> Result<Option<Duration>, ConfigError> {
        if self.string(key)?.trim().is_empty() {
            return Ok(None);
        }
        self.positive_duration(key).map(Some)
    }

    fn positive_duration(&self, key: &str) -> Result<Duration, ConfigError> {
        let duration = self.duration(key)?;
        if duration.is_zero() {
            return Err(self.invalid(key, "expected a duration above zero"));
        }
        Ok(duration)
    }
}

/// Parses a duration written like `500ms`, `30s`, `15m`, `2h`, `30d` (or combinations such
/// as `1h 30m`). The error says what is expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|_| {
        "expected a duration such as \"500ms\", \"30s\", \"15m\", \"2h\" or \"30d\"".into()
    })
}

/// `host-pid`: distinct for every process, readable in logs.
fn default_worker_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-{}", std::process::id())
}

/// Replaces the password of a connection URL (in its user info or a `password=` query
/// parameter) with `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "***".into();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path_and_query) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:***{host}"),
                None => authority.to_string(),
            }
        }
        None => authority.to_string(),
    };
    let path_and_query = match path_and_query.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                        format!("{name}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => path_and_query.to_string(),
    };
    format!("{scheme}{authority}{path_and_query}")
}

/// The dotted keys the text of a configuration file sets, as agentd reads them (a map
/// setting such as `executor.by_category` counts as one key). For checking deployment files.
pub fn file_keys(text: &str) -> Result<Vec<String>, ConfigError> {
    Ok(flatten(&parse_toml(text, "configuration file")?)
        .into_iter()
        .map(|(key, _)| key)
        .collect())
}

fn parse_toml(text: &str, name: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|error| ConfigError::Syntax {
            path: name.to_string(),
            reason: error.message().replace('\n', " "),
        })
}

/// Keys whose value is a table with free-form keys (such as a map of categories): they are
/// one setting, not sections.
const MAP_KEYS: &[&str] = &["executor.by_category", "executors.openai.model_by_category"];

/// `section.key` (or `section.sub.key`) → value, for every setting in `table`.
fn flatten(table: &toml::Table) -> Vec<(String, toml::Value)> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
        for (name, value) in table {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match value {
                toml::Value::Table(inner) if !MAP_KEYS.contains(&key.as_str()) => {
                    walk(&key, inner, out)
                }
                other => out.push((key, other.clone())),
            }
        }
    }
    let mut out = Vec::new();
    walk("", table, &mut out);
    out
}

/// Every setting's key, in the order of config/default.toml's sections (for docs checks).
pub fn default_keys() -> Vec<String> {
    DEFAULT_TOML
        .parse::<toml::Table>()
        .map(|table| flatten(&table).into_iter().map(|(key, _)| key).collect())
        .unwrap_or_default()
}

/// Reads a non-string environment value as a TOML value (`10`, `true`, `["a","b"]`).
fn parse_env_value(raw: &str) -> Option<toml::Value> {
    let document = format!("value = {raw}");
    let mut table = document.parse::<toml::Table>().ok()?;
    table.remove("value")
}

fn type_name(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "a whole number",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array such as [\"a\", \"b\"]",
        toml::Value::Table(_) => "a table such as { key = \"value\" }",
    }
}

fn quote(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
             AGENTD__DATABASE__MAX_CONNECTIONS): expected a whole number"
        );
        let error = Settings::load(None, &env(&[("AGENTD__DATABASE__MAX_BACKOFF", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("config: database.max_backoff = \"soon\""),
            "{error}"
        );
        let error = Settings::load(None, &env(&[("AGENTD__LOG__FORMAT", "xml")]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("log.format = \"xml\"") && error.contains("expected auto, json or text")
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
}
