//! Runs: requests, fenced writes (log batches, the outcome), and reading a run's state.
//!
//! Fencing: every write a worker makes for a run names the worker and succeeds only while
//! that worker holds an unexpired lease on the run, checked and locked in the same
//! statement. A worker that lost its lease gets `Fenced` and must abandon the run.

use super::exec;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Postgres;
use sqlx::Row;
use sqlx::postgres::{PgArguments, PgPool};
use sqlx::query::QueryScalar;
use uuid::Uuid;

use super::StoreError;
pub use crate::domain::{ClaimedRun, RunKind};
use crate::domain::{RunResult, RunStatus};

/// Most levels of nesting of a run's input the worker reads (`request_run` refuses more
/// than 64; serde_json's parser stops at 128).
pub const MAX_INPUT_DEPTH: usize = 128;

/// A request's input, read from its JSON text: a value the worker cannot read fails that
/// run alone, never the claim.
fn parse_input(text: Option<&str>) -> (Option<Value>, Option<String>) {
    match text.map(serde_json::from_str::<Value>) {
        None => (None, None),
        Some(Ok(value)) => (Some(value), None),
        Some(Err(error)) => (
            None,
            Some(format!(
                "input: the worker cannot read it ({error}; at most {MAX_INPUT_DEPTH} levels of nesting)"
            )),
        ),
    }
}

/// Turns up to `limit` waiting requests into running runs leased to `worker_id`, in one
/// statement; requests other replicas are taking are skipped. Users take turns: the lowest
/// `turn` first (a request's place in its user's queue when it was asked for, see
/// `request_run`), then the oldest. So one user's flood waits behind everyone else's first
/// requests, also when slots free one at a time, and the claim costs an index scan however
/// long the queue.
/// Whether requests are waiting (after a claim that took fewer than it could: those were
/// locked by another replica's claim, which may never commit).
pub async fn requests_waiting(pool: &PgPool) -> Result<bool, StoreError> {
    Ok(
        exec::query_scalar("SELECT EXISTS (SELECT 1 FROM agentd.requests)")
            .fetch_one(exec::on(pool))
            .await?,
    )
}

pub async fn claim_requests(
    pool: &PgPool,
    limit: usize,
    worker_id: &str,
    lease_ttl: std::time::Duration,
) -> Result<Vec<ClaimedRun>, StoreError> {
    let rows = exec::query(
        r#"
        WITH picked AS (
          SELECT id FROM agentd.requests
           ORDER BY turn, requested_at
           LIMIT $1
           FOR UPDATE SKIP LOCKED
        ), taken AS (
          DELETE FROM agentd.requests r USING picked p WHERE r.id = p.id
          RETURNING r.id, r.target_type, r.target_id, r.input, r.requested_by, r.requested_at
        ), new_runs AS (
          INSERT INTO public.runs (id, type, target_id, status, start_time, triggered_by_id, input)
          SELECT id, target_type, target_id, 'running', now(), requested_by, input FROM taken
        ), new_leases AS (
          INSERT INTO agentd.leases (run_id, worker_id, expires_at)
          SELECT id, $2, now() + $3 * interval '1 millisecond' FROM taken
        )
        SELECT id, target_type, target_id, input::text AS input, requested_by FROM taken
         ORDER BY requested_at
        "#,
    )
    .bind(limit as i64)
    .bind(worker_id)
    .bind(lease_ttl.as_millis() as f64)
    .fetch_all(exec::on(pool))
    .await?;
    rows.iter()
        .map(|row| {
            let (input, defect) = parse_input(row.try_get::<Option<&str>, _>("input")?);
            Ok(ClaimedRun {
                run_id: row.try_get("id")?,
                // The requests table's check allows only the two kinds.
                kind: {
                    let kind: &str = row.try_get("target_type")?;
                    RunKind::parse(kind).ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "unknown run type {}",
                            crate::text::quoted(kind)
                        ))
                    })?
                },
                target_id: row.try_get("target_id")?,
                owner_id: row.try_get("requested_by")?,
                input,
                schedule_id: None,
                agent: None,
                defect,
                turn: None,
            })
        })
        .collect()
}

/// One log line, as the run emitted it.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// UUIDv7 from the run's generator: `order by timestamp, id` is emission order.
    pub id: Uuid,
    pub level: &'static str,
    pub message: String,
    pub timestamp: DateTime<Utc>,
}

/// Result of a fenced write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced {
    /// Written: this worker still holds the lease.
    Written,
    /// Refused: the lease is gone or expired; the run is no longer this worker's.
    LeaseLost,
}

/// Log lines of several runs as the columns of an `unnest` (one array per column).
#[derive(Default)]
struct LineColumns<'a> {
    ids: Vec<Uuid>,
    runs: Vec<Uuid>,
    messages: Vec<&'a str>,
    levels: Vec<&'static str>,
    timestamps: Vec<DateTime<Utc>>,
}

impl<'a> LineColumns<'a> {
    fn of(batches: impl IntoIterator<Item = (Uuid, &'a [LogLine])>) -> LineColumns<'a> {
        let mut columns = LineColumns::default();
        for (run_id, lines) in batches {
            for line in lines {
                columns.ids.push(line.id);
                columns.runs.push(run_id);
                columns.messages.push(line.message.as_str());
                columns.levels.push(line.level);
                columns.timestamps.push(line.timestamp);
            }
        }
        columns
    }

    /// Binds the five columns, in order, as the next parameters of `query`.
    fn bind<'q, O>(
        &'q self,
        query: QueryScalar<'q, Postgres, O, PgArguments>,
    ) -> QueryScalar<'q, Postgres, O, PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.runs)
            .bind(&self.messages)
            .bind(&self.levels)
            .bind(&self.timestamps)
    }
}

/// Per run of `runs`, whether the fenced statement wrote it (it is among `written`).
fn fenced(runs: &[Uuid], written: &[Uuid]) -> Vec<Fenced> {
    let written: std::collections::HashSet<&Uuid> = written.iter().collect();
    runs.iter()
        .map(|run_id| {
            if written.contains(run_id) {
                Fenced::Written
            } else {
                Fenced::LeaseLost
            }
        })
        .collect()
}

/// Inserts the log batches of many runs in one statement; each run's lines are written only
/// while `worker_id` holds its lease (share-locked for the statement). Returns, per batch,
/// whether it was written. Batches must name distinct runs.
pub async fn insert_log_batches(
    pool: &PgPool,
    worker_id: &str,
    batches: &[(Uuid, &[LogLine])],
) -> Result<Vec<Fenced>, StoreError> {
    let runs: Vec<Uuid> = batches.iter().map(|(run_id, _)| *run_id).collect();
    let lines = LineColumns::of(batches.iter().copied());
    let held: Vec<Uuid> = retry_tolerating_duplicates(
        INSERT_LOG_BATCHES_SQL,
        INSERT_LOG_BATCHES_AGAIN_SQL,
        |sql| {
            lines
                .bind(exec::query_scalar(sql).bind(&runs).bind(worker_id))
                .fetch_all(exec::on(pool))
        },
    )
    .await?;
    Ok(fenced(&runs, &held))
}

/// Lines are inserted plainly: their ids are fresh, and the primary key refuses a
/// duplicate rather than storing it. Only when a statement is refused for a duplicate (an
/// earlier attempt committed although its answer was lost) is it sent again, skipping the
/// lines already stored: `ON CONFLICT` on every statement costs the common case
/// (docs/benchmarks.md).
async fn retry_tolerating_duplicates<T, F, Fut>(
    plain: &'static str,
    tolerant: &'static str,
    run: F,
) -> Result<T, StoreError>
where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    match run(plain).await {
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("23505") => {
            Ok(run(tolerant).await?)
        }
        answer => Ok(answer?),
    }
}

macro_rules! insert_log_batches_sql {
    ($on_conflict:literal) => {
        concat!(
            r#"
        WITH held AS (
          SELECT run_id FROM agentd.leases
           WHERE run_id = ANY($1) AND worker_id = $2 AND expires_at > now()
           FOR SHARE
        ), written AS (
          INSERT INTO public.run_logs (id, run_id, message, level, timestamp)
          SELECT x.id, x.run_id, x.message, x.level, x.ts
            FROM unnest($3::uuid[], $4::uuid[], $5::text[], $6::text[], $7::timestamptz[])
                 AS x(id, run_id, message, level, ts)
           WHERE x.run_id IN (SELECT run_id FROM held)
          "#,
            $on_conflict,
            r#"
        )
        SELECT run_id FROM held
        "#
        )
    };
}
const INSERT_LOG_BATCHES_SQL: &str = insert_log_batches_sql!("");
const INSERT_LOG_BATCHES_AGAIN_SQL: &str = insert_log_batches_sql!("ON CONFLICT (id) DO NOTHING");

/// `text` as PostgreSQL `text` can hold it: without NUL characters.
pub fn storable_text(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "")
    } else {
        text
    }
}

/// `value` as `jsonb` can hold it: NUL characters (`\u0000`) removed from every string and
/// key. Iterative, so no nesting depth can exhaust the stack.
pub fn storable_json(mut value: Value) -> Value {
    let mut pending: Vec<&mut Value> = vec![&mut value];
    while let Some(item) = pending.pop() {
        match item {
            Value::String(text) if text.contains('\0') => {
                *text = text.replace('\0', "");
            }
            Value::Array(items) => pending.extend(items.iter_mut()),
            Value::Object(map) => {
                if map.keys().any(|key| key.contains('\0')) {
                    let entries = std::mem::take(map);
                    map.extend(
                        entries
                            .into_iter()
                            .map(|(key, value)| (key.replace('\0', ""), value)),
                    );
                }
                pending.extend(map.values_mut());
            }
            Value::String(_) | Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    value
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub result: RunResult,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// `runs.resource_usage` as JSON text, rendered once by the runner (no map to build,
    /// copy and serialize again for a few fixed figures).
    pub resource_usage: Option<String>,
}

/// Records the outcomes of many runs with their last log lines and ends their leases, in
/// one statement, each only while `worker_id` holds its lease. Returns, per outcome,
/// whether it was written.
pub async fn finish_runs(
    pool: &PgPool,
    worker_id: &str,
    outcomes: &[(Uuid, &RunOutcome, &[LogLine])],
) -> Result<Vec<Fenced>, StoreError> {
    let runs: Vec<Uuid> = outcomes.iter().map(|(run_id, _, _)| *run_id).collect();
    let lines = LineColumns::of(outcomes.iter().map(|(run_id, _, lines)| (*run_id, *lines)));
    let statuses: Vec<&str> = outcomes
        .iter()
        .map(|(_, o, _)| o.result.status().as_str())
        .collect();
    // Borrowed, not copied: sqlx serializes them from here.
    let outputs: Vec<Option<sqlx::types::Json<&Value>>> = outcomes
        .iter()
        .map(|(_, o, _)| o.output.as_ref().map(sqlx::types::Json))
        .collect();
    let errors: Vec<Option<&str>> = outcomes
        .iter()
        .map(|(_, o, _)| o.error.as_deref())
        .collect();
    let usages: Vec<Option<&str>> = outcomes
        .iter()
        .map(|(_, o, _)| o.resource_usage.as_deref())
        .collect();
    let done: Vec<Uuid> =
        retry_tolerating_duplicates(FINISH_RUNS_SQL, FINISH_RUNS_AGAIN_SQL, |sql| {
            let query = exec::query_scalar(sql)
                .bind(&runs)
                .bind(worker_id)
                .bind(&statuses)
                .bind(&outputs)
                .bind(&errors)
                .bind(&usages);
            lines.bind(query).fetch_all(exec::on(pool))
        })
        .await?;
    Ok(fenced(&runs, &done))
}

macro_rules! finish_runs_sql {
    ($on_conflict:literal) => {
        concat!(
            r#"
        WITH lease AS (
          DELETE FROM agentd.leases
           WHERE run_id = ANY($1) AND worker_id = $2 AND expires_at > now()
          RETURNING run_id
        ), held AS (
          -- The ended leases as one array, which the joins below test each row against.
          -- Joined as a table, they could be rescanned for every row: a plan made once for
          -- any parameters (PostgreSQL's choice after five executions of a prepared
          -- statement) counts them as one row and did so, 500 × 500 comparisons.
          SELECT coalesce(array_agg(run_id), '{}') AS ids FROM lease
        ), last_lines AS (
          INSERT INTO public.run_logs (id, run_id, message, level, timestamp)
          SELECT x.id, x.run_id, x.message, x.level, x.ts
            FROM unnest($7::uuid[], $8::uuid[], $9::text[], $10::text[], $11::timestamptz[])
                 AS x(id, run_id, message, level, ts), held
           WHERE x.run_id = ANY(held.ids)
          "#,
            $on_conflict,
            r#"
        )
        UPDATE public.runs r
           SET status = x.status, end_time = now(),
               duration = least(extract(epoch FROM (now() - r.start_time)) * 1000, 2147483647)::integer,
               output = x.output, error = x.error, resource_usage = x.usage::jsonb
          FROM unnest($1::uuid[], $3::text[], $4::jsonb[], $5::text[], $6::text[])
                 AS x(id, status, output, error, usage), held
         WHERE r.id = x.id AND x.id = ANY(held.ids) AND r.status = 'running'
        RETURNING r.id
        "#
        )
    };
}
const FINISH_RUNS_SQL: &str = finish_runs_sql!("");
const FINISH_RUNS_AGAIN_SQL: &str = finish_runs_sql!("ON CONFLICT (id) DO NOTHING");

/// `public.request_run`, as the worker's role (any target).
pub async fn request_run(
    pool: &PgPool,
    kind: RunKind,
    target_id: Uuid,
    input: Option<&Value>,
) -> Result<Uuid, StoreError> {
    let run_id = exec::query_scalar("SELECT public.request_run($1, $2, $3)")
        .bind(kind.as_str())
        .bind(target_id)
        .bind(input)
        .fetch_one(exec::on(pool))
        .await?;
    Ok(run_id)
}

/// `public.cancel_run`, as the worker's role (any run).
pub async fn cancel_run(pool: &PgPool, run_id: Uuid) -> Result<bool, StoreError> {
    let taken = exec::query_scalar("SELECT public.cancel_run($1)")
        .bind(run_id)
        .fetch_one(exec::on(pool))
        .await?;
    Ok(taken)
}

/// A run's state as the CLI shows it.
#[derive(Debug, Clone)]
pub struct RunState {
    pub status: RunStatus,
    pub error: Option<String>,
    pub output: Option<Value>,
}

/// The state of a run or of a request that will become one; `None` if neither exists.
pub async fn run_state(pool: &PgPool, run_id: Uuid) -> Result<Option<RunState>, StoreError> {
    let row = exec::query(
        r#"
        SELECT status, error, output FROM public.runs WHERE id = $1
        UNION ALL
        SELECT 'queued', NULL, NULL FROM agentd.requests WHERE id = $1
        LIMIT 1
        "#,
    )
    .bind(run_id)
    .fetch_optional(exec::on(pool))
    .await?;
    row.map(|row| {
        let status: &str = row.try_get("status")?;
        Ok(RunState {
            // The runs table's check allows only the statuses there are.
            status: RunStatus::parse(status).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "unknown run status {}",
                    crate::text::quoted(status)
                ))
            })?,
            error: row.try_get("error")?,
            output: row.try_get("output")?,
        })
    })
    .transpose()
}

/// Log lines of a run after the given position, in emission order (for `trigger --wait`).
pub async fn run_logs_after(
    pool: &PgPool,
    run_id: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
) -> Result<Vec<(DateTime<Utc>, Uuid, String, String)>, StoreError> {
    let (after_ts, after_id) = after.unzip();
    let rows = exec::query(
        r#"
        SELECT timestamp, id, level, message FROM public.run_logs
         WHERE run_id = $1 AND ($2::timestamptz IS NULL OR (timestamp, id) > ($2, $3))
         ORDER BY timestamp, id
         LIMIT 1000
        "#,
    )
    .bind(run_id)
    .bind(after_ts)
    .bind(after_id)
    .fetch_all(exec::on(pool))
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("timestamp")?,
                row.try_get("id")?,
                row.try_get("level")?,
                row.try_get("message")?,
            ))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// A stored artifact's row.
#[derive(Debug, Clone)]
pub struct ArtifactRow {
    pub name: String,
    pub content_type: String,
    pub size: i32,
    pub url: String,
}

/// Inserts the rows of artifacts of many runs in one statement, each only while
/// `worker_id` holds its run's lease; answers each row, in order.
pub async fn insert_artifacts(
    pool: &PgPool,
    worker_id: &str,
    rows: &[(Uuid, ArtifactRow)],
) -> Result<Vec<Fenced>, StoreError> {
    let run_ids: Vec<Uuid> = rows.iter().map(|(run_id, _)| *run_id).collect();
    let held: Vec<bool> = exec::query_scalar(
        r#"
        WITH x AS (
          SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int4[], $5::text[])
                   WITH ORDINALITY AS x(run_id, name, type, size, url, n)
        ), lease AS (
          SELECT run_id FROM agentd.leases
           WHERE run_id = ANY($1) AND worker_id = $6 AND expires_at > now()
           FOR SHARE
        ), inserted AS (
          INSERT INTO public.run_artifacts (run_id, name, type, size, url)
          SELECT x.run_id, x.name, x.type, x.size, x.url
            FROM x WHERE x.run_id IN (SELECT run_id FROM lease)
           ORDER BY x.n
        )
        SELECT x.run_id IN (SELECT run_id FROM lease) FROM x ORDER BY x.n
        "#,
    )
    .bind(&run_ids)
    .bind(
        rows.iter()
            .map(|(_, row)| row.name.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|(_, row)| row.content_type.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|(_, row)| row.size).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|(_, row)| row.url.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(worker_id)
    .fetch_all(exec::on(pool))
    .await?;
    Ok(held
        .into_iter()
        .map(|held| {
            if held {
                Fenced::Written
            } else {
                Fenced::LeaseLost
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_characters_leave_texts_strings_and_keys() {
        assert_eq!(storable_text("a\0b".into()), "ab");
        let value = json!({"a\0": ["x\0y", {"k": "\0"}], "n": 1});
        assert_eq!(
            storable_json(value),
            json!({"a": ["xy", {"k": ""}], "n": 1})
        );
        let mut deep = json!("\0");
        for _ in 0..1000 {
            deep = json!([deep]);
        }
        let cleaned = storable_json(deep);
        let mut inner = &cleaned;
        while let Value::Array(items) = inner {
            inner = &items[0];
        }
        assert_eq!(inner, &json!(""));
    }
}
