//! `burst`: N schedules due at the same instant; the time until all started and completed,
//! the scheduling lag (start_time − scheduled_for) of each run, and how long each run held
//! its slot.

use std::time::Duration;

use chrono::{SubsecRound, Timelike, Utc};
use serde::Serialize;

use super::fleet::Fleet;
use super::{Bench, Scratch, ms, percentile, round2, since_ms};
use crate::store;

/// What `burst` measured (and `defaults`, the same burst at the daemon's defaults).
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct BurstReport {
    /// Schedules due at the instant.
    pub schedules: i64,
    /// Replicas (processes) that ran them.
    pub replicas: usize,
    /// Runs created.
    pub runs: i64,
    /// Runs completed.
    pub completed: i64,
    /// From the instant to the last run's start, ms.
    pub all_started_after_ms: Option<f64>,
    /// From the instant to the last run's end, ms.
    pub all_completed_after_ms: Option<f64>,
    /// Median scheduling lag, ms.
    pub lag_p50_ms: Option<f64>,
    /// 99th percentile of the scheduling lag, ms.
    pub lag_p99_ms: Option<f64>,
    /// Largest scheduling lag, ms.
    pub lag_max_ms: Option<f64>,
    /// CPU seconds each replica used from its start to the end of the burst.
    pub replica_cpu_seconds: Vec<f64>,
    /// Peak resident memory of each replica, MiB.
    pub replica_peak_rss_mib: Vec<f64>,
    /// How long a run held its slot (`resource_usage.slot_ms`: start to executor end), ms,
    /// median and 99th percentile (absent in reports from before it was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_p99_ms: Option<f64>,
}

/// Runs `burst` on a scratch database; its lags join the chart.
pub(super) async fn run(bench: &mut Bench<'_>) -> anyhow::Result<BurstReport> {
    let (report, scratch) = at_one_instant(bench, "burst", |bench, scratch, replicas| {
        bench.fleet(scratch, replicas, 1)
    })
    .await?;
    bench.drop_scratch(scratch).await?;
    Ok(report)
}

/// `--schedules` schedules of one agent due at one instant, run by `--replicas` replicas
/// that `start` starts: the figures of [`BurstReport`], the lags joining the chart as
/// `label`'s. Returns the scratch database too, for the caller to read more from and drop.
pub(super) async fn at_one_instant(
    bench: &mut Bench<'_>,
    label: &str,
    start: impl FnOnce(&Bench<'_>, &Scratch, usize) -> anyhow::Result<Fleet>,
) -> anyhow::Result<(BurstReport, Scratch)> {
    let n = bench.options.schedules;
    let replicas = bench.options.replicas;
    let scratch = bench.scratch(label, 4).await?;
    let (_, agent) = store::bench::seed_agent(&scratch.pool).await?;
    let mut fleet = start(bench, &scratch, replicas)?;
    bench.registered(&scratch, &mut fleet, replicas).await?;
    // One instant a little ahead, a whole second, that is a slot of the rule.
    let lead = Duration::from_secs(2) + Duration::from_millis((n / 20).max(0) as u64);
    let at = (Utc::now() + lead).trunc_subsecs(0) + chrono::Duration::seconds(1);
    let cron = format!("{} {} {} * * *", at.second(), at.minute(), at.hour());
    store::bench::insert_cron_schedules(&scratch.pool, agent, n, &cron, Some(at)).await?;
    bench
        .finished(
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
        store::bench::scheduling_lags(&scratch.pool, at, at + chrono::Duration::seconds(1)).await?;
    let slots = store::bench::slot_times(&scratch.pool).await?;
    let report = BurstReport {
        schedules: n,
        replicas,
        runs: span.runs,
        completed: span.completed,
        all_started_after_ms: since_ms(span.last_start, at),
        all_completed_after_ms: since_ms(span.last_end, at),
        lag_p50_ms: ms(percentile(&lags, 50.0)),
        lag_p99_ms: ms(percentile(&lags, 99.0)),
        lag_max_ms: ms(lags.last().copied()),
        replica_cpu_seconds: costs.iter().map(|c| round2(c.cpu_seconds)).collect(),
        replica_peak_rss_mib: costs.iter().map(|c| round2(c.peak_rss_mib)).collect(),
        slot_p50_ms: ms(percentile(&slots, 50.0)),
        slot_p99_ms: ms(percentile(&slots, 99.0)),
    };
    bench.series.push((format!("{label} ({n} at once)"), lags));
    Ok((report, scratch))
}
