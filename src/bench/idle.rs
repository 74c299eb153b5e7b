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

/// The replica's log level in `idle`: its own warnings, and a line for every statement it
/// sends (sqlx logs each one at `debug` under this target), which is what is counted.
const STATEMENT_LOGGING: &str = "warn,sqlx::query=debug";

/// What `idle` measured.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct IdleReport {
    /// Schedules in the table.
    pub schedules: i64,
    /// Length of the watched window, seconds.
    pub seconds: f64,
    /// Statements the replica sent during the window, counted in its own log.
    pub statements: u64,
    /// `statements` per minute of the window.
    pub queries_per_minute: f64,
    /// Transactions of the replica's database during the window (`pg_stat_database`): the
    /// replica's, and the server's own (autovacuum looks at every database once a minute
    /// with two transactions, when it is on).
    pub server_transactions: i64,
    /// CPU the replica used during the window, percent of one core.
    pub cpu_percent: f64,
    /// Resident memory at the end, MiB.
    pub rss_mib: f64,
    /// Peak resident memory, MiB.
    pub peak_rss_mib: f64,
}

/// Runs `idle` on a scratch database. The replica logs every statement it sends, and the
/// lines its log gained during the window are counted; the database's transactions are
/// reported beside them, as the server sees them.
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
    let logging = vec![(
        "AGENTD__LOGGING__LEVEL".to_string(),
        STATEMENT_LOGGING.to_string(),
    )];
    let mut fleet = bench.fleet_with(&scratch, 1, 1, logging)?;
    bench.registered(&scratch, &mut fleet, 1).await?;
    // Close our own connections to it, so only the replica's work is counted, and let
    // the start-up's statistics arrive first: both readings lag alike, so the difference
    // covers the window.
    scratch.pool.close().await;
    tokio::time::sleep(IDLE_SETTLE).await;
    let pid = fleet.pids()[0];
    let log = fleet.logs()[0].clone();
    let before_tx = store::bench::transactions(&bench.database.pool, &scratch.name).await?;
    let before = fleet::process_cost(pid);
    let (start_up, log_start) = statements_logged(&log, 0)?;
    // The count below is only as good as the log: start-up's statements must be in it.
    anyhow::ensure!(
        start_up > 0,
        "idle: the replica's log ({}) records none of its start-up statements, so its statements cannot be counted",
        log.display()
    );
    tokio::time::sleep(window).await;
    let after = fleet::process_cost(pid);
    let (statements, _) = statements_logged(&log, log_start)?;
    let after_tx = store::bench::transactions(&bench.database.pool, &scratch.name).await?;
    fleet.check_alive()?;
    fleet.stop(Duration::from_secs(30));
    store::bench::drop_database(&bench.database.pool, &scratch.name).await?;
    let minutes = window.as_secs_f64() / 60.0;
    Ok(IdleReport {
        schedules: n,
        seconds: window.as_secs_f64(),
        statements,
        queries_per_minute: round2(statements as f64 / minutes),
        server_transactions: after_tx - before_tx,
        cpu_percent: round2(
            (after.cpu_seconds - before.cpu_seconds) / window.as_secs_f64() * 100.0,
        ),
        rss_mib: round2(after.rss_mib),
        peak_rss_mib: round2(after.peak_rss_mib),
    })
}

/// The statements a replica's JSON log records from byte `start` (lines whose target is
/// sqlx's statement log), and the log's length: where the next count starts.
fn statements_logged(log: &std::path::Path, start: usize) -> anyhow::Result<(u64, usize)> {
    let text = std::fs::read(log)?;
    let added = text.get(start..).unwrap_or_default();
    let statements = String::from_utf8_lossy(added)
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .is_ok_and(|event| event["target"] == "sqlx::query")
        })
        .count();
    Ok((statements as u64, text.len()))
}
