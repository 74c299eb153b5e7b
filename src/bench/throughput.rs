//! `throughput`: a backlog of due schedules; completed runs per second, against the ceiling
//! of the server (the same rows fired and completed by plain SQL).

use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Timelike, Utc};
use serde::Serialize;

use super::{Bench, busy_seconds, per_second, round2};
use crate::store;

/// What `throughput` measured.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct ThroughputReport {
    /// Due schedules in the backlog (and rows of the ceiling).
    pub backlog: i64,
    /// Replicas (processes) that worked the backlog.
    pub replicas: usize,
    /// Runs completed.
    pub completed: i64,
    /// From the first run's start to the last run's end.
    pub seconds: f64,
    /// The backlog per second of `seconds`.
    pub runs_per_second: f64,
    /// Rows each statement of the ceiling fires (`scheduler.batch_size`).
    pub ceiling_batch: usize,
    /// Runs per second by plain SQL.
    pub ceiling_runs_per_second: f64,
    /// `runs_per_second` / `ceiling_runs_per_second`.
    pub ratio: f64,
}

/// Runs `throughput` on a scratch database, between two measures of the ceiling.
pub(super) async fn run(bench: &mut Bench<'_>) -> anyhow::Result<ThroughputReport> {
    let n = bench.options.backlog;
    let replicas = bench.options.replicas;
    let due = Utc::now().trunc_subsecs(0) - chrono::Duration::seconds(1);
    let cron = format!("{} {} {} * * *", due.second(), due.minute(), due.hour());
    // The ceiling is measured before and after agentd, and the two averaged: the
    // machine's speed drifts, and a short phase measured once can land on a slow or a
    // fast moment.
    let ceiling_before = ceiling(bench, n, &cron, due).await?;
    let scratch = bench.scratch("throughput", 4).await?;
    let (_, agent) = store::bench::seed_agent(&scratch.pool).await?;
    store::bench::insert_cron_schedules(&scratch.pool, agent, n, &cron, Some(due)).await?;
    store::bench::analyze(&scratch.pool).await?;
    let mut fleet = bench.fleet(&scratch, replicas, 1)?;
    bench
        .finished(
            &scratch,
            &mut fleet,
            n,
            Duration::from_secs(120) + Duration::from_millis(n as u64 * 10),
        )
        .await?;
    fleet.stop(Duration::from_secs(30));
    let span = store::bench::run_span(&scratch.pool).await?;
    bench.drop_scratch(scratch).await?;
    let seconds = busy_seconds(&span);
    let rate = per_second(n, seconds);
    let ceiling_rate = (ceiling_before + ceiling(bench, n, &cron, due).await?) / 2.0;
    Ok(ThroughputReport {
        backlog: n,
        replicas,
        completed: span.completed,
        seconds: round2(seconds),
        runs_per_second: round2(rate),
        ceiling_batch: bench.settings.scheduler.batch_size,
        ceiling_runs_per_second: round2(ceiling_rate),
        ratio: round2(rate / ceiling_rate),
    })
}

/// The ceiling of `throughput`: the same rows by plain SQL, in batches of
/// `scheduler.batch_size`, on as many connections as replicas; runs per second.
async fn ceiling(bench: &Bench<'_>, n: i64, cron: &str, due: DateTime<Utc>) -> anyhow::Result<f64> {
    let replicas = bench.options.replicas;
    let ceiling = bench.scratch("ceiling", replicas as u32).await?;
    let (_, agent) = store::bench::seed_agent(&ceiling.pool).await?;
    store::bench::insert_cron_schedules(&ceiling.pool, agent, n, cron, Some(due)).await?;
    store::bench::analyze(&ceiling.pool).await?;
    let batch = bench.settings.scheduler.batch_size as i64;
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
    bench.drop_scratch(ceiling).await?;
    anyhow::ensure!(
        ceiling_done == n,
        "the ceiling completed {ceiling_done} of {n} runs"
    );
    Ok(n as f64 / seconds)
}
