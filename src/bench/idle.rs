//! `idle`: one replica with many schedules none due within the hour; the queries it sends
//! per minute, its CPU and its memory.

use std::time::Duration;

use chrono::{SubsecRound, Timelike, Utc};
use serde::Serialize;

use super::{Bench, fleet, round2};
use crate::store;

/// Wait after the idle replica started before counting: a backend reports its counts up
/// to 10 s after the fact, so the start-up's must have arrived before the first reading.
const IDLE_SETTLE: Duration = Duration::from_secs(15);

/// What `idle` measured.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct IdleReport {
    /// Schedules in the table.
    pub schedules: i64,
    /// Length of the watched window, seconds.
    pub seconds: f64,
    /// Transactions of the replica's database during the window.
    pub transactions: i64,
    /// `transactions` per minute of the window.
    pub queries_per_minute: f64,
    /// CPU the replica used during the window, percent of one core.
    pub cpu_percent: f64,
    /// Resident memory at the end, MiB.
    pub rss_mib: f64,
    /// Peak resident memory, MiB.
    pub peak_rss_mib: f64,
}

/// Runs `idle` on a scratch database. The replica's queries are counted as the
/// transactions of its database (`pg_stat_database`): every statement it runs outside a
/// transaction is one.
pub(super) async fn run(bench: &mut Bench<'_>) -> anyhow::Result<IdleReport> {
    let n = bench.options.idle_schedules;
    let window = bench.options.idle_window.max(Duration::from_secs(1));
    let scratch = bench.scratch("idle", 2).await?;
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
    let mut fleet = bench.fleet(&scratch, 1, 1)?;
    bench.registered(&scratch, &mut fleet, 1).await?;
    // Close our own connections to it, so only the replica's work is counted, and let
    // the start-up's statistics arrive first: both readings lag alike, so the difference
    // covers the window.
    scratch.pool.close().await;
    tokio::time::sleep(IDLE_SETTLE).await;
    let pid = fleet.pids()[0];
    let before_tx = store::bench::transactions(&bench.database.pool, &scratch.name).await?;
    let before = fleet::process_cost(pid);
    tokio::time::sleep(window).await;
    let after = fleet::process_cost(pid);
    let after_tx = store::bench::transactions(&bench.database.pool, &scratch.name).await?;
    fleet.check_alive()?;
    fleet.stop(Duration::from_secs(30));
    store::bench::drop_database(&bench.database.pool, &scratch.name).await?;
    let minutes = window.as_secs_f64() / 60.0;
    Ok(IdleReport {
        schedules: n,
        seconds: window.as_secs_f64(),
        transactions: after_tx - before_tx,
        queries_per_minute: round2((after_tx - before_tx) as f64 / minutes),
        cpu_percent: round2(
            (after.cpu_seconds - before.cpu_seconds) / window.as_secs_f64() * 100.0,
        ),
        rss_mib: round2(after.rss_mib),
        peak_rss_mib: round2(after.peak_rss_mib),
    })
}
