//! `logs`: runs that each emit L lines; lines stored per second, how soon a line is
//! visible, and the ceiling of the server (the same lines by plain SQL).

use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Bench, busy_seconds, ms, per_second, percentile, round2};
use crate::store;

/// Lines in one statement of the ceiling: what one of agentd's grouped statements holds
/// when ten runs each have a full batch.
const LINES_PER_STATEMENT: i64 = 10_000;

/// What `logs` measured.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct LogsReport {
    /// Runs.
    pub runs: i64,
    /// Lines each run emits.
    pub lines_per_run: i64,
    /// Replicas (processes) that ran them.
    pub replicas: usize,
    /// Lines in the table at the end.
    pub lines_stored: i64,
    /// From the first run's start to the last run's end.
    pub seconds: f64,
    /// `lines_stored` per second of `seconds`.
    pub lines_per_second: f64,
    /// Lines per second by plain SQL.
    pub ceiling_lines_per_second: f64,
    /// `lines_per_second` / `ceiling_lines_per_second`.
    pub ratio: f64,
    /// Looks at the age of the newest stored line.
    pub visibility_samples: usize,
    /// Median age of the newest stored line, ms.
    pub visibility_p50_ms: Option<f64>,
    /// 99th percentile of the newest stored line's age, ms.
    pub visibility_p99_ms: Option<f64>,
    /// Largest age of the newest stored line, ms.
    pub visibility_max_ms: Option<f64>,
}

/// Runs `logs` on a scratch database, then its ceiling on another.
pub(super) async fn run(bench: &mut Bench<'_>) -> anyhow::Result<LogsReport> {
    let runs = bench.options.runs;
    let lines = bench.options.lines;
    let replicas = bench.options.replicas;
    let scratch = bench.scratch("logs", 4).await?;
    let (user, agent) = store::bench::seed_agent(&scratch.pool).await?;
    let mut fleet = bench.fleet(&scratch, replicas, lines)?;
    bench.registered(&scratch, &mut fleet, replicas).await?;
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
    let finished = bench
        .finished(&scratch, &mut fleet, runs, Duration::from_secs(300))
        .await;
    stop.cancel();
    let mut ages = sampler.await.unwrap_or_default();
    finished?;
    fleet.stop(Duration::from_secs(30));
    let span = store::bench::run_span(&scratch.pool).await?;
    let (stored, _, _) = store::bench::log_span(&scratch.pool).await?;
    bench.drop_scratch(scratch).await?;
    ages.sort_by(f64::total_cmp);
    let seconds = busy_seconds(&span);
    let ceiling_rate = ceiling(bench, runs, lines).await?;
    let rate = per_second(stored, seconds);
    Ok(LogsReport {
        runs,
        lines_per_run: lines,
        replicas,
        lines_stored: stored,
        seconds: round2(seconds),
        lines_per_second: round2(rate),
        ceiling_lines_per_second: round2(ceiling_rate),
        ratio: round2(rate / ceiling_rate),
        visibility_samples: ages.len(),
        visibility_p50_ms: ms(percentile(&ages, 50.0)),
        visibility_p99_ms: ms(percentile(&ages, 99.0)),
        visibility_max_ms: ms(ages.last().copied()),
    })
}

/// The ceiling of `logs`: the same lines by plain SQL on as many connections as agentd's
/// log writers have (two per replica), in statements of up to `LINES_PER_STATEMENT` lines;
/// lines per second.
async fn ceiling(bench: &Bench<'_>, runs: i64, lines: i64) -> anyhow::Result<f64> {
    let connections = 2 * bench.options.replicas.max(1);
    let ceiling = bench.scratch("logs_ceiling", connections as u32).await?;
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
                store::bench::ceiling_log_lines(&pool, run, &ids, &messages, &timestamps).await?;
            }
            Ok::<_, store::StoreError>(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (stored, _, _) = store::bench::log_span(&ceiling.pool).await?;
    bench.drop_scratch(ceiling).await?;
    anyhow::ensure!(
        stored == runs * lines,
        "the ceiling stored {stored} of {} lines",
        runs * lines
    );
    Ok(stored as f64 / seconds)
}
