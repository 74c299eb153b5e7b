//! The log pipe of one run: drains the executor's lines and writes them in batches.
//!
//! The last lines of a run (what is pending when the executor is done) are not written here:
//! they go with the run's outcome, in the same fenced statement.
//!
//! A batch is flushed when it reaches [`MAX_BATCH_LINES`] lines or [`FLUSH_INTERVAL`] after
//! its first line, in one fenced multi-row INSERT shared with the batches of the other runs
//! ready at the same moment ([`LogWriter`]), so a chatty run costs few round trips, many
//! runs cost one, and a reader sees lines within a fraction of a second. While the database is
//! unreachable, lines are kept (up to [`MAX_PENDING_LINES`]) and retried with backoff until
//! the run's lease would have expired; a refused (fenced) write means the lease is lost.
//!
//! Bad output gets a clear result: NUL bytes are removed, a line over
//! [`MAX_LINE_BYTES`](crate::executor::MAX_LINE_BYTES) is cut with a marker, and past
//! `run_logs.max_lines_per_run` lines or `run_logs.max_bytes_per_run` bytes nothing more is
//! stored; one `warn` line at the end says how much was dropped. The run itself goes on, and
//! memory stays bounded whatever it prints.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::Utc;
use sqlx::postgres::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::batch::Batcher;
use super::control::RunControl;
use crate::executor::{Level, LogEntry, cut_line};
use crate::measure::LogDropReason;
use crate::store::runs::{Fenced, LogLine, insert_log_batches};

/// The replica's writer of log batches: one statement for the batches of every run that
/// are ready at the same time.
pub type LogWriter = Batcher<(Uuid, Vec<LogLine>), Fenced>;

/// Most runs' batches in one statement (each batch holds up to [`MAX_BATCH_LINES`]).
const MAX_RUNS_PER_STATEMENT: usize = 64;

/// Statements of log batches in flight per replica. Unlike outcomes, lines keep coming
/// while a statement runs, and a run's next batch waits for its previous one, so more
/// than one writer keeps the database busy (docs/benchmarks.md has the measurements).
/// Three of the pool's connections.
const LOG_WRITERS: usize = 3;

/// Starts the log writer of a replica (`worker_id`).
pub fn log_writer(pool: PgPool, worker_id: String) -> LogWriter {
    Batcher::spawn(
        LOG_WRITERS,
        MAX_RUNS_PER_STATEMENT,
        move |batches: Vec<(Uuid, Vec<LogLine>)>| {
            let pool = pool.clone();
            let worker_id = worker_id.clone();
            async move {
                let views: Vec<(Uuid, &[LogLine])> = batches
                    .iter()
                    .map(|(run_id, lines)| (*run_id, lines.as_slice()))
                    .collect();
                let written = insert_log_batches(&pool, &worker_id, &views).await;
                drop(views);
                (batches, written)
            }
        },
    )
}

/// Longest a line waits before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Most lines per INSERT.
pub const MAX_BATCH_LINES: usize = 1000;
/// Most lines kept while the database is unreachable; older ones beyond it are dropped
/// (and counted) so memory stays bounded.
pub const MAX_PENDING_LINES: usize = 100_000;

/// Per-run storage limits (`run_logs.max_lines_per_run`, `run_logs.max_bytes_per_run`).
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    pub max_lines: u64,
    pub max_bytes: u64,
}

/// Totals of what the pipe stored, for `resource_usage`.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogTotals {
    pub lines: u64,
    pub bytes: u64,
    pub dropped_lines: u64,
    pub dropped_bytes: u64,
}

/// Applies the limits to incoming lines.
struct Intake {
    limits: LogLimits,
    accepted_lines: u64,
    accepted_bytes: u64,
    dropped_lines: u64,
    dropped_bytes: u64,
}

impl Intake {
    /// The line, unless a limit is reached. Once one line is dropped every later one is too,
    /// so the stored log never has a hole with lines after it: a shorter line that would
    /// still fit the bytes left is not stored after a longer one that did not.
    fn take(&mut self, entry: LogEntry) -> Option<LogLine> {
        let line = to_line(entry);
        let bytes = line.message.len() as u64;
        if self.dropped_lines > 0
            || self.accepted_lines >= self.limits.max_lines
            || self.accepted_bytes + bytes > self.limits.max_bytes
        {
            self.dropped_lines += 1;
            self.dropped_bytes += bytes;
            return None;
        }
        self.accepted_lines += 1;
        self.accepted_bytes += bytes;
        Some(line)
    }

    /// The one warn line saying what the limits dropped, if they dropped anything.
    fn summary(&self) -> Option<LogLine> {
        (self.dropped_lines > 0).then(|| LogLine {
            id: Uuid::now_v7(),
            level: Level::Warn.as_str(),
            message: format!(
                "log limit reached ({} lines or {} bytes per run): {} further lines ({} bytes) were not stored",
                self.limits.max_lines, self.limits.max_bytes, self.dropped_lines, self.dropped_bytes
            ),
            timestamp: Utc::now(),
        })
    }
}

/// Drains `receiver` until every sender is gone, writing batches; returns the totals of
/// what it wrote and the run's last lines (at most [`MAX_BATCH_LINES`]), which the runner
/// writes with the outcome in one statement.
pub async fn run_pipe(
    writer: LogWriter,
    run_id: Uuid,
    control: RunControl,
    mut receiver: mpsc::Receiver<LogEntry>,
    limits: LogLimits,
    max_backoff: Duration,
) -> (LogTotals, Vec<LogLine>) {
    let mut totals = LogTotals::default();
    let mut retry = crate::retry::Retry::up_to(max_backoff);
    let mut intake = Intake {
        limits,
        accepted_lines: 0,
        accepted_bytes: 0,
        dropped_lines: 0,
        dropped_bytes: 0,
    };
    let mut pending: VecDeque<LogLine> = VecDeque::new();
    let mut open = true;
    while open || !pending.is_empty() {
        if open {
            // Wait for the first line of a batch, then gather more for up to FLUSH_INTERVAL.
            if pending.is_empty() {
                match receiver.recv().await {
                    Some(entry) => pending.extend(intake.take(entry)),
                    None => open = false,
                }
            }
            let deadline = tokio::time::Instant::now() + FLUSH_INTERVAL;
            while open && pending.len() < MAX_BATCH_LINES {
                match tokio::time::timeout_at(deadline, receiver.recv()).await {
                    Ok(Some(entry)) => pending.extend(intake.take(entry)),
                    Ok(None) => open = false,
                    Err(_) => break,
                }
            }
            if !open {
                pending.extend(intake.summary());
            }
        }
        if pending.is_empty() {
            continue;
        }
        if control.lease_lost() {
            // Nobody may write to this run any more; drain and discard.
            totals.dropped_lines += pending.len() as u64;
            crate::measure::log_lines_dropped(LogDropReason::LeaseLost, pending.len() as u64);
            pending.clear();
            continue;
        }
        if !open && pending.len() <= MAX_BATCH_LINES {
            // The run's last lines go with its outcome, in the statement that records it.
            break;
        }
        let batch_len = pending.len().min(MAX_BATCH_LINES);
        let batch = &pending.make_contiguous()[..batch_len];
        match writer.call((run_id, batch.to_vec())).await {
            Ok(Fenced::Written) => {
                let bytes = batch.iter().map(|line| line.message.len()).sum::<usize>();
                totals.lines += batch_len as u64;
                totals.bytes += bytes as u64;
                crate::measure::log_lines_written(batch_len, bytes);
                pending.drain(..batch_len);
                retry.succeeded();
            }
            Ok(Fenced::LeaseLost) => {
                tracing::warn!("log write refused: this worker no longer holds the run's lease");
                control.lose_lease();
            }
            Err(error) if error.is_data_error() => {
                // The same lines would be refused again: they are dropped and counted.
                tracing::warn!(
                    sqlstate = error.sqlstate(),
                    lines = batch_len,
                    "the database refused a batch of log lines; dropping it"
                );
                totals.dropped_lines += batch_len as u64;
                crate::measure::log_lines_dropped(LogDropReason::Refused, batch_len as u64);
                pending.drain(..batch_len);
            }
            Err(error) => {
                if control.lease_expired_locally() {
                    tracing::warn!(
                        lines = pending.len(),
                        error = %error,
                        "dropping log lines: the database stayed unreachable until the lease expired"
                    );
                    control.lose_lease();
                    continue;
                }
                crate::measure::database_error("logs");
                let delay = retry.failed();
                tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "log write failed; retrying");
                // Keep accepting lines meanwhile, within the bound.
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        entry = receiver.recv(), if open => match entry {
                            Some(entry) => {
                                if let Some(line) = intake.take(entry) {
                                    if pending.len() >= MAX_PENDING_LINES {
                                        pending.pop_front();
                                        totals.dropped_lines += 1;
                                        crate::measure::log_lines_dropped(LogDropReason::Outage, 1);
                                    }
                                    pending.push_back(line);
                                }
                            }
                            None => {
                                open = false;
                                pending.extend(intake.summary());
                            }
                        },
                    }
                }
            }
        }
    }
    totals.dropped_lines += intake.dropped_lines;
    totals.dropped_bytes += intake.dropped_bytes;
    crate::measure::log_lines_dropped(LogDropReason::Limit, intake.dropped_lines);
    (totals, pending.into_iter().collect())
}

/// A stored line: no NUL bytes (PostgreSQL text cannot hold them), at most
/// [`MAX_LINE_BYTES`](crate::executor::MAX_LINE_BYTES) bytes (see [`cut_line`]).
fn to_line(entry: LogEntry) -> LogLine {
    let message = if entry.message.contains('\0') {
        entry.message.replace('\0', "")
    } else {
        entry.message
    };
    LogLine {
        id: entry.id,
        level: entry.level.as_str(),
        message: cut_line(message),
        timestamp: entry.timestamp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::MAX_LINE_BYTES;

    fn entry(message: &str) -> LogEntry {
        LogEntry {
            id: Uuid::now_v7(),
            level: Level::Info,
            message: message.to_string(),
            timestamp: Utc::now(),
        }
    }

    #[test]
    fn nul_bytes_are_removed_and_long_lines_cut_on_a_character_boundary() {
        assert_eq!(to_line(entry("a\0b")).message, "ab");
        let long = "é".repeat(MAX_LINE_BYTES);
        let line = to_line(entry(&long));
        assert!(line.message.len() <= MAX_LINE_BYTES);
        assert!(line.message.starts_with("éé"));
        let kept = line.message.find(" … [line").unwrap();
        assert!(line.message.ends_with(&format!(
            " … [line truncated: {} bytes, {kept} kept]",
            long.len()
        )));
        // A cut line gives its memory back, and cutting twice changes nothing.
        let cut = cut_line("x".repeat(10 * 1024 * 1024));
        assert!(cut.capacity() < MAX_LINE_BYTES + 100, "{}", cut.capacity());
        assert_eq!(cut_line(cut.clone()), cut);
    }

    #[test]
    fn limits_drop_and_count() {
        let mut intake = Intake {
            limits: LogLimits {
                max_lines: 2,
                max_bytes: 1000,
            },
            accepted_lines: 0,
            accepted_bytes: 0,
            dropped_lines: 0,
            dropped_bytes: 0,
        };
        assert!(intake.take(entry("one")).is_some());
        assert!(intake.take(entry("two")).is_some());
        assert!(intake.take(entry("three")).is_none());
        assert!(
            intake
                .summary()
                .unwrap()
                .message
                .ends_with("1 further lines (5 bytes) were not stored")
        );

        // Past the bytes: a line that does not fit is dropped, and so is every later one,
        // even one that would fit what is left.
        let mut intake = Intake {
            limits: LogLimits {
                max_lines: 1000,
                max_bytes: 100,
            },
            accepted_lines: 0,
            accepted_bytes: 0,
            dropped_lines: 0,
            dropped_bytes: 0,
        };
        assert!(intake.take(entry(&"a".repeat(50))).is_some());
        assert!(intake.take(entry(&"b".repeat(80))).is_none());
        assert!(intake.take(entry("c")).is_none());
        assert!(
            intake
                .summary()
                .unwrap()
                .message
                .ends_with("2 further lines (81 bytes) were not stored")
        );
    }
}
