//! What agentd measures, in one place: every metric's name, labels and meaning, and one
//! function per event, so that the code that counts reads as what happened.
//!
//! The `metrics` facade records into whatever recorder is installed: the Prometheus one when
//! `http.listen` is set ([`install`]), none otherwise (then every call here is a no-op).
//! `docs/operations.md` lists the same names; a test checks that the two agree.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SCHEDULES_FIRED: &str = "agentd_schedules_fired_total";
pub const SCHEDULES_SKIPPED: &str = "agentd_schedules_skipped_total";
pub const SCHEDULES_INVALID: &str = "agentd_schedules_invalid_total";
pub const RUNS_STARTED: &str = "agentd_runs_started_total";
pub const RUNS_FINISHED: &str = "agentd_runs_finished_total";
pub const RUNS_IN_FLIGHT: &str = "agentd_runs_in_flight";
pub const SCHEDULING_LAG: &str = "agentd_scheduling_lag_seconds";
pub const RUN_DURATION: &str = "agentd_run_duration_seconds";
pub const LOG_LINES: &str = "agentd_log_lines_written_total";
pub const LOG_BYTES: &str = "agentd_log_bytes_written_total";
pub const LOG_LINES_DROPPED: &str = "agentd_log_lines_dropped_total";
pub const ARTIFACTS: &str = "agentd_artifacts_stored_total";
pub const ARTIFACT_BYTES: &str = "agentd_artifact_bytes_stored_total";
pub const ARTIFACTS_REJECTED: &str = "agentd_artifacts_rejected_total";
pub const CLAIM_BATCH: &str = "agentd_claim_batch_size";
pub const DATABASE_ERRORS: &str = "agentd_database_errors_total";
pub const DATABASE_RECONNECTS: &str = "agentd_database_reconnects_total";
pub const DATABASE_REBUILDS: &str = "agentd_database_rebuilds_total";
pub const LEASES_REAPED: &str = "agentd_leases_reaped_total";
pub const LOOP_RESTARTS: &str = "agentd_worker_loop_restarts_total";
pub const RETENTION_DELETED: &str = "agentd_retention_deleted_total";
pub const WORKER_INFO: &str = "agentd_worker_info";
pub const TURNS_STARTED: &str = "agentd_turns_started_total";
pub const TURNS_FINISHED: &str = "agentd_turns_finished_total";
pub const TURN_START_LAG: &str = "agentd_turn_start_lag_seconds";
pub const TURN_FIRST_TEXT: &str = "agentd_turn_first_text_seconds";

/// Every metric agentd exports, with its help text (what the operator's guide documents).
pub const CATALOG: &[(&str, &str)] = &[
    (SCHEDULES_FIRED, "Schedule slots that fired a run."),
    (
        SCHEDULES_SKIPPED,
        "Schedule slots that fired nothing, by reason (overlap, misfire).",
    ),
    (
        SCHEDULES_INVALID,
        "Schedule definitions found invalid (each reported once).",
    ),
    (
        RUNS_STARTED,
        "Runs started, by type (agent, team) and trigger (schedule, request, message).",
    ),
    (
        RUNS_FINISHED,
        "Runs finished, by type and status (completed, failed).",
    ),
    (RUNS_IN_FLIGHT, "Runs executing on this replica now."),
    (
        SCHEDULING_LAG,
        "Seconds from a scheduled run's slot to its start (start_time - scheduled_for).",
    ),
    (
        RUN_DURATION,
        "Seconds a run took from start to outcome, by type and status.",
    ),
    (LOG_LINES, "Run log lines stored."),
    (LOG_BYTES, "Bytes of run log messages stored."),
    (
        LOG_LINES_DROPPED,
        "Run log lines not stored, by reason: limit (over run_logs.max_lines_per_run or \
         max_bytes_per_run), outage (the buffer held while the database was unreachable \
         overflowed), lease_lost (the run was no longer this worker's), refused (the \
         database refused the batch).",
    ),
    (ARTIFACTS, "Artifacts stored."),
    (ARTIFACT_BYTES, "Bytes of artifacts stored."),
    (
        ARTIFACTS_REJECTED,
        "Artifacts not stored because they exceeded a size limit.",
    ),
    (
        CLAIM_BATCH,
        "Schedules, requests or conversation turns taken by one claim transaction.",
    ),
    (
        DATABASE_ERRORS,
        "Failed database operations (each retried), by operation.",
    ),
    (
        DATABASE_RECONNECTS,
        "Database connections opened to replace one that was lost: dropped by the server, \
         found dead before use, or closed after a failover (pooled connections and the \
         notification connection alike).",
    ),
    (
        DATABASE_REBUILDS,
        "Times every database connection was replaced because the server answered read-only, \
         in recovery, or dropped a connection (failover), by reason.",
    ),
    (
        LEASES_REAPED,
        "Runs marked failed because their worker's lease expired (worker lost).",
    ),
    (
        LOOP_RESTARTS,
        "Times a worker loop panicked or ended unexpectedly and was started again, by loop.",
    ),
    (
        RETENTION_DELETED,
        "Rows deleted by retention, by kind (run_logs, artifacts, runs).",
    ),
    (
        TURNS_STARTED,
        "Conversation turns started (claimed) on this replica.",
    ),
    (
        TURNS_FINISHED,
        "Conversation turns whose reply was made final, by status (completed, failed, \
         interrupted, cancelled).",
    ),
    (
        TURN_START_LAG,
        "Seconds from a turn's oldest user message arriving to the turn's claim.",
    ),
    (
        TURN_FIRST_TEXT,
        "Seconds from a turn's oldest user message arriving to its reply's first stored text.",
    ),
    (
        WORKER_INFO,
        "Always 1; labels carry this replica's version and worker_id.",
    ),
];

/// Seconds: from a millisecond to an hour.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// Installs the process-wide Prometheus recorder and describes every metric. Called once by
/// the daemon when the HTTP endpoints are on; a second call (tests running several workers
/// in one process) returns `None` and the first recorder keeps counting.
pub fn install(worker_id: &str) -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|builder| {
            builder.set_buckets_for_metric(Matcher::Full(CLAIM_BATCH.into()), BATCH_BUCKETS)
        })
        .ok()?;
    let handle = builder.install_recorder().ok()?;
    describe();
    gauge!(WORKER_INFO, "version" => env!("CARGO_PKG_VERSION"), "worker_id" => worker_id.to_string())
        .set(1.0);
    gauge!(RUNS_IN_FLIGHT).set(0.0);
    register_at_zero();
    Some(handle)
}

/// Label values of `agentd_schedules_skipped_total`'s `reason`.
pub const SKIP_REASONS: &[&str] = &["overlap", "misfire"];
/// Label values of the runs' `type`.
pub const RUN_TYPES: &[&str] = &["agent", "team"];
/// Label values of `agentd_runs_started_total`'s `trigger`.
pub const RUN_TRIGGERS: &[&str] = &["schedule", "request", "message"];
/// Label values of a finished run's `status`.
pub const RUN_STATUSES: &[&str] = &["completed", "failed"];
/// Label values of `agentd_turns_finished_total`'s `status`.
pub const TURN_STATUSES: &[&str] = &["completed", "failed", "interrupted", "cancelled"];
/// Label values of `agentd_database_errors_total`'s `operation`.
pub const DATABASE_OPERATIONS: &[&str] = &[
    "claim",
    "start_ahead",
    "listen",
    "heartbeat",
    "reap",
    "logs",
    "artifact",
    "load_target",
    "record_outcome",
    "retention",
    "claim_requests",
    "claim_turns",
    "load_history",
    "write_reply",
    "finish_reply",
    "end_orphaned_turns",
];
/// Label values of `agentd_database_rebuilds_total`'s `reason`.
pub const REBUILD_REASONS: &[&str] = &["read_only", "recovery", "connection_lost"];
/// Label values of `agentd_worker_loop_restarts_total`'s `loop`: the worker's loops and the
/// readiness check, each supervised under this name.
pub const LOOPS: &[&str] = &[
    "scheduler",
    "requests",
    "conversations",
    "listener",
    "lease keeper",
    "reaper",
    "retention",
    "readiness check",
];
/// Label values of `agentd_retention_deleted_total`'s `kind`.
pub const RETENTION_KINDS: &[&str] = &["run_logs", "artifacts", "runs"];

/// Why run log lines were not stored (`agentd_log_lines_dropped_total`'s `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDropReason {
    /// Over `run_logs.max_lines_per_run` or `max_bytes_per_run`.
    Limit,
    /// The lines held while the database was unreachable overflowed their buffer.
    Outage,
    /// The run was no longer this worker's (its lease was lost or expired).
    LeaseLost,
    /// The database refused the batch (a data error: the same lines would fail again).
    Refused,
}

impl LogDropReason {
    /// Every reason, for the series registered at zero.
    pub const ALL: [LogDropReason; 4] = [
        LogDropReason::Limit,
        LogDropReason::Outage,
        LogDropReason::LeaseLost,
        LogDropReason::Refused,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LogDropReason::Limit => "limit",
            LogDropReason::Outage => "outage",
            LogDropReason::LeaseLost => "lease_lost",
            LogDropReason::Refused => "refused",
        }
    }
}

/// Registers every series at zero, each labelled one with every value its label takes, so
/// a fresh replica exports them all: `increase()` and absence alerts need a series before
/// its first event.
fn register_at_zero() {
    for name in [
        SCHEDULES_FIRED,
        SCHEDULES_INVALID,
        LOG_LINES,
        LOG_BYTES,
        ARTIFACTS,
        ARTIFACT_BYTES,
        ARTIFACTS_REJECTED,
        DATABASE_RECONNECTS,
        LEASES_REAPED,
        TURNS_STARTED,
    ] {
        counter!(name).absolute(0);
    }
    for name in [SCHEDULING_LAG, CLAIM_BATCH, TURN_START_LAG, TURN_FIRST_TEXT] {
        let _ = histogram!(name);
    }
    for reason in SKIP_REASONS {
        counter!(SCHEDULES_SKIPPED, "reason" => *reason).absolute(0);
    }
    for kind in RUN_TYPES {
        for trigger in RUN_TRIGGERS {
            counter!(RUNS_STARTED, "type" => *kind, "trigger" => *trigger).absolute(0);
        }
        for status in RUN_STATUSES {
            counter!(RUNS_FINISHED, "type" => *kind, "status" => *status).absolute(0);
            let _ = histogram!(RUN_DURATION, "type" => *kind, "status" => *status);
        }
    }
    for reason in LogDropReason::ALL {
        counter!(LOG_LINES_DROPPED, "reason" => reason.as_str()).absolute(0);
    }
    for operation in DATABASE_OPERATIONS {
        counter!(DATABASE_ERRORS, "operation" => *operation).absolute(0);
    }
    for reason in REBUILD_REASONS {
        counter!(DATABASE_REBUILDS, "reason" => *reason).absolute(0);
    }
    for service in LOOPS {
        counter!(LOOP_RESTARTS, "loop" => *service).absolute(0);
    }
    for kind in RETENTION_KINDS {
        counter!(RETENTION_DELETED, "kind" => *kind).absolute(0);
    }
    for status in TURN_STATUSES {
        counter!(TURNS_FINISHED, "status" => *status).absolute(0);
    }
}

fn describe() {
    for (name, help) in CATALOG {
        let name = *name;
        if name.ends_with("_total") {
            describe_counter!(name, *help);
        } else if name.ends_with("_seconds") || name == CLAIM_BATCH {
            describe_histogram!(name, *help);
        } else {
            describe_gauge!(name, *help);
        }
    }
}

/// A schedule slot fired a run.
pub fn schedule_fired() {
    counter!(SCHEDULES_FIRED).increment(1);
}

/// A schedule slot fired nothing (`overlap` or `misfire`).
pub fn schedule_skipped(reason: &'static str) {
    counter!(SCHEDULES_SKIPPED, "reason" => reason).increment(1);
}

/// A schedule definition was found invalid.
pub fn schedule_invalid() {
    counter!(SCHEDULES_INVALID).increment(1);
}

/// A claim took `size` schedules and requests.
pub fn claim_batch(size: usize) {
    if size > 0 {
        histogram!(CLAIM_BATCH).record(size as f64);
    }
}

/// A conversation turn was claimed here; its oldest message had waited `lag`.
pub fn turn_started(lag: Duration) {
    counter!(TURNS_STARTED).increment(1);
    histogram!(TURN_START_LAG).record(lag.as_secs_f64());
}

/// A turn's reply first showed text, `after` its oldest message arrived.
pub fn turn_first_text(after: Duration) {
    histogram!(TURN_FIRST_TEXT).record(after.as_secs_f64());
}

/// A turn's reply was made final with `status`.
pub fn turn_finished(status: &'static str) {
    counter!(TURNS_FINISHED, "status" => status).increment(1);
}

/// A run started on this replica (`trigger`: `schedule` or `request`).
pub fn run_started(kind: &'static str, trigger: &'static str) {
    counter!(RUNS_STARTED, "type" => kind, "trigger" => trigger).increment(1);
    gauge!(RUNS_IN_FLIGHT).increment(1.0);
}

/// A scheduled run started `lag` after its slot (its `start_time - scheduled_for`).
pub fn scheduling_lag(lag: Duration) {
    histogram!(SCHEDULING_LAG).record(lag.as_secs_f64());
}

/// A run started here ended (whether or not its outcome could be recorded).
pub fn run_ended() {
    gauge!(RUNS_IN_FLIGHT).decrement(1.0);
}

/// A run's outcome was recorded.
pub fn run_finished(kind: &'static str, status: &'static str, duration: Duration) {
    counter!(RUNS_FINISHED, "type" => kind, "status" => status).increment(1);
    histogram!(RUN_DURATION, "type" => kind, "status" => status).record(duration.as_secs_f64());
}

/// A batch of log lines was stored.
pub fn log_lines_written(lines: usize, bytes: usize) {
    counter!(LOG_LINES).increment(lines as u64);
    counter!(LOG_BYTES).increment(bytes as u64);
}

/// Log lines of a run were not stored, for `reason`.
pub fn log_lines_dropped(reason: LogDropReason, lines: u64) {
    if lines > 0 {
        counter!(LOG_LINES_DROPPED, "reason" => reason.as_str()).increment(lines);
    }
}

/// An artifact was stored.
pub fn artifact_stored(bytes: u64) {
    counter!(ARTIFACTS).increment(1);
    counter!(ARTIFACT_BYTES).increment(bytes);
}

/// An artifact was refused over a size limit.
pub fn artifact_rejected() {
    counter!(ARTIFACTS_REJECTED).increment(1);
}

/// A database operation failed (and will be retried).
pub fn database_error(operation: &'static str) {
    counter!(DATABASE_ERRORS, "operation" => operation).increment(1);
}

/// A connection was opened to replace a lost one (pooled or the listener's).
pub fn database_reconnected() {
    counter!(DATABASE_RECONNECTS).increment(1);
}

/// Every database connection is being replaced (`reason`: read_only, recovery,
/// connection_lost).
pub fn database_rebuilt(reason: &'static str) {
    counter!(DATABASE_REBUILDS, "reason" => reason).increment(1);
}

/// The reaper failed runs whose leases expired.
pub fn leases_reaped(runs: usize) {
    counter!(LEASES_REAPED).increment(runs as u64);
}

/// A worker loop failed and is started again (or, too often, given up on).
pub fn loop_restarted(service: &'static str) {
    counter!(LOOP_RESTARTS, "loop" => service).increment(1);
}

/// Retention deleted rows of a kind.
pub fn retention_deleted(kind: &'static str, rows: u64) {
    counter!(RETENTION_DELETED, "kind" => kind).increment(rows);
}
