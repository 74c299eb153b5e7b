//! What `agentd status` reads: one consistent snapshot of the fleet and its backlog.

use super::exec;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::StoreError;

/// A registered replica.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct WorkerRow {
    pub id: String,
    pub host: String,
    pub pid: i32,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// Runs it holds an unexpired lease on.
    pub runs_in_flight: i64,
}

/// Leases held by a worker id, registered or not (a replica killed without deregistering,
/// whose runs the reaper has not settled yet).
#[derive(Debug, Clone, Serialize)]
pub struct InFlightRow {
    pub worker_id: String,
    pub runs: i64,
    /// Of those, leases already expired (the reaper will fail them).
    pub expired: i64,
}

/// A schedule whose current definition is invalid.
#[derive(Debug, Clone, Serialize)]
pub struct InvalidRow {
    pub schedule_id: Uuid,
    pub agent_id: Uuid,
    pub error: String,
    pub since: DateTime<Utc>,
}

/// The snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct StatusSnapshot {
    pub now: DateTime<Utc>,
    pub workers: Vec<WorkerRow>,
    pub in_flight: Vec<InFlightRow>,
    pub schedules_due: i64,
    pub oldest_due: Option<DateTime<Utc>>,
    /// Enabled schedules waiting for a worker to compute their first `next_run`: those the
    /// claim will plan (queued in `agentd.schedules_to_plan`), not the invalid or used-up
    /// ones, whose `next_run` stays NULL until their definition changes.
    pub schedules_unplanned: i64,
    /// Schedules with nothing left to fire for their current definition (a `once` whose
    /// slot has come, fired or passed).
    pub used_up_total: i64,
    pub requests_waiting: i64,
    pub oldest_request: Option<DateTime<Utc>>,
    /// Conversations with user messages waiting for a turn, and when the oldest arrived.
    pub conversations_waiting: i64,
    pub oldest_message: Option<DateTime<Utc>>,
    /// Turns running now.
    pub turns_running: i64,
    pub invalid_total: i64,
    /// The most recent invalid schedules (at most [`INVALID_LISTED`]).
    pub invalid: Vec<InvalidRow>,
    /// Runs that ended in the last hour, by status, and runs running now.
    pub completed_last_hour: i64,
    pub failed_last_hour: i64,
    pub running: i64,
    pub connections: ServerConnections,
}

/// The server's connection limit and who uses it, for the connection budget.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConnections {
    /// `max_connections`.
    pub max_connections: i64,
    /// Slots only superusers (and, from PostgreSQL 16, `pg_use_reserved_connections`) may
    /// take: `superuser_reserved_connections` + `reserved_connections`.
    pub reserved: i64,
    /// Client connections open on the server now, whoever opened them (this one excluded).
    pub in_use: i64,
    /// Connections agentd opened to this database, by application name (`agentd`,
    /// `agentd listener`, `agentd readiness`; this one excluded).
    pub by_agentd: Vec<(String, i64)>,
}

/// Most invalid schedules listed one by one.
pub const INVALID_LISTED: i64 = 20;

/// Reads the snapshot in one read-only, repeatable-read transaction.
pub async fn snapshot(pool: &PgPool) -> Result<StatusSnapshot, StoreError> {
    let mut tx = pool.begin().await?;
    exec::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let now: DateTime<Utc> = exec::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await?;
    let workers: Vec<WorkerRow> = exec::query_as(
        r#"
        SELECT w.id, w.host, w.pid, w.version, w.started_at, w.last_seen_at,
               count(l.run_id) FILTER (WHERE l.expires_at > now()) AS runs_in_flight
          FROM agentd.workers w
          -- Slots claimed ahead of their instant are not runs yet.
          LEFT JOIN agentd.leases l ON l.worker_id = w.id
               AND NOT EXISTS (SELECT 1 FROM agentd.ahead_fires a WHERE a.run_id = l.run_id)
         GROUP BY w.id
         ORDER BY w.id
        "#,
    )
    .fetch_all(&mut *tx)
    .await?;
    let in_flight: Vec<(String, i64, i64)> = exec::query_as(
        r#"
        SELECT worker_id, count(*), count(*) FILTER (WHERE expires_at <= now())
          FROM agentd.leases l
         WHERE NOT EXISTS (SELECT 1 FROM agentd.ahead_fires a WHERE a.run_id = l.run_id)
         GROUP BY worker_id
         ORDER BY worker_id
        "#,
    )
    .fetch_all(&mut *tx)
    .await?;
    let (schedules_due, oldest_due): (i64, Option<DateTime<Utc>>) = exec::query_as(
        "SELECT count(*), min(next_run) FROM public.agent_schedules \
         WHERE enabled AND next_run IS NOT NULL AND next_run <= now()",
    )
    .fetch_one(&mut *tx)
    .await?;
    // What the claim's lock query plans: queued rows still enabled without a next_run.
    let schedules_unplanned: i64 = exec::query_scalar(
        r#"
        SELECT count(*)
          FROM agentd.schedules_to_plan q
          JOIN public.agent_schedules s ON s.id = q.schedule_id
         WHERE s.enabled AND s.next_run IS NULL
        "#,
    )
    .fetch_one(&mut *tx)
    .await?;
    let (requests_waiting, oldest_request): (i64, Option<DateTime<Utc>>) =
        exec::query_as("SELECT count(*), min(requested_at) FROM agentd.requests")
            .fetch_one(&mut *tx)
            .await?;
    let (conversations_waiting, oldest_message, turns_running): (i64, Option<DateTime<Utc>>, i64) =
        exec::query_as(
            "SELECT count(*), min(first_at), \
                    (SELECT count(*) FROM agentd.turns WHERE NOT ended) \
               FROM agentd.waiting_conversations",
        )
        .fetch_one(&mut *tx)
        .await?;
    // Only invalid states that still describe the current definition (an edited schedule
    // is looked at again).
    let invalid_total: i64 = exec::query_scalar(
        r#"
        SELECT count(*)
          FROM agentd.schedule_states st
          JOIN public.agent_schedules s ON s.id = st.schedule_id
         WHERE st.state = 'invalid'
           AND st.definition_hash = agentd.schedule_definition_hash(s)
        "#,
    )
    .fetch_one(&mut *tx)
    .await?;
    let used_up_total: i64 = exec::query_scalar(
        r#"
        SELECT count(*)
          FROM agentd.schedule_states st
          JOIN public.agent_schedules s ON s.id = st.schedule_id
         WHERE st.state = 'exhausted'
           AND st.definition_hash = agentd.schedule_definition_hash(s)
        "#,
    )
    .fetch_one(&mut *tx)
    .await?;
    let invalid: Vec<(Uuid, Uuid, Option<String>, DateTime<Utc>)> = exec::query_as(
        r#"
        SELECT s.id, s.agent_id, st.error, st.updated_at
          FROM agentd.schedule_states st
          JOIN public.agent_schedules s ON s.id = st.schedule_id
         WHERE st.state = 'invalid'
           AND st.definition_hash = agentd.schedule_definition_hash(s)
         ORDER BY st.updated_at DESC, s.id
         LIMIT $1
        "#,
    )
    .bind(INVALID_LISTED)
    .fetch_all(&mut *tx)
    .await?;
    let (completed_last_hour, failed_last_hour): (i64, i64) = exec::query_as(
        r#"
        SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed')
          FROM public.runs
         WHERE status <> 'running' AND end_time > now() - interval '1 hour'
        "#,
    )
    .fetch_one(&mut *tx)
    .await?;
    let running: i64 =
        exec::query_scalar("SELECT count(*) FROM public.runs WHERE status = 'running'")
            .fetch_one(&mut *tx)
            .await?;
    let (max_connections, reserved, in_use): (i64, i64, i64) = exec::query_as(
        r#"
        SELECT current_setting('max_connections')::bigint,
               current_setting('superuser_reserved_connections')::bigint
                 + coalesce(current_setting('reserved_connections', true)::bigint, 0),
               (SELECT count(*) FROM pg_stat_activity
                 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())
        "#,
    )
    .fetch_one(&mut *tx)
    .await?;
    let by_agentd: Vec<(String, i64)> = exec::query_as(
        r#"
        SELECT application_name, count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name LIKE 'agentd%'
           AND pid <> pg_backend_pid()
         GROUP BY application_name
         ORDER BY application_name
        "#,
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(StatusSnapshot {
        now,
        workers,
        in_flight: in_flight
            .into_iter()
            .map(|(worker_id, runs, expired)| InFlightRow {
                worker_id,
                runs,
                expired,
            })
            .collect(),
        schedules_due,
        oldest_due,
        schedules_unplanned,
        used_up_total,
        requests_waiting,
        oldest_request,
        conversations_waiting,
        oldest_message,
        turns_running,
        invalid_total,
        invalid: invalid
            .into_iter()
            .map(|(schedule_id, agent_id, error, since)| InvalidRow {
                schedule_id,
                agent_id,
                error: error.unwrap_or_default(),
                since,
            })
            .collect(),
        completed_last_hour,
        failed_last_hour,
        running,
        connections: ServerConnections {
            max_connections,
            reserved,
            in_use,
            by_agentd,
        },
    })
}
