//! Retention: deletes run history older than the configured ages, in small batches, by one
//! replica at a time.
//!
//! Coordination goes through the database (`agentd.maintenance`): a replica takes the
//! `retention` task for a short hold, renews the hold between batches, and records when it
//! finished; another replica takes it only when nobody holds it and an interval has passed
//! since the last pass. A replica that dies mid-pass loses the hold when it expires and the
//! next pass continues where it stopped (every step is idempotent).
//!
//! Order within a pass: log lines (by age), then artifacts (their stored files first, then
//! their rows), then the logs of expired runs, then the runs themselves (only once nothing
//! refers to them), so no step leaves a row pointing at something deleted.

use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;

use crate::artifact_store::ArtifactStore;
use crate::config::RetentionSettings;
use crate::retry::random_duration;
use crate::store::StoreError;
use crate::store::maintenance::{
    Hold, delete_artifact_rows, delete_logs_of_old_runs, delete_old_logs, delete_old_runs,
    expired_artifacts, finish_task, renew_task, take_task,
};

/// The task's name in `agentd.maintenance`.
pub const TASK: &str = "retention";
/// How long a hold lasts without renewal (it is renewed after every batch).
const HOLD: Duration = Duration::from_secs(60);
/// Pause between batches, so retention never monopolises the database.
const BATCH_PAUSE: Duration = Duration::from_millis(20);

/// Rows a pass deleted, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub run_logs: u64,
    pub artifacts: u64,
    pub runs: u64,
    /// Artifacts whose stored file or object could not be removed (row deleted anyway).
    pub files_not_removed: u64,
    /// Statements executed (each at most one batch).
    pub batches: u64,
}

/// The retention service.
#[derive(Clone)]
pub struct Retention {
    pub pool: PgPool,
    pub worker_id: String,
    pub settings: RetentionSettings,
    pub artifacts: ArtifactStore,
}

impl Retention {
    /// Runs passes whenever the task is due, until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        // Spread replicas started together.
        let mut sleep_for = random_duration(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(sleep_for) => {}
                _ = stop.cancelled() => return,
            }
            sleep_for = match self.pass(&stop).await {
                Ok(Some(deleted)) => {
                    tracing::info!(
                        run_logs = deleted.run_logs,
                        artifacts = deleted.artifacts,
                        runs = deleted.runs,
                        batches = deleted.batches,
                        "retention pass finished"
                    );
                    self.settings.interval
                }
                Ok(None) => self.settings.interval,
                Err(error) => {
                    crate::measure::database_error("retention");
                    tracing::warn!(error = %error, "retention pass failed; trying again later");
                    self.settings.interval.min(Duration::from_secs(60))
                }
            };
            sleep_for += random_duration(Duration::from_secs(1));
        }
    }

    /// One pass if the task is due and free: `Ok(None)` when another replica has it or it
    /// ran less than an interval ago.
    pub async fn pass(&self, stop: &CancellationToken) -> Result<Option<Deleted>, StoreError> {
        match take_task(
            &self.pool,
            TASK,
            &self.worker_id,
            HOLD,
            self.settings.interval,
        )
        .await?
        {
            Hold::NotDue(_) => return Ok(None),
            Hold::Taken => {}
        }
        let result = self.delete_all(stop).await;
        // Finished even when a step failed: the next pass starts over after an interval.
        finish_task(&self.pool, TASK, &self.worker_id).await?;
        result.map(Some)
    }

    async fn delete_all(&self, stop: &CancellationToken) -> Result<Deleted, StoreError> {
        let mut deleted = Deleted::default();
        let batch = self.settings.batch_size;
        if let Some(age) = self.settings.run_logs {
            deleted.run_logs += self
                .repeat(stop, &mut deleted.batches, "run_logs", || {
                    delete_old_logs(&self.pool, age, batch)
                })
                .await?;
        }
        if self.settings.artifacts.is_some() || self.settings.runs.is_some() {
            loop {
                if stop.is_cancelled() || !self.renew().await? {
                    break;
                }
                let expired = expired_artifacts(
                    &self.pool,
                    self.settings.artifacts,
                    self.settings.runs,
                    batch,
                )
                .await?;
                if expired.is_empty() {
                    break;
                }
                let mut ids = Vec::with_capacity(expired.len());
                for artifact in &expired {
                    if let Err(error) = self.artifacts.backend.delete(&artifact.url).await {
                        deleted.files_not_removed += 1;
                        tracing::warn!(artifact_id = %artifact.id, error = %error, "artifact file not removed; deleting its row anyway");
                    }
                    ids.push(artifact.id);
                }
                let rows = delete_artifact_rows(&self.pool, &ids).await?;
                deleted.batches += 1;
                deleted.artifacts += rows;
                crate::measure::retention_deleted("artifacts", rows);
                tracing::info!(rows, "retention deleted artifacts");
                if expired.len() < batch as usize {
                    break;
                }
                tokio::time::sleep(BATCH_PAUSE).await;
            }
        }
        if let Some(age) = self.settings.runs {
            deleted.run_logs += self
                .repeat(stop, &mut deleted.batches, "run_logs", || {
                    delete_logs_of_old_runs(&self.pool, age, batch)
                })
                .await?;
            deleted.runs += self
                .repeat(stop, &mut deleted.batches, "runs", || {
                    delete_old_runs(&self.pool, age, batch)
                })
                .await?;
        }
        Ok(deleted)
    }

    /// Runs one deletion statement until it deletes less than a batch, renewing the hold
    /// between batches; logs and counts every batch.
    async fn repeat<F, Fut>(
        &self,
        stop: &CancellationToken,
        batches: &mut u64,
        kind: &'static str,
        statement: F,
    ) -> Result<u64, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<u64, StoreError>>,
    {
        let mut total = 0;
        loop {
            if stop.is_cancelled() || !self.renew().await? {
                return Ok(total);
            }
            let rows = statement().await?;
            *batches += 1;
            total += rows;
            if rows > 0 {
                crate::measure::retention_deleted(kind, rows);
                tracing::info!(rows, kind, "retention deleted {kind}");
            }
            if rows < u64::from(self.settings.batch_size) {
                return Ok(total);
            }
            tokio::time::sleep(BATCH_PAUSE).await;
        }
    }

    /// Keeps the hold; false (and a warning) when another replica took the task over.
    async fn renew(&self) -> Result<bool, StoreError> {
        let held = renew_task(&self.pool, TASK, &self.worker_id, HOLD).await?;
        if !held {
            tracing::warn!("retention hold lost to another replica; stopping this pass");
        }
        Ok(held)
    }
}
