//! `waiting`: the memory a run costs its replica while it waits, which is what the
//! limits of the executors that wait (builtin, openai, webhook: hundreds of runs each by
//! default) are weighed against. For each executor measured, one replica started plain
//! (the daemon's defaults; see [`super::fleet::Fleet::start`]) with only its executor's
//! settings is given N requested runs at once, each of which waits far longer than the
//! measurement takes: the openai executor on the bench's own model, which sends its first
//! chunk only a minute after each request, and the builtin executor pausing a minute
//! (`executors.builtin.step_delay`) after its first step. Its resident memory once all N
//! wait is compared with its memory once registered and idle, before them. The replica
//! is then killed, not drained: the scratch database is dropped anyway.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::model::FakeModel;
use super::{Bench, Scratch, fleet, round2};
use crate::config::Settings;
use crate::store;

/// How long each run waits: the model's delay before its first chunk, the builtin
/// executor's pause. The runs are started and measured well within it.
const WAIT: Duration = Duration::from_secs(60);

/// How long the replica is left alone before each reading, for start-up (or the runs'
/// start) to settle.
const SETTLE: Duration = Duration::from_secs(1);

/// What `waiting` measured.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct WaitingReport {
    /// Runs started at once for each executor.
    pub runs: usize,
    /// The openai executor, waiting for the model's answer.
    pub openai: WaitingFigures,
    /// The builtin executor, pausing between its steps.
    pub builtin: WaitingFigures,
}

/// One executor's runs waiting in one replica.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct WaitingFigures {
    /// The replica's resident memory once registered, before the runs, MiB.
    pub idle_rss_mib: f64,
    /// Its resident memory with the runs waiting, MiB.
    pub waiting_rss_mib: f64,
    /// Runs waiting when it was read: requests the model held open (openai), runs running
    /// (builtin).
    pub runs_waiting: usize,
    /// `waiting_rss_mib − idle_rss_mib` per waiting run, KiB.
    pub kib_per_waiting_run: f64,
}

/// The executor a phase of `waiting` measures.
enum Waiter {
    /// The openai executor, on this model.
    OpenAi(FakeModel),
    /// The builtin executor.
    Builtin,
}

impl Waiter {
    fn name(&self) -> &'static str {
        match self {
            Waiter::OpenAi(_) => "openai",
            Waiter::Builtin => "builtin",
        }
    }

    /// Runs waiting now: the requests the model holds open (openai), or the runs started
    /// and not finished (builtin, which pauses right after its first step).
    async fn waiting(&self, scratch: &Scratch) -> anyhow::Result<usize> {
        Ok(match self {
            Waiter::OpenAi(model) => model.requests(),
            Waiter::Builtin => {
                let span = store::bench::run_span(&scratch.pool).await?;
                usize::try_from(span.runs - span.finished).unwrap_or(0)
            }
        })
    }
}

/// Runs `waiting` on a scratch database per executor.
pub(super) async fn run(bench: &mut Bench<'_>) -> anyhow::Result<WaitingReport> {
    let runs = bench.options.waiting_runs;
    Ok(WaitingReport {
        runs,
        openai: measure(
            bench,
            Waiter::OpenAi(FakeModel::start(1, WAIT).await?),
            runs,
        )
        .await?,
        builtin: measure(bench, Waiter::Builtin, runs).await?,
    })
}

/// Starts one plain replica whose agents run with `waiter`, gives it `n` runs at once and
/// reads its memory before and while they wait.
async fn measure(bench: &Bench<'_>, waiter: Waiter, n: usize) -> anyhow::Result<WaitingFigures> {
    let defaults = Settings::load(None, &HashMap::new())?;
    let (mut settings, executor_limit, executor_variable) = match &waiter {
        Waiter::OpenAi(model) => (
            model.replica_settings(),
            defaults.executors.openai.concurrency,
            "AGENTD__EXECUTORS__OPENAI__CONCURRENCY",
        ),
        Waiter::Builtin => (
            vec![(
                "AGENTD__EXECUTORS__BUILTIN__STEP_DELAY".to_string(),
                humantime::format_duration(WAIT).to_string(),
            )],
            defaults.executors.builtin.concurrency,
            "AGENTD__EXECUTORS__BUILTIN__CONCURRENCY",
        ),
    };
    // Room for every run at once, where the defaults have less.
    if n > defaults.worker.max_runs {
        settings.push(("AGENTD__WORKER__MAX_RUNS".to_string(), n.to_string()));
    }
    if n > executor_limit {
        settings.push((executor_variable.to_string(), n.to_string()));
    }

    let scratch = bench
        .scratch(&format!("waiting_{}", waiter.name()), 2)
        .await?;
    let (user, agent) = store::bench::seed_agent(&scratch.pool).await?;
    let mut fleet = bench.plain_fleet(&scratch, 1, settings)?;
    bench.registered(&scratch, &mut fleet, 1).await?;
    tokio::time::sleep(SETTLE).await;
    fleet.check_alive()?;
    let pid = fleet.pids()[0];
    let idle = fleet::process_cost(pid);

    store::bench::insert_requests(&scratch.pool, agent, user, n as i64).await?;
    let deadline = Instant::now() + WAIT / 2;
    while waiter.waiting(&scratch).await? < n {
        fleet.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "waiting ({}): only {} of {n} runs were waiting after {:?}",
            waiter.name(),
            waiter.waiting(&scratch).await?,
            WAIT / 2
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(SETTLE).await;
    fleet.check_alive()?;
    let busy = fleet::process_cost(pid);
    let runs_waiting = waiter.waiting(&scratch).await?;
    // Killed, not drained: its runs would wait out their minute first.
    drop(fleet);
    drop(waiter);
    bench.drop_scratch(scratch).await?;

    let kib_per_waiting_run = (busy.rss_mib - idle.rss_mib) * 1024.0 / runs_waiting as f64;
    Ok(WaitingFigures {
        idle_rss_mib: round2(idle.rss_mib),
        waiting_rss_mib: round2(busy.rss_mib),
        runs_waiting,
        kib_per_waiting_run: round2(kib_per_waiting_run),
    })
}
