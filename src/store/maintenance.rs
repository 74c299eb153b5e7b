//! Fleet-wide maintenance: the hold on a task (so one replica at a time does it) and the
//! retention deletions, each a short statement over at most one batch of rows.

use super::exec;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::StoreError;

fn millis(duration: Duration) -> f64 {
    duration.as_millis() as f64
}

/// The answer to asking for a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// This worker holds the task now.
    Taken,
    /// Another replica holds it, or it ran less than an interval ago: it is due again at
    /// this time.
    NotDue(DateTime<Utc>),
}

/// Takes `task` for `hold` when nobody holds it and it last finished at least `interval`
/// ago.
pub async fn take_task(
    pool: &PgPool,
    task: &str,
    worker_id: &str,
    hold: Duration,
    interval: Duration,
) -> Result<Hold, StoreError> {
    let (taken, due): (bool, DateTime<Utc>) = exec::query_as(
        r#"
        WITH taken AS (
          UPDATE agentd.maintenance
             SET holder = $2, held_until = now() + $3 * interval '1 millisecond',
                 last_started_at = now()
           WHERE task = $1
             AND (held_until IS NULL OR held_until < now())
             AND (last_finished_at IS NULL
                  OR last_finished_at <= now() - $4 * interval '1 millisecond')
          RETURNING task
        )
        SELECT EXISTS (SELECT 1 FROM taken),
               greatest(coalesce(m.held_until, now()),
                        coalesce(m.last_finished_at + $4 * interval '1 millisecond', now()))
          FROM agentd.maintenance m
         WHERE m.task = $1
        "#,
    )
    .bind(task)
    .bind(worker_id)
    .bind(millis(hold))
    .bind(millis(interval))
    .fetch_one(exec::on(pool))
    .await?;
    Ok(if taken {
        Hold::Taken
    } else {
        Hold::NotDue(due)
    })
}

/// Extends this worker's hold on `task`; false when it is no longer this worker's.
pub async fn renew_task(
    pool: &PgPool,
    task: &str,
    worker_id: &str,
    hold: Duration,
) -> Result<bool, StoreError> {
    let renewed = exec::query(
        "UPDATE agentd.maintenance SET held_until = now() + $3 * interval '1 millisecond' \
         WHERE task = $1 AND holder = $2",
    )
    .bind(task)
    .bind(worker_id)
    .bind(millis(hold))
    .execute(exec::on(pool))
    .await?;
    Ok(renewed.rows_affected() == 1)
}

/// Releases this worker's hold on `task` and records it as finished now.
pub async fn finish_task(pool: &PgPool, task: &str, worker_id: &str) -> Result<(), StoreError> {
    exec::query(
        "UPDATE agentd.maintenance SET holder = NULL, held_until = NULL, last_finished_at = now() \
         WHERE task = $1 AND holder = $2",
    )
    .bind(task)
    .bind(worker_id)
    .execute(exec::on(pool))
    .await?;
    Ok(())
}

/// Deletes up to `limit` run log lines older than `age`; returns how many.
pub async fn delete_old_logs(pool: &PgPool, age: Duration, limit: u32) -> Result<u64, StoreError> {
    let deleted = exec::query(
        r#"
        DELETE FROM public.run_logs
         WHERE id IN (SELECT id FROM public.run_logs
                       WHERE timestamp < now() - $1 * interval '1 millisecond'
                       LIMIT $2)
        "#,
    )
    .bind(millis(age))
    .bind(i64::from(limit))
    .execute(exec::on(pool))
    .await?;
    Ok(deleted.rows_affected())
}

/// Deletes up to `limit` log lines of finished runs that ended more than `age` ago.
pub async fn delete_logs_of_old_runs(
    pool: &PgPool,
    age: Duration,
    limit: u32,
) -> Result<u64, StoreError> {
    let deleted = exec::query(
        r#"
        DELETE FROM public.run_logs
         WHERE id IN (SELECT l.id
                        FROM public.runs r
                        JOIN public.run_logs l ON l.run_id = r.id
                       WHERE r.status <> 'running'
                         AND r.end_time < now() - $1 * interval '1 millisecond'
                       LIMIT $2)
        "#,
    )
    .bind(millis(age))
    .bind(i64::from(limit))
    .execute(exec::on(pool))
    .await?;
    Ok(deleted.rows_affected())
}

/// An artifact row due for deletion.
#[derive(Debug, Clone)]
pub struct ExpiredArtifact {
    pub id: Uuid,
    pub url: String,
}

/// Up to `limit` artifacts that are older than `artifact_age` (by `created_at`) or belong to
/// finished runs that ended more than `run_age` ago.
pub async fn expired_artifacts(
    pool: &PgPool,
    artifact_age: Option<Duration>,
    run_age: Option<Duration>,
    limit: u32,
) -> Result<Vec<ExpiredArtifact>, StoreError> {
    let rows: Vec<(Uuid, String)> = exec::query_as(
        r#"
        (SELECT a.id, a.url FROM public.run_artifacts a
          WHERE $1::float8 IS NOT NULL
            AND a.created_at < now() - $1 * interval '1 millisecond'
          LIMIT $3)
        UNION
        (SELECT a.id, a.url
           FROM public.runs r
           JOIN public.run_artifacts a ON a.run_id = r.id
          WHERE $2::float8 IS NOT NULL
            AND r.status <> 'running'
            AND r.end_time < now() - $2 * interval '1 millisecond'
          LIMIT $3)
        LIMIT $3
        "#,
    )
    .bind(artifact_age.map(millis))
    .bind(run_age.map(millis))
    .bind(i64::from(limit))
    .fetch_all(exec::on(pool))
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, url)| ExpiredArtifact { id, url })
        .collect())
}

/// Deletes artifact rows (their files are already gone); returns how many.
pub async fn delete_artifact_rows(pool: &PgPool, ids: &[Uuid]) -> Result<u64, StoreError> {
    let deleted = exec::query("DELETE FROM public.run_artifacts WHERE id = ANY($1)")
        .bind(ids)
        .execute(exec::on(pool))
        .await?;
    Ok(deleted.rows_affected())
}

/// Deletes up to `limit` finished runs that ended more than `age` ago and have no logs or
/// artifacts left, with their slot records and turn records; returns how many runs.
pub async fn delete_old_runs(pool: &PgPool, age: Duration, limit: u32) -> Result<u64, StoreError> {
    let deleted: i64 = exec::query_scalar(
        r#"
        WITH gone AS (
          DELETE FROM public.runs
           WHERE id IN (SELECT r.id FROM public.runs r
                         WHERE r.status <> 'running'
                           AND r.end_time < now() - $1 * interval '1 millisecond'
                           AND NOT EXISTS (SELECT 1 FROM public.run_logs l WHERE l.run_id = r.id)
                           AND NOT EXISTS (SELECT 1 FROM public.run_artifacts a WHERE a.run_id = r.id)
                         LIMIT $2)
          RETURNING id
        ), fires AS (
          DELETE FROM agentd.schedule_fires f USING gone WHERE f.run_id = gone.id
        ), turns AS (
          -- A turn's record goes with its run; which turn answered each message stays
          -- (agentd.turn_messages), so no message is ever answered twice.
          DELETE FROM agentd.turns t USING gone WHERE t.run_id = gone.id AND t.ended
        )
        SELECT count(*) FROM gone
        "#,
    )
    .bind(millis(age))
    .bind(i64::from(limit))
    .fetch_one(exec::on(pool))
    .await?;
    Ok(deleted as u64)
}
