//! `agentd bench`: measures the real worker (separate `agentd run` processes with the
//! builtin executor in its no-op mode) on a scratch database of the configured server (or
//! the embedded one), and, in the same invocation, the ceiling of that server: the same rows
//! written by plain SQL in batches.
//!
//! Scenarios (each on a fresh scratch database, dropped afterwards):
//! - `burst`: N schedules due at the same instant; time until all started and completed,
//!   and the scheduling lag (start_time − scheduled_for).
//! - `steady`: F fires per second for D seconds; achieved rate, lag, CPU and memory.
//! - `throughput`: a backlog of due schedules; completed runs per second, and the ceiling
//!   (measured before and after agentd, averaged).
//! - `logs`: runs that each emit L lines; lines stored per second, delay to visibility,
//!   and the ceiling (the same lines by plain SQL).
//! - `idle`: 100,000 schedules none due for an hour; queries per minute, CPU, memory.
//! - `scale`: the claim's time with 10k, 100k and 1M schedules in the table.

pub mod chart;
pub mod fleet;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Timelike, Utc};
use clap::Args;
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Settings;
use crate::database::{Database, MIGRATE_CONNECT_PATIENCE};
use crate::store;
use fleet::{Fleet, FleetOptions};

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    All,
    Burst,
    Steady,
    Throughput,
    Logs,
    Idle,
    Scale,
}

/// What `agentd bench` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchFormat {
    /// The readable table, then the JSON report.
    Both,
    Table,
    Json,
}

/// Wait after the idle replica started before counting (see `idle`).
const IDLE_SETTLE: Duration = Duration::from_secs(15);

fn duration_arg(text: &str) -> Result<Duration, String> {
    crate::config::parse_duration(text)
}

/// Options of `agentd bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Scenarios, comma-separated: burst, steady, throughput, logs, idle, scale, or all.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub scenario: Vec<Scenario>,
    /// Replicas (separate processes) for burst, steady, throughput and logs.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// worker.concurrency of each replica. The no-op runs take microseconds, so the
    /// default is far above the daemon's (16), which is sized for real agents.
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    /// burst: schedules due at the same instant.
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
    /// Write the lag chart (SVG) here.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// `both` (table then JSON), `table` or `json`.
    #[arg(long, value_enum, default_value = "both")]
    pub format: BenchFormat,
}

impl BenchArgs {
    fn wants(&self, scenario: Scenario) -> bool {
        self.scenario.contains(&Scenario::All) || self.scenario.contains(&scenario)
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

fn ms(seconds: Option<f64>) -> Value {
    seconds.map_or(Value::Null, |s| {
        json!((s * 1000.0 * 1000.0).round() / 1000.0)
    })
}

fn since_ms(later: Option<DateTime<Utc>>, earlier: DateTime<Utc>) -> Value {
    later.map_or(Value::Null, |later| {
        json!((later - earlier).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0)
    })
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// A scratch database.
struct Scratch {
    name: String,
    url: String,
    pool: PgPool,
}

struct Bench<'a> {
    settings: &'a Settings,
    args: &'a BenchArgs,
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
        let options = self.database.options_of(self.settings, &name)?;
        let pool = store::pool_options(&options)
            .max_connections(connections)
            .connect_with(options)
            .await?;
        store::migrate(&pool).await?;
        Ok(Scratch {
            url: self.database.url_of(self.settings, &name),
            name,
            pool,
        })
    }

    async fn drop_scratch(&self, scratch: Scratch) -> anyhow::Result<()> {
        scratch.pool.close().await;
        store::bench::drop_database(&self.database.pool, &scratch.name).await?;
        Ok(())
    }

    fn fleet(&self, scratch: &Scratch, replicas: usize, noop_lines: i64) -> anyhow::Result<Fleet> {
        let mut settings = vec![(
            "AGENTD__EXECUTORS__BUILTIN__NOOP_LINES".to_string(),
            noop_lines.to_string(),
        )];
        settings.push((
            "AGENTD__WORKER__CONCURRENCY".to_string(),
            self.args.concurrency.to_string(),
        ));
        Fleet::start(&FleetOptions {
            url: &scratch.url,
            replicas,
            settings,
            folder: &self.folder,
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
    /// its share of the server small (`pg_stat_statements`: 189 looks at 1.4 ms each during
    /// one 20,000-run `throughput` when it looked every 20 ms).
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

    async fn burst(&mut self) -> anyhow::Result<Value> {
        let n = self.args.schedules;
        let replicas = self.args.replicas;
        let scratch = self.scratch("burst", 4).await?;
        let (_, agent) = store::bench::seed_agent(&scratch.pool).await?;
        let mut fleet = self.fleet(&scratch, replicas, 1)?;
        self.registered(&scratch, &mut fleet, replicas).await?;
        // One instant a little ahead, a whole second, that is a slot of the rule.
        let lead = Duration::from_secs(2) + Duration::from_millis((n / 20).max(0) as u64);
        let at = (Utc::now() + lead).trunc_subsecs(0) + chrono::Duration::seconds(1);
        let cron = format!("{} {} {} * * *", at.second(), at.minute(), at.hour());
        store::bench::insert_cron_schedules(&scratch.pool, agent, n, &cron, Some(at)).await?;
        self.finished(
            &scratch,
            &mut fleet,
            n,
            Duration::from_secs(60) + Duration::from_millis(n as u64 * 10),
        )
        .await?;
        let costs = fleet.costs();
        fleet.stop(Duration::from_secs(30));
        let span = store::bench::run_span(&scratch.pool).await?;
        let lags =
            store::bench::scheduling_lags(&scratch.pool, at, at + chrono::Duration::seconds(1))
                .await?;
        self.drop_scratch(scratch).await?;
        let result = json!({
            "schedules": n,
            "replicas": replicas,
            "runs": span.runs,
            "completed": span.completed,
            "all_started_after_ms": since_ms(span.last_start, at),
            "all_completed_after_ms": since_ms(span.last_end, at),
            "lag_p50_ms": ms(percentile(&lags, 50.0)),
            "lag_p99_ms": ms(percentile(&lags, 99.0)),
            "lag_max_ms": ms(lags.last().copied()),
            "replica_cpu_seconds": costs.iter().map(|c| round2(c.cpu_seconds)).collect::<Vec<_>>(),
            "replica_peak_rss_mib": costs.iter().map(|c| round2(c.peak_rss_mib)).collect::<Vec<_>>(),
        });
        self.series.push((format!("burst ({n} at once)"), lags));
        Ok(result)
    }

    async fn steady(&mut self) -> anyhow::Result<Value> {
        const PERIOD: i64 = 10;
        let rate = self.args.fires_per_second.max(1);
        let window = self.args.duration.max(Duration::from_secs(1));
        let replicas = self.args.replicas;
        let scratch = self.scratch("steady", 4).await?;
        let (_, agent) = store::bench::seed_agent(&scratch.pool).await?;
        // `rate` schedules in each of PERIOD groups; group g fires at seconds ≡ g (mod PERIOD).
        for group in 0..PERIOD {
            let cron = format!("{group}-59/{PERIOD} * * * * *");
            store::bench::insert_cron_schedules(&scratch.pool, agent, rate, &cron, None).await?;
        }
        store::bench::analyze(&scratch.pool).await?;
        let mut fleet = self.fleet(&scratch, replicas, 1)?;
        self.registered(&scratch, &mut fleet, replicas).await?;
        // Warm up: every schedule planned and firing.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let from = (Utc::now()).trunc_subsecs(0) + chrono::Duration::seconds(1);
        let to = from + chrono::Duration::from_std(window)?;
        tokio::time::sleep((from - Utc::now()).to_std().unwrap_or_default()).await;
        let before = fleet.costs();
        tokio::time::sleep(window).await;
        let after = fleet.costs();
        // Let the last slots of the window start.
        tokio::time::sleep(Duration::from_secs(2)).await;
        fleet.check_alive()?;
        store::bench::disable_schedules(&scratch.pool).await?;
        fleet.stop(Duration::from_secs(30));
        let lags = store::bench::scheduling_lags(&scratch.pool, from, to).await?;
        self.drop_scratch(scratch).await?;
        let seconds = window.as_secs_f64();
        let cpu: Vec<f64> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| round2((a.cpu_seconds - b.cpu_seconds) / seconds * 100.0))
            .collect();
        let result = json!({
            "target_fires_per_second": rate,
            "seconds": seconds,
            "replicas": replicas,
            "fired": lags.len(),
            "expected": rate * window.as_secs() as i64,
            "achieved_fires_per_second": round2(lags.len() as f64 / seconds),
            "lag_p50_ms": ms(percentile(&lags, 50.0)),
            "lag_p99_ms": ms(percentile(&lags, 99.0)),
            "lag_max_ms": ms(lags.last().copied()),
            "replica_cpu_percent": cpu,
            "replica_peak_rss_mib": after.iter().map(|c| round2(c.peak_rss_mib)).collect::<Vec<_>>(),
        });
        self.series
            .push((format!("steady ({rate}/s for {seconds:.0} s)"), lags));
        Ok(result)
    }

    async fn throughput(&mut self) -> anyhow::Result<Value> {
        let n = self.args.backlog;
        let replicas = self.args.replicas;
        let due = Utc::now().trunc_subsecs(0) - chrono::Duration::seconds(1);
        let cron = format!("{} {} {} * * *", due.second(), due.minute(), due.hour());
        // The ceiling is measured before and after agentd, and the two averaged: the
        // machine's speed drifts, and a short phase measured once can land on a slow or a
        // fast moment.
        let ceiling_before = self.ceiling(n, &cron, due).await?;
        let scratch = self.scratch("throughput", 4).await?;
        let (_, agent) = store::bench::seed_agent(&scratch.pool).await?;
        store::bench::insert_cron_schedules(&scratch.pool, agent, n, &cron, Some(due)).await?;
        store::bench::analyze(&scratch.pool).await?;
        let mut fleet = self.fleet(&scratch, replicas, 1)?;
        self.finished(
            &scratch,
            &mut fleet,
            n,
            Duration::from_secs(120) + Duration::from_millis(n as u64 * 10),
        )
        .await?;
        fleet.stop(Duration::from_secs(30));
        let span = store::bench::run_span(&scratch.pool).await?;
        self.drop_scratch(scratch).await?;
        let seconds = match (span.first_start, span.last_end) {
            (Some(first), Some(last)) => {
                (last - first).num_microseconds().unwrap_or(0) as f64 / 1e6
            }
            _ => 0.0,
        };
        let rate = if seconds > 0.0 {
            n as f64 / seconds
        } else {
            0.0
        };

        let ceiling_rate = (ceiling_before + self.ceiling(n, &cron, due).await?) / 2.0;
        Ok(json!({
            "backlog": n,
            "replicas": replicas,
            "completed": span.completed,
            "seconds": round2(seconds),
            "runs_per_second": round2(rate),
            "ceiling_batch": self.settings.scheduler.batch_size,
            "ceiling_runs_per_second": round2(ceiling_rate),
            "ratio": round2(rate / ceiling_rate),
        }))
    }

    /// The ceiling of `throughput`: the same rows by plain SQL, in batches of
    /// `scheduler.batch_size`, on as many connections as replicas; runs per second.
    async fn ceiling(&self, n: i64, cron: &str, due: DateTime<Utc>) -> anyhow::Result<f64> {
        // The ceiling: the same rows by plain SQL, in batches, as many connections as
        // replicas.
        let replicas = self.args.replicas;
        let ceiling = self.scratch("ceiling", replicas as u32).await?;
        let (_, agent) = store::bench::seed_agent(&ceiling.pool).await?;
        store::bench::insert_cron_schedules(&ceiling.pool, agent, n, cron, Some(due)).await?;
        store::bench::analyze(&ceiling.pool).await?;
        let batch = self.settings.scheduler.batch_size as i64;
        let started = Instant::now();
        let mut writers = Vec::new();
        for _ in 0..replicas {
            let pool = ceiling.pool.clone();
            writers.push(tokio::spawn(async move {
                loop {
                    let runs = store::bench::ceiling_fire(&pool, batch).await?;
                    if runs.is_empty() {
                        return Ok::<_, store::StoreError>(());
                    }
                    store::bench::ceiling_complete(&pool, &runs).await?;
                }
            }));
        }
        for writer in writers {
            writer.await??;
        }
        let seconds = started.elapsed().as_secs_f64();
        let ceiling_done = store::bench::finished_runs(&ceiling.pool)
            .await?
            .unwrap_or_default();
        self.drop_scratch(ceiling).await?;
        anyhow::ensure!(
            ceiling_done == n,
            "the ceiling completed {ceiling_done} of {n} runs"
        );
        Ok(n as f64 / seconds)
    }

    async fn logs(&mut self) -> anyhow::Result<Value> {
        let runs = self.args.runs;
        let lines = self.args.lines;
        let replicas = self.args.replicas;
        let scratch = self.scratch("logs", 4).await?;
        let (user, agent) = store::bench::seed_agent(&scratch.pool).await?;
        let mut fleet = self.fleet(&scratch, replicas, lines)?;
        self.registered(&scratch, &mut fleet, replicas).await?;
        // Visibility: how old the newest stored line is, sampled every 10 ms while the
        // runs write.
        let stop = CancellationToken::new();
        let sampler = {
            let pool = scratch.pool.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut ages = Vec::new();
                while !stop.is_cancelled() {
                    if let Ok(Some(age)) = store::bench::newest_log_age(&pool).await {
                        ages.push(age.max(0.0));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // Runs short enough to finish between two samples (their lines arrive with
                // their outcome): one sample at the end, an upper bound.
                if ages.is_empty()
                    && let Ok(Some(age)) = store::bench::newest_log_age(&pool).await
                {
                    ages.push(age.max(0.0));
                }
                ages
            })
        };
        store::bench::insert_requests(&scratch.pool, agent, user, runs).await?;
        let finished = self
            .finished(&scratch, &mut fleet, runs, Duration::from_secs(300))
            .await;
        stop.cancel();
        let mut ages = sampler.await.unwrap_or_default();
        finished?;
        fleet.stop(Duration::from_secs(30));
        let span = store::bench::run_span(&scratch.pool).await?;
        let (stored, _, _) = store::bench::log_span(&scratch.pool).await?;
        self.drop_scratch(scratch).await?;
        ages.sort_by(f64::total_cmp);
        let seconds = match (span.first_start, span.last_end) {
            (Some(first), Some(last)) => {
                (last - first).num_microseconds().unwrap_or(0) as f64 / 1e6
            }
            _ => 0.0,
        };
        let ceiling_rate = self.logs_ceiling(runs, lines).await?;
        let rate = if seconds > 0.0 {
            stored as f64 / seconds
        } else {
            0.0
        };
        Ok(json!({
            "runs": runs,
            "lines_per_run": lines,
            "replicas": replicas,
            "lines_stored": stored,
            "seconds": round2(seconds),
            "lines_per_second": round2(rate),
            "ceiling_lines_per_second": round2(ceiling_rate),
            "ratio": round2(rate / ceiling_rate),
            "visibility_samples": ages.len(),
            "visibility_p50_ms": ms(percentile(&ages, 50.0)),
            "visibility_p99_ms": ms(percentile(&ages, 99.0)),
            "visibility_max_ms": ms(ages.last().copied()),
        }))
    }

    /// The ceiling of `logs`: the same lines by plain SQL on as many connections as
    /// agentd's log writers have (two per replica), in statements of up to 10,000 lines
    /// (what one of agentd's grouped statements holds when ten runs each have a full
    /// batch); lines per second.
    async fn logs_ceiling(&self, runs: i64, lines: i64) -> anyhow::Result<f64> {
        const LINES_PER_STATEMENT: i64 = 10_000;
        let connections = 2 * self.args.replicas.max(1);
        let ceiling = self.scratch("logs_ceiling", connections as u32).await?;
        let (user, agent) = store::bench::seed_agent(&ceiling.pool).await?;
        let run_ids = store::bench::insert_running_runs(&ceiling.pool, agent, user, runs).await?;
        store::bench::analyze(&ceiling.pool).await?;
        // The messages are made before the clock starts; ids and timestamps when each
        // statement is sent, as a run's are when it prints (lines made ahead would fill
        // each connection's own range of the indexes, which live lines do not).
        let mut work: Vec<Vec<(Uuid, Vec<String>)>> = vec![Vec::new(); connections];
        for (index, run) in run_ids.iter().enumerate() {
            let mut written = 0;
            while written < lines {
                let count = (lines - written).min(LINES_PER_STATEMENT);
                work[index % connections].push((
                    *run,
                    (written + 1..=written + count)
                        .map(|line| format!("noop line {line}"))
                        .collect(),
                ));
                written += count;
            }
        }
        let started = Instant::now();
        let mut writers = Vec::new();
        for statements in work {
            let pool = ceiling.pool.clone();
            writers.push(tokio::spawn(async move {
                for (run, messages) in statements {
                    let ids: Vec<Uuid> = messages.iter().map(|_| Uuid::now_v7()).collect();
                    let timestamps = vec![Utc::now(); messages.len()];
                    store::bench::ceiling_log_lines(&pool, run, &ids, &messages, &timestamps)
                        .await?;
                }
                Ok::<_, store::StoreError>(())
            }));
        }
        for writer in writers {
            writer.await??;
        }
        let seconds = started.elapsed().as_secs_f64();
        let (stored, _, _) = store::bench::log_span(&ceiling.pool).await?;
        self.drop_scratch(ceiling).await?;
        anyhow::ensure!(
            stored == runs * lines,
            "the ceiling stored {stored} of {} lines",
            runs * lines
        );
        Ok(stored as f64 / seconds)
    }

    /// The idle replica's queries are counted as the transactions of its database
    /// (`pg_stat_database`): every statement it runs outside a transaction is one.
    async fn idle(&mut self) -> anyhow::Result<Value> {
        let n = self.args.idle_schedules;
        let window = self.args.idle_window.max(Duration::from_secs(1));
        let scratch = self.scratch("idle", 2).await?;
        let (_, agent) = store::bench::seed_agent(&scratch.pool).await?;
        let later = Utc::now().trunc_subsecs(0) + chrono::Duration::hours(1);
        let cron = format!(
            "{} {} {} * * *",
            later.second(),
            later.minute(),
            later.hour()
        );
        store::bench::insert_cron_schedules(&scratch.pool, agent, n, &cron, Some(later)).await?;
        store::bench::vacuum_analyze(&scratch.pool).await?;
        let mut fleet = self.fleet(&scratch, 1, 1)?;
        self.registered(&scratch, &mut fleet, 1).await?;
        // Close our own connections to it, so only the replica's work is counted, and let
        // the start-up's statistics arrive first: a backend reports its counts up to 10 s
        // after the fact, so both readings lag alike and the difference covers the window.
        scratch.pool.close().await;
        tokio::time::sleep(IDLE_SETTLE).await;
        let pid = fleet.pids()[0];
        let before_tx = store::bench::transactions(&self.database.pool, &scratch.name).await?;
        let before = fleet::process_cost(pid);
        tokio::time::sleep(window).await;
        let after = fleet::process_cost(pid);
        let after_tx = store::bench::transactions(&self.database.pool, &scratch.name).await?;
        fleet.check_alive()?;
        fleet.stop(Duration::from_secs(30));
        store::bench::drop_database(&self.database.pool, &scratch.name).await?;
        let minutes = window.as_secs_f64() / 60.0;
        Ok(json!({
            "schedules": n,
            "seconds": window.as_secs_f64(),
            "transactions": after_tx - before_tx,
            "queries_per_minute": round2((after_tx - before_tx) as f64 / minutes),
            "cpu_percent": round2((after.cpu_seconds - before.cpu_seconds) / window.as_secs_f64() * 100.0),
            "rss_mib": round2(after.rss_mib),
            "peak_rss_mib": round2(after.peak_rss_mib),
        }))
    }

    async fn scale(&mut self) -> anyhow::Result<Value> {
        const SAMPLES: usize = 25;
        let scratch = self.scratch("scale", 2).await?;
        let (_, agent) = store::bench::seed_agent(&scratch.pool).await?;
        // A few due rows (a slot of their rule) among many that are not.
        let due = Utc::now().trunc_subsecs(0) - chrono::Duration::seconds(1);
        let cron = format!("{} {} {} * * *", due.second(), due.minute(), due.hour());
        store::bench::insert_cron_schedules(&scratch.pool, agent, 10, &cron, Some(due)).await?;
        let batch = self.settings.scheduler.batch_size;
        let mut sizes = self.args.scale_sizes.clone();
        sizes.sort_unstable();
        let mut in_table = 10;
        let mut results = Vec::new();
        for size in sizes {
            if size > in_table {
                store::bench::insert_far_schedules(&scratch.pool, agent, size - in_table).await?;
                in_table = size;
            }
            store::bench::analyze(&scratch.pool).await?;
            let mut times = Vec::with_capacity(SAMPLES);
            for _ in 0..SAMPLES {
                let started = Instant::now();
                let mut claim = store::schedules::ClaimTransaction::begin(&scratch.pool).await?;
                let (_, rows) = claim.lock_schedules(batch).await?;
                claim.rollback().await?;
                times.push(started.elapsed().as_secs_f64());
                anyhow::ensure!(rows.len() == 10, "the claim saw {} due rows", rows.len());
            }
            times.sort_by(f64::total_cmp);
            results.push(json!({
                "schedules": in_table,
                "claim_ms_median": ms(percentile(&times, 50.0)),
                "claim_ms_p95": ms(percentile(&times, 95.0)),
            }));
        }
        self.drop_scratch(scratch).await?;
        Ok(Value::Array(results))
    }
}

/// Runs the chosen scenarios and returns the report.
pub async fn run(
    settings: &Settings,
    args: &BenchArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<Value> {
    let database = Database::open(settings, Some(MIGRATE_CONNECT_PATIENCE), shutdown).await?;
    let folder = std::env::temp_dir().join(format!("agentd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&folder)?;
    let mut bench = Bench {
        settings,
        args,
        database: &database,
        folder: folder.clone(),
        series: Vec::new(),
    };
    let result = run_scenarios(&mut bench).await;
    let series = std::mem::take(&mut bench.series);
    database.close().await;
    let mut report = result?;
    if let Some(path) = &args.svg {
        std::fs::write(path, chart::lag_cdf_svg("agentd scheduling lag", &series))?;
        report["chart"] = json!(path.display().to_string());
    }
    let _ = std::fs::remove_dir_all(&folder);
    Ok(report)
}

async fn run_scenarios(bench: &mut Bench<'_>) -> anyhow::Result<Value> {
    let args = bench.args;
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_default();
    let postgres = store::bench::server_version(&bench.database.pool).await?;
    let autovacuum = store::bench::server_autovacuum(&bench.database.pool).await?;
    let concurrency = args.concurrency;
    let mut report = json!({
        "agentd": env!("CARGO_PKG_VERSION"),
        "machine": {"cpus": cpus, "cpu_model": cpu_model, "postgres": postgres, "autovacuum": autovacuum},
        "replica_concurrency": concurrency,
    });
    if args.wants(Scenario::Burst) {
        report["burst"] = bench.burst().await?;
    }
    if args.wants(Scenario::Steady) {
        report["steady"] = bench.steady().await?;
    }
    if args.wants(Scenario::Throughput) {
        report["throughput"] = bench.throughput().await?;
    }
    if args.wants(Scenario::Logs) {
        report["logs"] = bench.logs().await?;
    }
    if args.wants(Scenario::Idle) {
        report["idle"] = bench.idle().await?;
    }
    if args.wants(Scenario::Scale) {
        report["scale"] = bench.scale().await?;
    }
    report["targets"] = targets(&report);
    Ok(report)
}

/// The targets, checked against the report (only for scenarios that ran at the
/// targets' sizes).
fn targets(report: &Value) -> Value {
    let mut checks = Vec::new();
    let mut check = |scenario: &str, target: &str, value: &Value, met: Option<bool>| {
        checks.push(json!({"scenario": scenario, "target": target, "value": value, "met": met}));
    };
    let burst = &report["burst"];
    if burst.is_object() {
        let p99 = &burst["lag_p99_ms"];
        check(
            "burst",
            "p99 lag <= 500 ms",
            p99,
            p99.as_f64().map(|v| v <= 500.0),
        );
        let all = &burst["all_completed_after_ms"];
        check(
            "burst",
            "all completed within 1 s",
            all,
            all.as_f64().map(|v| v <= 1000.0),
        );
    }
    let steady = &report["steady"];
    if steady.is_object() {
        let p99 = &steady["lag_p99_ms"];
        check(
            "steady",
            "p99 lag <= 25 ms",
            p99,
            p99.as_f64().map(|v| v <= 25.0),
        );
    }
    let throughput = &report["throughput"];
    if throughput.is_object() {
        let ratio = &throughput["ratio"];
        check(
            "throughput",
            ">= 70% of the ceiling",
            ratio,
            ratio.as_f64().map(|v| v >= 0.7),
        );
    }
    let logs = &report["logs"];
    if logs.is_object() {
        let rate = &logs["lines_per_second"];
        check(
            "logs",
            ">= 100,000 lines/s stored",
            rate,
            rate.as_f64().map(|v| v >= 100_000.0),
        );
        let p99 = &logs["visibility_p99_ms"];
        check(
            "logs",
            "visible within 250 ms (p99)",
            p99,
            p99.as_f64().map(|v| v <= 250.0),
        );
    }
    let idle = &report["idle"];
    if idle.is_object() {
        let qpm = &idle["queries_per_minute"];
        check(
            "idle",
            "<= 2 queries per minute",
            qpm,
            qpm.as_f64().map(|v| v <= 2.0),
        );
        let cpu = &idle["cpu_percent"];
        check("idle", "< 1% CPU", cpu, cpu.as_f64().map(|v| v < 1.0));
        let rss = &idle["rss_mib"];
        check("idle", "< 30 MiB RSS", rss, rss.as_f64().map(|v| v < 30.0));
    }
    if let Some(scale) = report["scale"].as_array()
        && let (Some(first), Some(last)) = (scale.first(), scale.last())
    {
        let ratio = match (
            first["claim_ms_median"].as_f64(),
            last["claim_ms_median"].as_f64(),
        ) {
            (Some(a), Some(b)) if a > 0.0 => Some(round2(b / a)),
            _ => None,
        };
        check(
            "scale",
            "claim time flat (within 2x) from smallest to largest table",
            &json!(ratio),
            ratio.map(|r| r <= 2.0),
        );
    }
    Value::Array(checks)
}

/// The readable report.
pub fn table(report: &Value) -> String {
    let mut out = String::new();
    let machine = &report["machine"];
    out.push_str(&format!(
        "agentd {} bench on {} CPU(s) ({}), PostgreSQL {} (autovacuum {}); replica concurrency {}\n",
        report["agentd"].as_str().unwrap_or(""),
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["postgres"].as_str().unwrap_or("?"),
        machine["autovacuum"].as_str().unwrap_or("?"),
        report["replica_concurrency"],
    ));
    let sections = ["burst", "steady", "throughput", "logs", "idle"];
    for section in sections {
        if let Some(fields) = report[section].as_object() {
            out.push_str(&format!("\n{section}\n"));
            for (key, value) in fields {
                out.push_str(&format!("  {key:<28} {value}\n"));
            }
        }
    }
    if let Some(rows) = report["scale"].as_array() {
        out.push_str("\nscale\n  schedules    claim median ms  claim p95 ms\n");
        for row in rows {
            out.push_str(&format!(
                "  {:<12} {:<16} {}\n",
                row["schedules"], row["claim_ms_median"], row["claim_ms_p95"]
            ));
        }
    }
    if let Some(checks) = report["targets"].as_array() {
        out.push_str("\ntargets\n");
        for check in checks {
            let met = match check["met"].as_bool() {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a",
            };
            out.push_str(&format!(
                "  {:<10} {:<60} {:<12} {met}\n",
                check["scenario"].as_str().unwrap_or(""),
                check["target"].as_str().unwrap_or(""),
                check["value"].to_string(),
            ));
        }
    }
    out
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

    #[test]
    fn targets_are_judged_only_for_scenarios_that_ran() {
        let report = json!({
            "burst": {"lag_p99_ms": 120.0, "all_completed_after_ms": 1500.0},
            "scale": [{"schedules": 10000, "claim_ms_median": 1.0}, {"schedules": 1000000, "claim_ms_median": 1.5}],
        });
        let checks = targets(&report);
        let checks = checks.as_array().unwrap();
        assert_eq!(checks.len(), 3);
        assert_eq!(checks[0]["met"], true);
        assert_eq!(checks[1]["met"], false);
        assert_eq!(checks[2]["met"], true);
        assert_eq!(checks[2]["value"], 1.5);
    }
}
