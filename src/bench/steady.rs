//! `steady`: F fires per second held for D seconds; the achieved rate, the scheduling lag,
//! and what the replicas cost meanwhile (CPU, memory).

use std::time::Duration;

use chrono::{SubsecRound, Utc};
use serde::Serialize;

use super::{Bench, ms, percentile, round2};
use crate::store;

/// The schedules fall into this many groups, group g firing at the seconds ≡ g (mod
/// `PERIOD`): each second sees one group's `rate` fires.
const PERIOD: i64 = 10;

/// What `steady` measured.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct SteadyReport {
    /// Fires per second asked for.
    pub target_fires_per_second: i64,
    /// Length of the measured window, seconds.
    pub seconds: f64,
    /// Replicas (processes) that ran the fires.
    pub replicas: usize,
    /// Runs whose slot fell in the window.
    pub fired: usize,
    /// Runs the window should hold.
    pub expected: i64,
    /// `fired` per second of the window.
    pub achieved_fires_per_second: f64,
    /// Median scheduling lag, ms.
    pub lag_p50_ms: Option<f64>,
    /// 99th percentile of the scheduling lag, ms.
    pub lag_p99_ms: Option<f64>,
    /// Largest scheduling lag, ms.
    pub lag_max_ms: Option<f64>,
    /// CPU each replica used during the window, percent of one core.
    pub replica_cpu_percent: Vec<f64>,
    /// Peak resident memory of each replica, MiB.
    pub replica_peak_rss_mib: Vec<f64>,
}

/// Runs `steady` on a scratch database; its lags join the chart.
pub(super) async fn run(bench: &mut Bench<'_>) -> anyhow::Result<SteadyReport> {
    let rate = bench.options.fires_per_second.max(1);
    let window = bench.options.duration.max(Duration::from_secs(1));
    let replicas = bench.options.replicas;
    let scratch = bench.scratch("steady", 4).await?;
    let (_, agent) = store::bench::seed_agent(&scratch.pool).await?;
    for group in 0..PERIOD {
        let cron = format!("{group}-59/{PERIOD} * * * * *");
        store::bench::insert_cron_schedules(&scratch.pool, agent, rate, &cron, None).await?;
    }
    store::bench::analyze(&scratch.pool).await?;
    let mut fleet = bench.fleet(&scratch, replicas, 1)?;
    bench.registered(&scratch, &mut fleet, replicas).await?;
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
    bench.drop_scratch(scratch).await?;
    let seconds = window.as_secs_f64();
    let report = SteadyReport {
        target_fires_per_second: rate,
        seconds,
        replicas,
        fired: lags.len(),
        expected: rate * window.as_secs() as i64,
        achieved_fires_per_second: round2(lags.len() as f64 / seconds),
        lag_p50_ms: ms(percentile(&lags, 50.0)),
        lag_p99_ms: ms(percentile(&lags, 99.0)),
        lag_max_ms: ms(lags.last().copied()),
        replica_cpu_percent: before
            .iter()
            .zip(&after)
            .map(|(b, a)| round2((a.cpu_seconds - b.cpu_seconds) / seconds * 100.0))
            .collect(),
        replica_peak_rss_mib: after.iter().map(|c| round2(c.peak_rss_mib)).collect(),
    };
    bench
        .series
        .push((format!("steady ({rate}/s for {seconds:.0} s)"), lags));
    Ok(report)
}
