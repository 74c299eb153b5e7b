//! `defaults`: `burst` as users run agentd. N schedules due at the same instant, run by
//! replicas started as plain `agentd run` with nothing set but the database (and what
//! replicas on one host cannot share: [`super::fleet::Fleet::start`]), so at the daemon's
//! defaults: its limits on runs at once, its `info` log lines, its endpoints and the
//! builtin executor doing its normal work (rendering the agent's instructions, logging its
//! steps, storing the text as a Markdown artifact).

use serde::Serialize;

use super::Bench;
use super::burst::{self, BurstReport};
use crate::store;

/// What `defaults` measured.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct DefaultsReport {
    /// The burst's figures, as `burst` reports them.
    #[serde(flatten)]
    pub burst: BurstReport,
    /// Artifacts stored (one per completed run when the builtin executor did its work).
    pub artifacts: i64,
}

/// Runs `defaults` on a scratch database; its lags join the chart.
pub(super) async fn run(bench: &mut Bench<'_>) -> anyhow::Result<DefaultsReport> {
    let (burst, scratch) = burst::at_one_instant(bench, "defaults", |bench, scratch, replicas| {
        bench.plain_fleet(scratch, replicas, Vec::new())
    })
    .await?;
    let artifacts = store::bench::artifacts_stored(&scratch.pool).await?;
    bench.drop_scratch(scratch).await?;
    Ok(DefaultsReport { burst, artifacts })
}
