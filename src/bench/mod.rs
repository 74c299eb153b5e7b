//! `agentd bench`: measures the real worker (separate `agentd run` processes with the
//! builtin executor in its no-op mode, or at the daemon's defaults, or, for chat, the
//! openai executor against a model served by the bench itself) on a scratch database of
//! the configured server (or the embedded one), and, in the same invocation, the ceiling
//! of that server: the same rows written by plain SQL in batches.
//!
//! This file is the runner: the options, the helpers the scenarios share, the list of
//! scenarios, the report and the check against the targets. Each scenario is a file of its
//! own that runs on a fresh scratch database (dropped afterwards) and returns a typed
//! report:
//! - [`burst`]: N schedules due at the same instant.
//! - [`defaults`]: the same burst on replicas started as plain `agentd run`, at the
//!   daemon's defaults.
//! - [`steady`]: F fires per second for D seconds.
//! - [`throughput`]: a backlog of due schedules, against the ceiling.
//! - [`logs`]: runs that each emit L lines, against the ceiling.
//! - [`idle`]: 100,000 schedules none due for an hour.
//! - [`chat`]: conversations answered by a streaming model: how soon turns start and
//!   replies show text, and what a reply costs.
//! - [`waiting`]: the memory a run costs its replica while it waits.
//! - [`scale`]: the claim's time with 10k, 100k and 1M schedules in the table.
//!
//! [`fleet`] starts the replicas and reads what they cost; [`chart`] draws the lag chart;
//! [`model`] is the chat scenario's streaming model.
//! docs/benchmarks.md has the figures and how to read them.

pub mod burst;
pub mod chart;
pub mod chat;
pub mod defaults;
pub mod fleet;
pub mod idle;
pub mod logs;
pub mod model;
pub mod scale;
pub mod steady;
pub mod throughput;
pub mod waiting;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Args;
use clap::builder::{PossibleValue, RangedU64ValueParser};
use serde::{Serialize, Serializer};
use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::database::{Database, MIGRATE_CONNECT_PATIENCE};
use crate::store;
use crate::store::bench::RunSpan;
use burst::BurstReport;
use chat::ChatReport;
use defaults::DefaultsReport;
use fleet::{Fleet, FleetOptions};
use idle::IdleReport;
use logs::LogsReport;
use scale::ScaleReport;
use steady::SteadyReport;
use throughput::ThroughputReport;
use waiting::WaitingReport;

/// One scenario of the bench; its name is its value of `--scenario`, its section of the
/// report and its targets' `scenario`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// See [`burst`].
    Burst,
    /// See [`defaults`].
    Defaults,
    /// See [`steady`].
    Steady,
    /// See [`throughput`].
    Throughput,
    /// See [`logs`].
    Logs,
    /// See [`idle`].
    Idle,
    /// See [`chat`].
    Chat,
    /// See [`waiting`].
    Waiting,
    /// See [`scale`].
    Scale,
}

impl Scenario {
    /// Every scenario, in the order they run and print.
    pub const EVERY: [Scenario; 9] = [
        Scenario::Burst,
        Scenario::Defaults,
        Scenario::Steady,
        Scenario::Throughput,
        Scenario::Logs,
        Scenario::Idle,
        Scenario::Chat,
        Scenario::Waiting,
        Scenario::Scale,
    ];

    /// The scenario's name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Burst => "burst",
            Scenario::Defaults => "defaults",
            Scenario::Steady => "steady",
            Scenario::Throughput => "throughput",
            Scenario::Logs => "logs",
            Scenario::Idle => "idle",
            Scenario::Chat => "chat",
            Scenario::Waiting => "waiting",
            Scenario::Scale => "scale",
        }
    }
}

impl Serialize for Scenario {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// One value of `--scenario`: a scenario, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every scenario.
    All,
    /// This one.
    One(Scenario),
}

/// `all`, then every scenario: the values `--scenario` accepts, from the one list.
const SELECTIONS: [Selection; Scenario::EVERY.len() + 1] = {
    let mut selections = [Selection::All; Scenario::EVERY.len() + 1];
    let mut index = 0;
    while index < Scenario::EVERY.len() {
        selections[index + 1] = Selection::One(Scenario::EVERY[index]);
        index += 1;
    }
    selections
};

impl clap::ValueEnum for Selection {
    fn value_variants<'a>() -> &'a [Self] {
        &SELECTIONS
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(match self {
            Selection::All => "all",
            Selection::One(scenario) => scenario.name(),
        }))
    }
}

/// What `agentd bench` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchFormat {
    /// The readable table, then the JSON report.
    Both,
    Table,
    Json,
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    crate::config::parse_duration(text)
}

/// Options of `agentd bench`: the scenarios to run, their sizes, and the output.
#[derive(Debug, Clone, Args)]
pub struct BenchOptions {
    /// Scenarios, comma-separated: burst, defaults, steady, throughput, logs, idle, chat,
    /// waiting, scale, or all.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub scenario: Vec<Selection>,
    /// Replicas (separate processes) for burst, defaults, steady, throughput, logs and
    /// chat.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Most runs at once in each replica (its worker.max_runs and the builtin and openai
    /// executors' concurrency); the daemon's defaults are 5000, 5000 and 500. Not for
    /// defaults and waiting, whose replicas run at the defaults.
    #[arg(long, default_value_t = 5000)]
    pub concurrency: usize,
    /// burst and defaults: schedules due at the same instant.
    #[arg(long, default_value_t = 10_000)]
    pub schedules: i64,
    /// steady: fires per second.
    #[arg(long, default_value_t = 1_000)]
    pub fires_per_second: i64,
    /// steady: how long the rate is held.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    pub duration: Duration,
    /// throughput: due schedules in the backlog (and rows of the ceiling).
    #[arg(long, default_value_t = 20_000)]
    pub backlog: i64,
    /// logs: runs.
    #[arg(long, default_value_t = 20)]
    pub runs: i64,
    /// logs: lines each run emits.
    #[arg(long, default_value_t = 50_000)]
    pub lines: i64,
    /// idle: schedules in the table (none due within the hour).
    #[arg(long, default_value_t = 100_000)]
    pub idle_schedules: i64,
    /// idle: how long the idle replica is watched.
    #[arg(long, default_value = "60s", value_parser = duration_arg)]
    pub idle_window: Duration,
    /// scale: table sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    pub scale_sizes: Vec<i64>,
    /// chat: conversations, one question each.
    #[arg(long, default_value_t = 1_000, value_parser = RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub conversations: usize,
    /// chat: the questions are written evenly over this long, one statement each.
    #[arg(long, default_value = "5s", value_parser = duration_arg)]
    pub message_spread: Duration,
    /// chat: chunks of text the model streams per answer.
    #[arg(long, default_value_t = 50, value_parser = RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    pub chunks: usize,
    /// chat: time between two chunks (the first comes this long after the request).
    #[arg(long, default_value = "100ms", value_parser = duration_arg)]
    pub chunk_interval: Duration,
    /// waiting: runs waiting at once in the replica, for each executor measured.
    #[arg(long, default_value_t = 500, value_parser = RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub waiting_runs: usize,
    /// Write the lag chart (SVG) here.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// `both` (table then JSON), `table` or `json`.
    #[arg(long, value_enum, default_value = "both")]
    pub format: BenchFormat,
}

impl BenchOptions {
    fn wants(&self, scenario: Scenario) -> bool {
        self.scenario.iter().any(|selection| match selection {
            Selection::All => true,
            Selection::One(one) => *one == scenario,
        })
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Seconds as milliseconds to the microsecond.
fn ms(seconds: Option<f64>) -> Option<f64> {
    seconds.map(|s| (s * 1000.0 * 1000.0).round() / 1000.0)
}

/// Milliseconds from `earlier` to `later`, to the microsecond.
fn since_ms(later: Option<DateTime<Utc>>, earlier: DateTime<Utc>) -> Option<f64> {
    later.map(|later| (later - earlier).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0)
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// From the first run's start to the last run's end, seconds (0 without runs).
fn busy_seconds(span: &RunSpan) -> f64 {
    match (span.first_start, span.last_end) {
        (Some(first), Some(last)) => (last - first).num_microseconds().unwrap_or(0) as f64 / 1e6,
        _ => 0.0,
    }
}

/// `count` per second of `seconds` (0 when no time passed).
fn per_second(count: i64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// A scratch database.
struct Scratch {
    name: String,
    url: String,
    pool: PgPool,
}

/// What every scenario works with: the settings, the options, the server, and the lags
/// the chart draws.
struct Bench<'a> {
    settings: &'a Settings,
    options: &'a BenchOptions,
    database: &'a Database,
    folder: PathBuf,
    /// Lag series for the chart.
    series: Vec<(String, Vec<f64>)>,
}

impl Bench<'_> {
    async fn scratch(&self, label: &str, connections: u32) -> anyhow::Result<Scratch> {
        let name = format!(
            "agentd_bench_{label}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        store::bench::create_database(&self.database.pool, &name).await?;
        let pool = self.connect(&name, connections).await?;
        store::migrate(&pool).await?;
        Ok(Scratch {
            url: self.database.url_of(self.settings, &name),
            name,
            pool,
        })
    }

    /// A pool of up to `connections` on database `name` of the server.
    async fn connect(&self, name: &str, connections: u32) -> anyhow::Result<PgPool> {
        let options = self.database.options_of(self.settings, name)?;
        Ok(store::pool_options(&options)
            .max_connections(connections)
            .connect_with(options)
            .await?)
    }

    async fn drop_scratch(&self, scratch: Scratch) -> anyhow::Result<()> {
        scratch.pool.close().await;
        store::bench::drop_database(&self.database.pool, &scratch.name).await?;
        Ok(())
    }

    fn fleet(&self, scratch: &Scratch, replicas: usize, noop_lines: i64) -> anyhow::Result<Fleet> {
        self.fleet_with(scratch, replicas, noop_lines, Vec::new())
    }

    /// [`Self::fleet`] with more settings (`AGENTD__…` variables) for its replicas.
    fn fleet_with(
        &self,
        scratch: &Scratch,
        replicas: usize,
        noop_lines: i64,
        more: Vec<(String, String)>,
    ) -> anyhow::Result<Fleet> {
        let mut settings = vec![(
            "AGENTD__EXECUTORS__BUILTIN__NOOP_LINES".to_string(),
            noop_lines.to_string(),
        )];
        // --concurrency is each replica's limit, in all and for the executors benched.
        for name in [
            "AGENTD__WORKER__MAX_RUNS",
            "AGENTD__EXECUTORS__BUILTIN__CONCURRENCY",
            "AGENTD__EXECUTORS__OPENAI__CONCURRENCY",
        ] {
            settings.push((name.to_string(), self.options.concurrency.to_string()));
        }
        settings.extend(more);
        Fleet::start(&FleetOptions {
            url: &scratch.url,
            replicas,
            settings,
            folder: &self.folder,
            plain: false,
        })
    }

    /// Replicas started as a user starts `agentd run`, with the database and only the
    /// settings `more` names (see [`Fleet::start`]).
    fn plain_fleet(
        &self,
        scratch: &Scratch,
        replicas: usize,
        more: Vec<(String, String)>,
    ) -> anyhow::Result<Fleet> {
        Fleet::start(&FleetOptions {
            url: &scratch.url,
            replicas,
            settings: more,
            folder: &self.folder,
            plain: true,
        })
    }

    /// Waits until `replicas` workers registered.
    async fn registered(
        &self,
        scratch: &Scratch,
        fleet: &mut Fleet,
        replicas: usize,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while store::bench::workers_registered(&scratch.pool).await? < replicas as i64 {
            fleet.check_alive()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "bench replicas did not start within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Waits until `count` runs have an outcome. Every figure comes from the runs' own
    /// timestamps, so this only has to notice the end: it looks every 100 ms, which keeps
    /// its share of the server small (docs/benchmarks.md).
    async fn finished(
        &self,
        scratch: &Scratch,
        fleet: &mut Fleet,
        count: i64,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let finished = store::bench::finished_runs(&scratch.pool).await?;
            if finished.is_some_and(|finished| finished >= count) {
                return Ok(());
            }
            fleet.check_alive()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {} of {count} runs finished within {limit:?}",
                store::bench::run_span(&scratch.pool).await?.finished
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The machine the bench ran on, so figures from different machines are not compared
/// unawares.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct Machine {
    /// CPUs this process may use.
    pub cpus: usize,
    /// The CPU's model name (empty where /proc/cpuinfo does not say).
    pub cpu_model: String,
    /// The server's version.
    pub postgres: String,
    /// The server's `autovacuum` setting.
    pub autovacuum: String,
}

/// What `agentd bench` found: each scenario's report (absent when it did not run) and the
/// targets checked against them. Printed with [`Report::table`] and [`Report::to_json`].
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct Report {
    /// agentd's version.
    pub agentd: String,
    /// Where it ran.
    pub machine: Machine,
    /// Most runs at once in each replica (`--concurrency`).
    pub replica_concurrency: usize,
    /// `burst`, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<BurstReport>,
    /// `defaults`, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub defaults: Option<DefaultsReport>,
    /// `steady`, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steady: Option<SteadyReport>,
    /// `throughput`, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput: Option<ThroughputReport>,
    /// `logs`, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<LogsReport>,
    /// `idle`, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleReport>,
    /// `scale`, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<ScaleReport>,
    /// `chat`, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatReport>,
    /// `waiting`, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<WaitingReport>,
    /// The targets of the scenarios that ran.
    #[cfg_attr(test, serde(skip_deserializing))]
    pub targets: Vec<TargetCheck>,
    /// Where the lag chart was written, when it was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart: Option<String>,
}

/// One target of issue 1 and whether the report meets it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    /// The scenario the target is about.
    pub scenario: Scenario,
    /// The target, as a reader states it.
    pub target: &'static str,
    /// The figure judged (absent when the scenario had none).
    pub value: Option<f64>,
    /// Whether the figure meets the target (absent without a figure).
    pub met: Option<bool>,
}

impl TargetCheck {
    /// Judges `value` with `meets`. A figure JSON cannot hold (not finite) counts as none,
    /// as it prints as `null`.
    fn new(
        scenario: Scenario,
        target: &'static str,
        value: Option<f64>,
        meets: impl Fn(f64) -> bool,
    ) -> TargetCheck {
        let value = value.filter(|value| value.is_finite());
        TargetCheck {
            scenario,
            target,
            value,
            met: value.map(meets),
        }
    }
}

/// Runs the chosen scenarios and returns the report.
pub async fn run(
    settings: &Settings,
    options: &BenchOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<Report> {
    let database = Database::open(settings, Some(MIGRATE_CONNECT_PATIENCE), shutdown).await?;
    let folder = std::env::temp_dir().join(format!("agentd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&folder)?;
    let mut bench = Bench {
        settings,
        options,
        database: &database,
        folder: folder.clone(),
        series: Vec::new(),
    };
    let result = run_scenarios(&mut bench).await;
    let series = std::mem::take(&mut bench.series);
    database.close().await;
    let mut report = result?;
    if let Some(path) = &options.svg {
        std::fs::write(path, chart::lag_cdf_svg("agentd scheduling lag", &series))?;
        report.chart = Some(path.display().to_string());
    }
    let _ = std::fs::remove_dir_all(&folder);
    Ok(report)
}

async fn run_scenarios(bench: &mut Bench<'_>) -> anyhow::Result<Report> {
    let machine = Machine {
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model: std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_string())
            })
            .unwrap_or_default(),
        postgres: store::bench::server_version(&bench.database.pool).await?,
        autovacuum: store::bench::server_autovacuum(&bench.database.pool).await?,
    };
    let mut report = Report {
        agentd: env!("CARGO_PKG_VERSION").to_string(),
        machine,
        replica_concurrency: bench.options.concurrency,
        burst: None,
        defaults: None,
        steady: None,
        throughput: None,
        logs: None,
        idle: None,
        scale: None,
        chat: None,
        waiting: None,
        targets: Vec::new(),
        chart: None,
    };
    for scenario in Scenario::EVERY {
        if !bench.options.wants(scenario) {
            continue;
        }
        match scenario {
            Scenario::Burst => report.burst = Some(burst::run(bench).await?),
            Scenario::Defaults => report.defaults = Some(defaults::run(bench).await?),
            Scenario::Steady => report.steady = Some(steady::run(bench).await?),
            Scenario::Throughput => report.throughput = Some(throughput::run(bench).await?),
            Scenario::Logs => report.logs = Some(logs::run(bench).await?),
            Scenario::Idle => report.idle = Some(idle::run(bench).await?),
            Scenario::Chat => report.chat = Some(chat::run(bench).await?),
            Scenario::Waiting => report.waiting = Some(waiting::run(bench).await?),
            Scenario::Scale => report.scale = Some(scale::run(bench).await?),
        }
    }
    report.targets = targets(&report);
    Ok(report)
}

/// The targets, checked against the report's figures for every scenario that ran.
/// The targets are stated for the default sizes; a smaller run is judged all the same
/// (the table's heading says so), so only a run at the default sizes meets them.
fn targets(report: &Report) -> Vec<TargetCheck> {
    let mut checks = Vec::new();
    for scenario in Scenario::EVERY {
        match scenario {
            Scenario::Burst => {
                if let Some(burst) = &report.burst {
                    checks.push(TargetCheck::new(
                        scenario,
                        "p99 lag <= 250 ms",
                        burst.lag_p99_ms,
                        |v| v <= 250.0,
                    ));
                    checks.push(TargetCheck::new(
                        scenario,
                        "all completed within 1 s",
                        burst.all_completed_after_ms,
                        |v| v <= 1000.0,
                    ));
                }
            }
            Scenario::Defaults => {
                if let Some(defaults) = &report.defaults {
                    checks.push(TargetCheck::new(
                        scenario,
                        "p99 lag <= 1 s",
                        defaults.burst.lag_p99_ms,
                        |v| v <= 1000.0,
                    ));
                    checks.push(TargetCheck::new(
                        scenario,
                        "all completed within 2 s",
                        defaults.burst.all_completed_after_ms,
                        |v| v <= 2000.0,
                    ));
                }
            }
            Scenario::Steady => {
                if let Some(steady) = &report.steady {
                    checks.push(TargetCheck::new(
                        scenario,
                        "p99 lag <= 25 ms",
                        steady.lag_p99_ms,
                        |v| v <= 25.0,
                    ));
                }
            }
            Scenario::Throughput => {
                if let Some(throughput) = &report.throughput {
                    checks.push(TargetCheck::new(
                        scenario,
                        ">= 70% of the ceiling",
                        Some(throughput.ratio),
                        |v| v >= 0.7,
                    ));
                }
            }
            Scenario::Logs => {
                if let Some(logs) = &report.logs {
                    checks.push(TargetCheck::new(
                        scenario,
                        ">= 100,000 lines/s stored",
                        Some(logs.lines_per_second),
                        |v| v >= 100_000.0,
                    ));
                    checks.push(TargetCheck::new(
                        scenario,
                        "visible within 250 ms (p99)",
                        logs.visibility_p99_ms,
                        |v| v <= 250.0,
                    ));
                }
            }
            Scenario::Idle => {
                if let Some(idle) = &report.idle {
                    checks.push(TargetCheck::new(
                        scenario,
                        "<= 2 queries per minute",
                        Some(idle.queries_per_minute),
                        |v| v <= 2.0,
                    ));
                    checks.push(TargetCheck::new(
                        scenario,
                        "< 1% CPU",
                        Some(idle.cpu_percent),
                        |v| v < 1.0,
                    ));
                    checks.push(TargetCheck::new(
                        scenario,
                        "< 30 MiB RSS",
                        Some(idle.rss_mib),
                        |v| v < 30.0,
                    ));
                }
            }
            Scenario::Scale => {
                if let Some(scale) = &report.scale
                    && let (Some(first), Some(last)) = (scale.sizes.first(), scale.sizes.last())
                {
                    let ratio = match (first.claim_ms_median, last.claim_ms_median) {
                        (Some(a), Some(b)) if a > 0.0 => Some(round2(b / a)),
                        _ => None,
                    };
                    checks.push(TargetCheck::new(
                        scenario,
                        "claim time flat (within 2x) from smallest to largest table",
                        ratio,
                        |r| r <= 2.0,
                    ));
                }
            }
            Scenario::Chat => {
                if let Some(chat) = &report.chat {
                    checks.push(TargetCheck::new(
                        scenario,
                        "p99 turn start <= 50 ms after the message",
                        chat.start_lag_p99_ms,
                        |v| v <= 50.0,
                    ));
                    let limit = chat.stream_interval_ms + 50.0;
                    checks.push(TargetCheck::new(
                        scenario,
                        "p99 first text <= stream_interval + 50 ms after the model's",
                        chat.first_text_p99_ms,
                        move |v| v <= limit,
                    ));
                }
            }
            // A documented figure, not a target.
            Scenario::Waiting => {}
        }
    }
    checks
}

/// A value as the JSON report prints it (`null` for none).
fn json_text(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_string())
}

/// A section's fields as the JSON report names and prints them, in its (sorted) order.
fn fields(section: &impl Serialize) -> Vec<(String, String)> {
    match serde_json::to_value(section) {
        Ok(serde_json::Value::Object(fields)) => fields
            .into_iter()
            .map(|(key, value)| (key, value.to_string()))
            .collect(),
        Ok(_) | Err(_) => Vec::new(),
    }
}

impl Report {
    /// The readable report: the machine, each scenario's figures, the targets.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let machine = &self.machine;
        out.push_str(&format!(
            "agentd {} bench on {} CPU(s) ({}), PostgreSQL {} (autovacuum {}); replica concurrency {}\n",
            self.agentd,
            machine.cpus,
            machine.cpu_model,
            machine.postgres,
            machine.autovacuum,
            self.replica_concurrency,
        ));
        for scenario in Scenario::EVERY {
            let section = match scenario {
                Scenario::Burst => self.burst.as_ref().map(fields),
                Scenario::Defaults => self.defaults.as_ref().map(fields),
                Scenario::Steady => self.steady.as_ref().map(fields),
                Scenario::Throughput => self.throughput.as_ref().map(fields),
                Scenario::Logs => self.logs.as_ref().map(fields),
                Scenario::Idle => self.idle.as_ref().map(fields),
                Scenario::Chat => self.chat.as_ref().map(fields),
                Scenario::Waiting => self.waiting.as_ref().map(fields),
                // A table of its own, below.
                Scenario::Scale => None,
            };
            if let Some(fields) = section {
                out.push_str(&format!("\n{}\n", scenario.name()));
                for (key, value) in fields {
                    out.push_str(&format!("  {key:<28} {value}\n"));
                }
            }
        }
        if let Some(scale) = &self.scale {
            out.push_str("\nscale\n  schedules    claim median ms  claim p95 ms\n");
            for row in &scale.sizes {
                out.push_str(&format!(
                    "  {} {} {}\n",
                    row.schedules,
                    json_text(&row.claim_ms_median),
                    json_text(&row.claim_ms_p95),
                ));
            }
        }
        out.push_str("\ntargets (stated for the default sizes, judged on this run's figures)\n");
        for check in &self.targets {
            let met = match check.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a",
            };
            out.push_str(&format!(
                "  {:<10} {:<60} {:<12} {met}\n",
                check.scenario.name(),
                check.target,
                json_text(&check.value),
            ));
        }
        out
    }

    /// The JSON report, pretty-printed with every object's keys sorted, so reports from
    /// different runs and versions diff cleanly (docs/bench/report.json is one).
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(&serde_json::to_value(self)?)
    }

    /// What `agentd bench --format …` prints.
    pub fn render(&self, format: BenchFormat) -> serde_json::Result<String> {
        Ok(match format {
            BenchFormat::Both => format!("{}{}\n", self.table(), self.to_json()?),
            BenchFormat::Table => self.table(),
            BenchFormat::Json => format!("{}\n", self.to_json()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    const EXAMPLE: &str = include_str!("../../docs/bench/report.json");

    /// The documented example, its targets judged anew from its figures.
    fn example() -> Report {
        let mut report: Report = serde_json::from_str(EXAMPLE).unwrap();
        report.targets = targets(&report);
        report
    }

    #[test]
    fn the_json_report_is_the_documented_one() {
        assert_eq!(example().to_json().unwrap(), EXAMPLE.trim_end());
    }

    #[test]
    fn targets_are_judged_only_for_scenarios_that_ran() {
        let mut report = example();
        report.steady = None;
        report.throughput = None;
        report.logs = None;
        report.idle = None;
        let scale = report.scale.as_mut().unwrap();
        scale.sizes[0].claim_ms_median = Some(1.0);
        scale.sizes[2].claim_ms_median = Some(1.5);
        let checks = targets(&report);
        let judged: Vec<(&str, Option<bool>)> = checks
            .iter()
            .map(|check| (check.scenario.name(), check.met))
            .collect();
        assert_eq!(
            judged,
            [
                ("burst", Some(false)),
                ("burst", Some(true)),
                ("scale", Some(true))
            ]
        );
        assert_eq!(checks[2].value, Some(1.5));
    }

    #[test]
    fn a_figure_json_cannot_hold_is_no_figure() {
        let mut report = example();
        report.throughput.as_mut().unwrap().ratio = f64::NAN;
        let check = targets(&report)
            .into_iter()
            .find(|check| check.scenario == Scenario::Throughput)
            .unwrap();
        assert_eq!((check.value, check.met), (None, None));
    }

    /// A `defaults` section: 10,000 at one instant with these lag and completion figures.
    fn defaults(lag_p99_ms: f64, all_completed_after_ms: f64) -> DefaultsReport {
        serde_json::from_value(serde_json::json!({
            "schedules": 10000, "replicas": 2, "runs": 10000, "completed": 10000,
            "all_started_after_ms": lag_p99_ms, "all_completed_after_ms": all_completed_after_ms,
            "lag_p50_ms": 100.0, "lag_p99_ms": lag_p99_ms, "lag_max_ms": lag_p99_ms,
            "replica_cpu_seconds": [1.5, 1.5], "replica_peak_rss_mib": [40.0, 40.0],
            "slot_p50_ms": 20.0, "slot_p99_ms": 90.0, "artifacts": 10000,
        }))
        .unwrap()
    }

    #[test]
    fn defaults_are_judged_by_their_own_targets() {
        let judged = |report: &Report| -> Vec<(&str, &str, Option<bool>)> {
            targets(report)
                .into_iter()
                .filter(|check| matches!(check.scenario, Scenario::Burst | Scenario::Defaults))
                .map(|check| (check.scenario.name(), check.target, check.met))
                .collect()
        };
        let mut report = example();
        report.defaults = Some(defaults(600.0, 1500.0));
        let burst = report.burst.as_mut().unwrap();
        burst.lag_p99_ms = Some(600.0);
        burst.all_completed_after_ms = Some(1500.0);
        // The same figures: too slow for the no-op burst, within the defaults' targets.
        assert_eq!(
            judged(&report),
            [
                ("burst", "p99 lag <= 250 ms", Some(false)),
                ("burst", "all completed within 1 s", Some(false)),
                ("defaults", "p99 lag <= 1 s", Some(true)),
                ("defaults", "all completed within 2 s", Some(true)),
            ]
        );
        report.defaults = Some(defaults(1200.0, 2500.0));
        let missed: Vec<Option<bool>> = judged(&report)[2..].iter().map(|j| j.2).collect();
        assert_eq!(missed, [Some(false), Some(false)]);
        // The section prints its burst's figures and its own, right after `burst`'s.
        let table = report.table();
        assert!(table.contains("\ndefaults\n  all_completed_after_ms       2500.0\n"));
        assert!(table.contains("  artifacts                    10000\n"));
        assert!(table.find("\nburst\n") < table.find("\ndefaults\n"));
        assert!(table.find("\ndefaults\n") < table.find("\nsteady\n"));
    }

    /// A `chat` section with these first-text figures.
    fn chat(stream_interval_ms: f64, first_text_p99_ms: f64) -> ChatReport {
        serde_json::from_value(serde_json::json!({
            "conversations": 1000, "replicas": 2, "chunks_per_reply": 50,
            "chunk_interval_ms": 100.0, "message_spread_seconds": 5.0,
            "stream_interval_ms": stream_interval_ms, "seconds": 10.5,
            "model_requests": 1000, "turns": 1000, "replies": 1000,
            "conversations_answered": 1000, "replies_completed": 1000,
            "start_lag_samples": 1000, "start_lag_p50_ms": 4.0, "start_lag_p99_ms": 40.0,
            "start_lag_max_ms": 60.0, "first_text_samples": 1000, "first_text_p50_ms": 12.0,
            "first_text_p99_ms": first_text_p99_ms, "first_text_max_ms": 400.0,
            "replica_cpu_seconds": [1.5, 1.5], "replica_peak_rss_mib": [40.0, 40.0],
            "reply_row_writes": 26000, "writes_per_reply": 26.0,
        }))
        .unwrap()
    }

    #[test]
    fn the_first_text_target_follows_the_stream_interval() {
        let judged = |report: &Report| -> Vec<(&str, Option<bool>)> {
            targets(report)
                .into_iter()
                .filter(|check| check.scenario == Scenario::Chat)
                .map(|check| (check.target, check.met))
                .collect()
        };
        let mut report = example();
        assert_eq!(judged(&report), []);
        report.chat = Some(chat(200.0, 240.0));
        assert_eq!(
            judged(&report),
            [
                ("p99 turn start <= 50 ms after the message", Some(true)),
                (
                    "p99 first text <= stream_interval + 50 ms after the model's",
                    Some(true)
                ),
            ]
        );
        report.chat = Some(chat(100.0, 240.0));
        assert_eq!(judged(&report)[1].1, Some(false));
        // The section prints in the table, before `scale`'s.
        let table = report.table();
        assert!(table.contains("\nchat\n  chunk_interval_ms            100.0\n"));
        assert!(table.find("\nchat\n") < table.find("\nscale\n"));
    }

    #[test]
    fn the_table_lists_every_section_and_target() {
        let table = example().table();
        assert!(table.starts_with(
            "agentd 0.1.0 bench on 2 CPU(s) (Intel(R) Xeon(R) Processor), PostgreSQL 15.20 (Debian 15.20-0+deb12u1) \
             (autovacuum off); replica concurrency 1000\n"
        ));
        assert!(table.contains("\nburst\n  all_completed_after_ms       953.714\n"));
        assert!(table.contains("  replica_cpu_seconds          [0.17,0.17]\n"));
        assert!(table.contains("\nidle\n  cpu_percent                  0.07\n"));
        assert!(table.contains("  10000 0.853 5.057\n"));
        assert!(table.contains(
            "  throughput >= 70% of the ceiling                                        0.55         MISSED\n"
        ));
        assert_eq!(table.matches(" met\n").count(), 8);
    }
}
