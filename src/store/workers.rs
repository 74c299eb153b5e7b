//! Workers and leases: registration, the batched heartbeat, and the reaper's statement.

use super::exec;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::StoreError;

/// What a replica says about itself.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
}

/// Registers (or re-registers) this worker; `started_at` is reset on every start.
pub async fn register_worker(pool: &PgPool, worker: &WorkerInfo) -> Result<(), StoreError> {
    exec::query(
        r#"
        INSERT INTO agentd.workers (id, host, pid, version, started_at, last_seen_at)
        VALUES ($1, $2, $3, $4, now(), now())
        ON CONFLICT (id) DO UPDATE
           SET host = excluded.host, pid = excluded.pid, version = excluded.version,
               started_at = now(), last_seen_at = now()
        "#,
    )
    .bind(&worker.id)
    .bind(&worker.host)
    .bind(worker.pid as i32)
    .bind(&worker.version)
    .execute(exec::on(pool))
    .await?;
    Ok(())
}

/// Writes the limits the SQL functions apply (`requests.max_pending_per_user`): the
/// database has no other way to know this replica's settings.
pub async fn publish_limits(pool: &PgPool, max_pending_per_user: u32) -> Result<(), StoreError> {
    exec::query(
        r#"
        INSERT INTO agentd.limits (id, max_pending_per_user) VALUES (true, $1)
        ON CONFLICT (id) DO UPDATE
           SET max_pending_per_user = excluded.max_pending_per_user, updated_at = now()
         WHERE agentd.limits.max_pending_per_user IS DISTINCT FROM excluded.max_pending_per_user
        "#,
    )
    .bind(max_pending_per_user.min(i32::MAX as u32) as i32)
    .execute(exec::on(pool))
    .await?;
    Ok(())
}

/// Removes this worker from the registry on a clean stop.
pub async fn deregister_worker(pool: &PgPool, worker_id: &str) -> Result<(), StoreError> {
    exec::query("DELETE FROM agentd.workers WHERE id = $1")
        .bind(worker_id)
        .execute(exec::on(pool))
        .await?;
    Ok(())
}

/// Whether the owner of a run `worker_id` holds asked to cancel it: what a polling worker
/// reads instead of the `agentd_cancel` notification (one index read, no write).
pub async fn cancellations_waiting(pool: &PgPool, worker_id: &str) -> Result<bool, StoreError> {
    let waiting = exec::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM agentd.leases \
          WHERE worker_id = $1 AND cancel_requested AND expires_at > now())",
    )
    .bind(worker_id)
    .fetch_one(exec::on(pool))
    .await?;
    Ok(waiting)
}

/// Sends `payload` on `channel` through `pool`, the way the application's triggers notify:
/// the listener's check that notifications reach it.
pub async fn send_notification(
    pool: &PgPool,
    channel: &str,
    payload: &str,
) -> Result<(), StoreError> {
    exec::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(exec::on(pool))
        .await?;
    Ok(())
}

/// A lease this worker still holds after a heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct HeldLease {
    pub run_id: Uuid,
    /// The run's owner asked to cancel it.
    pub cancel_requested: bool,
}

/// The heartbeat, one statement: extends every unexpired lease of `worker_id` among
/// `run_ids` by `ttl`, marks the worker as seen, and returns the leases still held (a run
/// missing from the answer is no longer this worker's).
pub async fn renew_leases(
    pool: &PgPool,
    worker_id: &str,
    run_ids: &[Uuid],
    ttl: std::time::Duration,
) -> Result<Vec<HeldLease>, StoreError> {
    let rows = exec::query(
        r#"
        WITH seen AS (
          UPDATE agentd.workers SET last_seen_at = now() WHERE id = $1
        )
        UPDATE agentd.leases l
           SET expires_at = now() + $3 * interval '1 millisecond'
         WHERE l.worker_id = $1 AND l.run_id = ANY($2) AND l.expires_at > now()
           -- A run deleted, or finished by someone else, is no longer this worker's.
           AND EXISTS (SELECT 1 FROM public.runs r WHERE r.id = l.run_id AND r.status = 'running')
        RETURNING l.run_id, l.cancel_requested
        "#,
    )
    .bind(worker_id)
    .bind(run_ids)
    .bind(ttl.as_millis() as f64)
    .fetch_all(exec::on(pool))
    .await?;
    rows.iter()
        .map(|row| {
            Ok(HeldLease {
                run_id: row.try_get("run_id")?,
                cancel_requested: row.try_get("cancel_requested")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// A run whose worker stopped renewing its lease.
#[derive(Debug, Clone)]
pub struct ReapedRun {
    pub run_id: Uuid,
    pub worker_id: String,
    pub expired_at: DateTime<Utc>,
}

/// Ends up to `limit` expired leases and marks their runs failed ("worker lost"), in one
/// statement. Any replica may run it; row locks make each lease reaped once. The lease of
/// a slot claimed ahead (no run yet) is not this one's: [`return_expired_ahead`] gives the
/// slot back with it, and a slot whose lease this took would be left with neither.
pub async fn reap_expired_leases(
    pool: &PgPool,
    limit: usize,
) -> Result<Vec<ReapedRun>, StoreError> {
    let rows = exec::query(
        r#"
        WITH expired AS (
          SELECT run_id FROM agentd.leases l
           WHERE expires_at <= now()
             AND NOT EXISTS (SELECT 1 FROM agentd.ahead_fires a WHERE a.run_id = l.run_id)
           ORDER BY expires_at
           LIMIT $1
           FOR UPDATE SKIP LOCKED
        ), ended AS (
          DELETE FROM agentd.leases l USING expired e WHERE l.run_id = e.run_id
          RETURNING l.run_id, l.worker_id, l.expires_at
        ), failed AS (
          UPDATE public.runs r
             SET status = 'failed', end_time = now(),
                 duration = least(extract(epoch FROM (now() - r.start_time)) * 1000, 2147483647)::integer,
                 error = 'worker lost: ' || e.worker_id || ' stopped renewing its lease, which expired at '
                         || to_char(e.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
            FROM ended e
           WHERE r.id = e.run_id AND r.status = 'running'
        )
        SELECT run_id, worker_id, expires_at FROM ended
        "#,
    )
    .bind(limit as i64)
    .fetch_all(exec::on(pool))
    .await?;
    rows.iter()
        .map(|row| {
            Ok(ReapedRun {
                run_id: row.try_get("run_id")?,
                worker_id: row.try_get("worker_id")?,
                expired_at: row.try_get("expires_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// Gives back up to `limit` slots claimed ahead whose lease expired before their run was
/// started (the replica that claimed them died or stopped): another replica fires them,
/// late (see `agentd.return_ahead_fires`), and any whose lease is gone altogether. Returns
/// how many. Nothing is locked here: the function takes the schedules' rows and then the
/// slots, in the application's order, skipping what another transaction holds.
pub async fn return_expired_ahead(pool: &PgPool, limit: usize) -> Result<u64, StoreError> {
    let returned: i32 = exec::query_scalar(
        r#"
        SELECT agentd.return_ahead_fires(ARRAY(
          SELECT a.run_id FROM agentd.ahead_fires a
           WHERE NOT EXISTS (SELECT 1 FROM agentd.leases l
                              WHERE l.run_id = a.run_id AND l.expires_at > now())
           LIMIT $1))
        "#,
    )
    .bind(limit as i64)
    .fetch_one(exec::on(pool))
    .await?;
    Ok(returned.max(0) as u64)
}

/// When the earliest lease expires, relative to the database's clock (`None`: no leases).
pub async fn next_lease_expiry(pool: &PgPool) -> Result<Option<std::time::Duration>, StoreError> {
    let seconds: Option<f64> = exec::query_scalar(
        "SELECT extract(epoch FROM min(expires_at) - now())::float8 FROM agentd.leases",
    )
    .fetch_one(exec::on(pool))
    .await?;
    // NULL: no lease at all; negative: one has already expired.
    Ok(seconds.map(|seconds| std::time::Duration::from_secs_f64(seconds.max(0.0))))
}
