//! The artifacts of one run: files a run produced go to the artifact store
//! ([`crate::artifact_store`]) and get a `run_artifacts` row (name, MIME type, size, URL),
//! within `artifacts.max_bytes` per artifact and `artifacts.max_bytes_per_run` per run;
//! what is over a limit is not stored and a `warn` line in the run's logs says so.
//!
//! The limits are checked here, once, on the size an artifact announces, before a byte of
//! it is read.

use sqlx::postgres::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::batch::Batcher;
use super::control::RunControl;
use crate::artifact_store::{ArtifactStore, guess_type, safe_name, unique_name};
use crate::executor::{ArtifactFile, Level, LogSink};
use crate::store::runs::{ArtifactRow, Fenced, insert_artifacts, storable_text};

/// Longest artifact name recorded, in characters (the stored file's name is shorter still).
const MAX_NAME_CHARS: usize = 1000;
/// Longest MIME type recorded, in characters.
const MAX_TYPE_CHARS: usize = 255;

/// What the store kept, for `resource_usage`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ArtifactTotals {
    pub count: u64,
    pub bytes: u64,
    pub rejected: u64,
}

/// Writes the rows of the artifacts of all runs, grouped into one statement for those
/// ready together (as log lines are).
pub type ArtifactWriter = Batcher<(Uuid, ArtifactRow), Fenced>;

/// Most artifact rows per statement.
const MAX_ROWS_PER_STATEMENT: usize = 1000;

/// The replica's artifact row writer.
pub fn artifact_writer(pool: PgPool, worker_id: String) -> ArtifactWriter {
    Batcher::spawn(
        1,
        MAX_ROWS_PER_STATEMENT,
        move |rows: Vec<(Uuid, ArtifactRow)>| {
            let pool = pool.clone();
            let worker_id = worker_id.clone();
            async move {
                let written = insert_artifacts(&pool, &worker_id, &rows).await;
                (rows, written)
            }
        },
    )
}

/// Stores artifacts until every sender is gone.
pub async fn run_store(
    writer: ArtifactWriter,
    run_id: Uuid,
    control: RunControl,
    mut receiver: mpsc::Receiver<ArtifactFile>,
    options: ArtifactStore,
    logs: LogSink,
) -> ArtifactTotals {
    let mut totals = ArtifactTotals::default();
    let mut used_names: Vec<String> = Vec::new();
    while let Some(artifact) = receiver.recv().await {
        let size = artifact.size();
        if size > options.max_bytes || totals.bytes.saturating_add(size) > options.max_bytes_per_run
        {
            totals.rejected += 1;
            crate::measure::artifact_rejected();
            logs.log(
                Level::Warn,
                format!(
                    "artifact {} not stored: {size} bytes is over the limit ({} per artifact, {} per run, {} already used)",
                    crate::text::quoted(&artifact.name), options.max_bytes, options.max_bytes_per_run, totals.bytes
                ),
            )
            .await;
            continue;
        }
        if control.lease_lost() {
            continue;
        }
        let name = unique_name(&safe_name(&artifact.name), &mut used_names);
        let ArtifactFile {
            name: given_name,
            content_type,
            content,
        } = artifact;
        let url = match options.backend.write(run_id, &name, content).await {
            Ok(url) => url,
            Err(error) => {
                totals.rejected += 1;
                tracing::warn!(error = %error, "could not store an artifact");
                logs.log(
                    Level::Warn,
                    format!(
                        "artifact {} not stored: {error}",
                        crate::text::quoted(&given_name)
                    ),
                )
                .await;
                continue;
            }
        };
        // The row holds what the database accepts: no NUL, bounded lengths.
        let row = ArtifactRow {
            content_type: storable_text(
                content_type
                    .map(|given| given.chars().take(MAX_TYPE_CHARS).collect())
                    .unwrap_or_else(|| guess_type(&given_name)),
            ),
            name: storable_text(given_name.chars().take(MAX_NAME_CHARS).collect()),
            size: size.min(i32::MAX as u64) as i32,
            url,
        };
        let given_name = crate::text::quoted(&given_name);
        // The row is retried like log lines while the database is away and the lease holds.
        let mut retry = crate::retry::Retry::up_to(options.max_backoff);
        loop {
            match writer.call((run_id, row.clone())).await {
                Ok(Fenced::Written) => {
                    totals.count += 1;
                    totals.bytes += size;
                    crate::measure::artifact_stored(size);
                }
                Ok(Fenced::LeaseLost) => control.lose_lease(),
                Err(error) if error.is_data_error() => {
                    // Sending the same row again cannot succeed.
                    totals.rejected += 1;
                    tracing::warn!(
                        sqlstate = error.sqlstate(),
                        "the database refused an artifact's row"
                    );
                    logs.log(
                        Level::Warn,
                        format!("artifact {given_name} not recorded: the database refused its row"),
                    )
                    .await;
                }
                Err(error) if !control.lease_expired_locally() && !control.lease_lost() => {
                    crate::measure::database_error("artifact");
                    let delay = retry.failed();
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "recording an artifact failed; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
                Err(error) => {
                    totals.rejected += 1;
                    tracing::warn!(error = %error, "could not record an artifact");
                    logs.log(
                        Level::Warn,
                        format!("artifact {given_name} not recorded: {error}"),
                    )
                    .await;
                }
            }
            break;
        }
    }
    totals
}
