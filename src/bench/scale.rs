//! `scale`: the claim's time with ever more schedules in the table (a few due among many
//! that are not), to show it stays flat.

use std::time::{Duration, Instant};

use chrono::{SubsecRound, Timelike, Utc};
use serde::Serialize;

use super::{Bench, ms, percentile};
use crate::store;

/// Claims timed at each table size.
const SAMPLES: usize = 25;

/// Due rows among the table's schedules: the claim must find exactly these.
const DUE: i64 = 10;

/// What `scale` measured: one row per table size, smallest first.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
#[serde(transparent)]
pub struct ScaleReport {
    /// The claim's times at each size.
    pub sizes: Vec<ClaimTimes>,
}

/// The claim's time with `schedules` rows in the table.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct ClaimTimes {
    /// Schedules in the table.
    pub schedules: i64,
    /// Median time of one claim (lock the due rows, roll back), ms.
    pub claim_ms_median: Option<f64>,
    /// 95th percentile of the claim's time, ms.
    pub claim_ms_p95: Option<f64>,
}

/// Runs `scale` on one scratch database, growing its table through the sizes asked for.
pub(super) async fn run(bench: &mut Bench<'_>) -> anyhow::Result<ScaleReport> {
    let scratch = bench.scratch("scale", 2).await?;
    let (_, agent) = store::bench::seed_agent(&scratch.pool).await?;
    // The due rows are a slot of their rule.
    let due = Utc::now().trunc_subsecs(0) - chrono::Duration::seconds(1);
    let cron = format!("{} {} {} * * *", due.second(), due.minute(), due.hour());
    store::bench::insert_cron_schedules(&scratch.pool, agent, DUE, &cron, Some(due)).await?;
    let batch = bench.settings.scheduler.batch_size;
    let mut sizes = bench.options.scale_sizes.clone();
    sizes.sort_unstable();
    let mut in_table = DUE;
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
            let (_, rows) = claim.lock_schedules(batch, Duration::ZERO).await?;
            claim.rollback().await?;
            times.push(started.elapsed().as_secs_f64());
            anyhow::ensure!(
                rows.len() as i64 == DUE,
                "the claim saw {} due rows",
                rows.len()
            );
        }
        times.sort_by(f64::total_cmp);
        results.push(ClaimTimes {
            schedules: in_table,
            claim_ms_median: ms(percentile(&times, 50.0)),
            claim_ms_p95: ms(percentile(&times, 95.0)),
        });
    }
    bench.drop_scratch(scratch).await?;
    Ok(ScaleReport { sizes: results })
}
