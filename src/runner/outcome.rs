//! Recording a run's outcome: the `runs` row's final status, output, error and
//! `resource_usage`, with the run's last log lines, in one fenced statement shared by every
//! run ending at the same moment ([`Recorder`]).

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::batch::Batcher;
use super::control::RunControl;
use crate::domain::RunResult;
use crate::executor::Outcome;
use crate::executor::redact::Redactor;
use crate::retry::Retry;
use crate::store::runs::{Fenced, LogLine, RunOutcome, finish_runs, storable_json, storable_text};

/// Most outcomes in one statement. One writer per replica: fewer, larger statements cost
/// the database less than several smaller ones in parallel.
const MAX_GROUP: usize = 1000;

/// `runs.resource_usage`: the executor's own figures and the runner's; a name in both keeps
/// the runner's value.
#[derive(serde::Serialize)]
pub struct UsageRecord<'a> {
    #[serde(flatten)]
    pub executor_figures: serde_json::Map<String, serde_json::Value>,
    pub duration_ms: u64,
    /// How long the run held its slot: from its start to its executor's end (the writes
    /// after that do not hold one), to the microsecond.
    pub slot_ms: f64,
    pub log_lines: u64,
    pub log_bytes: u64,
    pub log_lines_dropped: u64,
    pub log_bytes_dropped: u64,
    pub artifacts: u64,
    pub artifact_bytes: u64,
    pub artifacts_rejected: u64,
    pub executor: &'a str,
}

impl UsageRecord<'_> {
    /// The runner's figures, by name.
    const RUNNER_FIGURES: [&'static str; 10] = [
        "duration_ms",
        "slot_ms",
        "log_lines",
        "log_bytes",
        "log_lines_dropped",
        "log_bytes_dropped",
        "artifacts",
        "artifact_bytes",
        "artifacts_rejected",
        "executor",
    ];

    /// As JSON text (rendered once, not built as a map and serialized again).
    pub fn render(mut self) -> String {
        self.executor_figures
            .retain(|name, _| !Self::RUNNER_FIGURES.contains(&name.as_str()));
        // Only strings, numbers and a map with string keys: serializing cannot fail.
        serde_json::to_string(&self).unwrap_or_else(|_| "{}".to_string())
    }
}

/// What an executor produced, as the database can hold it (no NUL anywhere).
pub fn run_outcome(outcome: Outcome, resource_usage: String) -> RunOutcome {
    match outcome {
        Outcome::Completed { output } => RunOutcome {
            result: RunResult::Completed,
            output: Some(storable_json(output)),
            error: None,
            resource_usage: Some(resource_usage),
        },
        Outcome::Failed { error, output } => RunOutcome {
            result: RunResult::Failed,
            output: output.map(storable_json),
            error: Some(storable_text(error)),
            resource_usage: Some(resource_usage),
        },
    }
}

/// A run's outcome and last lines, shared so that a retry sends them again without a copy.
type OutcomeRequest = (Uuid, Arc<RunOutcome>, Arc<[LogLine]>);

/// The replica's writer of outcomes.
#[derive(Clone)]
pub struct Recorder {
    writer: Batcher<OutcomeRequest, Fenced>,
    max_backoff: Duration,
}

impl Recorder {
    /// A recorder writing as `worker_id`, retrying up to `max_backoff` apart.
    pub fn new(pool: PgPool, worker_id: String, max_backoff: Duration) -> Recorder {
        let writer = Batcher::spawn(1, MAX_GROUP, move |outcomes: Vec<OutcomeRequest>| {
            let pool = pool.clone();
            let worker_id = worker_id.clone();
            async move {
                let views: Vec<(Uuid, &RunOutcome, &[LogLine])> = outcomes
                    .iter()
                    .map(|(id, outcome, lines)| (*id, &**outcome, &**lines))
                    .collect();
                let written = finish_runs(&pool, &worker_id, &views).await;
                drop(views);
                (outcomes, written)
            }
        });
        Recorder {
            writer,
            max_backoff,
        }
    }

    /// Writes the outcome and the run's last lines, retrying with backoff while the
    /// database is unreachable and the lease is still valid. Returns whether it was
    /// written.
    ///
    /// An outcome the database refuses for its data (SQLSTATE classes 22 and 23) is not
    /// sent again: the run is recorded as failed with the database's reason instead,
    /// without output or last lines. Whatever the database answers, the lease is no longer
    /// renewed, so the run ends within one lease.
    pub async fn record(
        &self,
        run_id: Uuid,
        control: &RunControl,
        mut outcome: Arc<RunOutcome>,
        mut last_lines: Arc<[LogLine]>,
        redactor: &Redactor,
    ) -> bool {
        let mut retry = Retry::up_to(self.max_backoff);
        let mut refused_once = false;
        loop {
            match self
                .writer
                .call((run_id, Arc::clone(&outcome), Arc::clone(&last_lines)))
                .await
            {
                Ok(Fenced::Written) => {
                    tracing::info!(
                        status = outcome.result.status().as_str(),
                        error = outcome.error.as_deref().map(|error| redactor.redact(error)),
                        "run finished"
                    );
                    return true;
                }
                Ok(Fenced::LeaseLost) => {
                    tracing::warn!("outcome refused: this worker no longer holds the run's lease");
                    control.lose_lease();
                    return false;
                }
                Err(error) if error.is_data_error() && !refused_once => {
                    crate::measure::database_error("record_outcome");
                    tracing::warn!(
                        sqlstate = error.sqlstate(),
                        "the database refused the run's outcome; recording the run as failed instead"
                    );
                    refused_once = true;
                    let reason = crate::text::quoted(&error.to_string());
                    outcome = Arc::new(RunOutcome {
                        result: RunResult::Failed,
                        output: None,
                        error: Some(storable_text(format!(
                            "the run's outcome could not be stored: {}",
                            redactor.redact(&reason)
                        ))),
                        resource_usage: None,
                    });
                    last_lines = Arc::from(Vec::new());
                }
                Err(error) if error.is_data_error() => {
                    crate::measure::database_error("record_outcome");
                    tracing::error!(
                        sqlstate = error.sqlstate(),
                        "the database refused even the failure record; the run's lease will expire and it will be recorded as lost"
                    );
                    return false;
                }
                Err(error) => {
                    crate::measure::database_error("record_outcome");
                    if control.lease_expired_locally() {
                        tracing::warn!(error = %error, "outcome not recorded: the database stayed unreachable until the lease expired");
                        return false;
                    }
                    let delay = retry.failed();
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "recording the outcome failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_record_has_every_figure_once_the_runners_winning() {
        let mut executor_figures = serde_json::Map::new();
        executor_figures.insert("tokens".into(), serde_json::json!(42));
        executor_figures.insert("duration_ms".into(), serde_json::json!("executor's"));
        executor_figures.insert("executor".into(), serde_json::json!("executor's"));
        let text = UsageRecord {
            executor_figures,
            duration_ms: 7,
            slot_ms: 6.5,
            log_lines: 1,
            log_bytes: 2,
            log_lines_dropped: 3,
            log_bytes_dropped: 4,
            artifacts: 5,
            artifact_bytes: 6,
            artifacts_rejected: 8,
            executor: "builtin",
        }
        .render();
        assert_eq!(text.matches("\"duration_ms\"").count(), 1, "{text}");
        assert_eq!(text.matches("\"executor\"").count(), 1, "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        // The names the executor's figures give way to are exactly the record's own.
        let mut own: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|name| *name != "tokens")
            .collect();
        own.sort_unstable();
        let mut listed = UsageRecord::RUNNER_FIGURES.to_vec();
        listed.sort_unstable();
        assert_eq!(own, listed);
        assert_eq!(
            value,
            serde_json::json!({
                "tokens": 42, "duration_ms": 7, "slot_ms": 6.5, "log_lines": 1, "log_bytes": 2,
                "log_lines_dropped": 3, "log_bytes_dropped": 4, "artifacts": 5,
                "artifact_bytes": 6, "artifacts_rejected": 8, "executor": "builtin",
            })
        );
    }
}
