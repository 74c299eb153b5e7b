//! Schedules: the cheap look at what is due, and the claim transaction.

use super::exec;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::StoreError;
use crate::schedule::ScheduleSpec;

/// What the scheduler needs to know to decide whether and how long to sleep, in one query.
#[derive(Debug, Clone)]
pub struct DueSummary {
    /// The database's clock: every replica decides by the same one.
    pub now: DateTime<Utc>,
    /// The earliest `next_run` of an enabled schedule, if any.
    pub next_due: Option<DateTime<Utc>>,
    /// An enabled schedule has no `next_run` yet (new or edited) and is not known to be
    /// invalid or exhausted for its current definition.
    pub unplanned: bool,
    /// Requests are waiting.
    pub requests_waiting: bool,
    /// User messages are waiting for a turn.
    pub messages_waiting: bool,
    /// The heartbeat found this worker's row (false without a heartbeat, or when other
    /// replicas deleted the row while this one went unseen: it must register again).
    pub seen: bool,
    /// Workers the heartbeat deleted: not seen for longer than its `forget_after`.
    pub forgotten: Vec<String>,
}

/// The heartbeat a [`due_summary`] carries.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat<'a> {
    /// The worker to mark as seen.
    pub worker_id: &'a str,
    /// Other workers not seen for this long are deleted from `agentd.workers`
    /// ([`crate::config::Settings::worker_forget_after`]).
    pub forget_after: std::time::Duration,
}

impl DueSummary {
    /// Whether a claim transaction would find schedules to work on, claiming those due
    /// within `fire_ahead` too.
    pub fn schedules_due(&self, fire_ahead: std::time::Duration) -> bool {
        let horizon = chrono::Duration::from_std(fire_ahead).unwrap_or(chrono::Duration::zero());
        self.unplanned || self.next_due.is_some_and(|due| due <= self.now + horizon)
    }
}

/// One cheap query: index-only lookups on the partial indexes and the requests table.
/// With `heartbeat`, it also marks that worker as seen (an idle replica's only sign of
/// life: its lease keeper has nothing to renew) and deletes the rows of workers not seen
/// for its `forget_after` (killed, or cut off for that long: a clean stop deletes its own).
pub async fn due_summary(
    pool: &PgPool,
    heartbeat: Option<Heartbeat<'_>>,
) -> Result<DueSummary, StoreError> {
    let row = exec::query(
        r#"
        WITH seen AS (
          UPDATE agentd.workers SET last_seen_at = now() WHERE id = $1
          RETURNING id
        ), forgotten AS (
          DELETE FROM agentd.workers
           WHERE $1 IS NOT NULL AND id <> $1
             AND last_seen_at < now() - $2 * interval '1 millisecond'
          RETURNING id
        )
        SELECT now() AS now,
               -- Due now for anything at or before now (-infinity included); a time no
               -- date arithmetic can use (infinity, year 20000) is never due.
               (SELECT CASE WHEN s.next_run <= now() THEN now()
                            ELSE agentd.usable_time(s.next_run) END
                  FROM public.agent_schedules s
                 WHERE s.enabled AND s.next_run IS NOT NULL
                 ORDER BY s.next_run LIMIT 1) AS next_due,
               EXISTS (SELECT 1 FROM agentd.schedules_to_plan) AS unplanned,
               EXISTS (SELECT 1 FROM agentd.requests) AS requests_waiting,
               EXISTS (SELECT 1 FROM agentd.waiting_conversations) AS messages_waiting,
               EXISTS (SELECT 1 FROM seen) AS seen,
               ARRAY(SELECT id FROM forgotten ORDER BY id) AS forgotten
        "#,
    )
    .bind(heartbeat.map(|heartbeat| heartbeat.worker_id))
    .bind(heartbeat.map_or(0.0, |heartbeat| heartbeat.forget_after.as_millis() as f64))
    .fetch_one(exec::on(pool))
    .await?;
    Ok(DueSummary {
        now: row.try_get("now")?,
        next_due: row.try_get("next_due")?,
        unplanned: row.try_get("unplanned")?,
        requests_waiting: row.try_get("requests_waiting")?,
        messages_waiting: row.try_get("messages_waiting")?,
        seen: row.try_get("seen")?,
        forgotten: row.try_get("forgotten")?,
    })
}

/// A schedule locked by the claim transaction.
#[derive(Debug, Clone)]
pub struct LockedSchedule {
    pub id: Uuid,
    pub agent_id: Uuid,
    /// The agent's owner: the runs' `triggered_by_id`.
    pub owner_id: Uuid,
    pub spec: ScheduleSpec,
    /// `None`: new or edited (or holding a time no arithmetic can use); the worker must
    /// compute it.
    pub next_run: Option<DateTime<Utc>>,
    /// The stored `next_run` was outside the years 1 to 9999 (±infinity included).
    pub next_run_unusable: bool,
    /// A previous run of this schedule is still running (it holds a lease).
    pub running: bool,
    /// Why the row is invalid before its rule is even parsed (a value out of range, too
    /// long, or a NULL weekday); `spec` then holds what could be read.
    pub defect: Option<String>,
}

/// Longest `frequency`, `time` or `timezone` value read, in characters: a longer one is
/// invalid, and only its start reaches the worker.
pub const MAX_SCHEDULE_TEXT_CHARS: usize = 200;
/// Most `days` elements read: a longer array is invalid and is not read at all.
pub const MAX_SCHEDULE_DAYS: usize = 64;

/// The claim's locking query (public so a test can check its plan on a large table).
/// `$1`: the most rows of each kind (due, to plan) to lock; `$2`: how far ahead of their
/// instant schedules are claimed, in milliseconds (`scheduler.fire_ahead`). A schedule
/// whose previous run still holds a lease is claimed only once due, so the overlap policy
/// judges it at its instant.
///
/// Every value is read so that no row can fail the claim: texts cut one character past
/// [`MAX_SCHEDULE_TEXT_CHARS`], `days` only up to [`MAX_SCHEDULE_DAYS`] elements and
/// flattened, timestamps only within the years 1 to 9999 (`agentd.usable_time`).
pub const LOCK_SCHEDULES_SQL: &str = r#"
    WITH due AS (
      SELECT s FROM public.agent_schedules s
       WHERE s.enabled AND s.next_run IS NOT NULL
         AND s.next_run <= now() + $2 * interval '1 millisecond'
         AND (s.next_run <= now()
              OR NOT EXISTS (SELECT 1 FROM agentd.leases l WHERE l.schedule_id = s.id))
       ORDER BY s.next_run
       LIMIT $1
       FOR UPDATE SKIP LOCKED
    ), queued AS (
      SELECT q.schedule_id FROM agentd.schedules_to_plan q
       LIMIT $1
       FOR UPDATE SKIP LOCKED
    ), unplanned AS (
      -- By primary key (an array, so the planner does not cost a join over the table).
      SELECT s FROM public.agent_schedules s
       WHERE s.id = ANY(ARRAY(SELECT schedule_id FROM queued))
         AND s.enabled AND s.next_run IS NULL
       FOR UPDATE SKIP LOCKED
    ), dequeued AS (
      -- Planned now, or nothing to plan any more (deleted, disabled, next_run set). A
      -- schedule another transaction holds stays queued for the next claim.
      DELETE FROM agentd.schedules_to_plan q
       WHERE q.schedule_id = ANY(ARRAY(SELECT schedule_id FROM queued))
         AND (q.schedule_id = ANY(ARRAY(SELECT (u.s).id FROM unplanned u))
              OR NOT EXISTS (SELECT 1 FROM public.agent_schedules s
                              WHERE s.id = q.schedule_id AND s.enabled AND s.next_run IS NULL))
    ), locked AS (
      -- The locked rows themselves (whole rows, as locked): no second look at the table,
      -- so the claim's cost follows the batch, not the table's size.
      SELECT (l.s).* FROM (SELECT s FROM due UNION ALL SELECT s FROM unplanned) l
    )
    SELECT now() AS now, s.id, s.agent_id, a.user_id AS owner_id,
           left(s.frequency, 201) AS frequency, s.interval, left(s.time, 201) AS time, s.date,
           left(s.timezone, 201) AS timezone,
           agentd.usable_time(s.created_at) AS created_at,
           CASE WHEN agentd.usable_time(s.created_at) IS NULL THEN s.created_at::text END AS created_at_text,
           agentd.usable_time(s.next_run) AS next_run,
           (s.next_run IS NOT NULL AND agentd.usable_time(s.next_run) IS NULL) AS next_run_unusable,
           coalesce(cardinality(s.days), 0) AS days_count,
           -- Flattened, so a multi-dimensional or NULL-holding array cannot make the
           -- whole claim fail to decode; NULL elements are reported as invalid. The usual
           -- array (one dimension from 1, no NULL) is passed as it is; nested CASEs keep
           -- array_position away from arrays of more dimensions, which it refuses.
           CASE WHEN array_ndims(s.days) IS NULL OR cardinality(s.days) > 64 THEN NULL
                WHEN array_ndims(s.days) = 1 AND array_lower(s.days, 1) = 1
                THEN CASE WHEN array_position(s.days, NULL) IS NULL THEN s.days
                          ELSE (SELECT array_agg(d) FROM unnest(s.days) d WHERE d IS NOT NULL) END
                ELSE (SELECT array_agg(d) FROM unnest(s.days) d WHERE d IS NOT NULL) END AS days,
           CASE WHEN array_ndims(s.days) IS NULL OR cardinality(s.days) > 64 THEN false
                WHEN array_ndims(s.days) = 1 THEN array_position(s.days, NULL) IS NOT NULL
                ELSE EXISTS (SELECT 1 FROM unnest(s.days) d WHERE d IS NULL) END AS days_has_null,
           EXISTS (SELECT 1 FROM agentd.leases l WHERE l.schedule_id = s.id) AS running
      FROM locked s
      JOIN public.agents a ON a.id = s.agent_id
     ORDER BY s.next_run NULLS FIRST
    "#;

/// `BEGIN` for a transaction whose changes of `public.agent_schedules` are the worker's own
/// (it advances `next_run` and `last_run` on every claim): `agentd.internal` marks the
/// transaction, so the triggers that wake every replica (`agentd.notify_schedules`) and
/// queue planning (`agentd.queue_schedule_plan`) leave them alone. Set for this transaction
/// only and sent with `BEGIN`, in its round trip: no session state, so a transaction-mode
/// pooler may run each transaction on another server connection.
const BEGIN_OWN_SCHEDULE_CHANGES: &str = "BEGIN; SELECT set_config('agentd.internal', 'on', true)";

/// An open claim transaction. Dropping it without [`ClaimTransaction::commit`] rolls back.
pub struct ClaimTransaction {
    tx: Transaction<'static, Postgres>,
}

/// Everything one claim writes, applied in one statement.
#[derive(Debug, Default)]
pub struct ClaimWrites {
    pub fires: Vec<NewScheduledRun>,
    pub updates: Vec<ScheduleUpdate>,
    pub states: Vec<ScheduleStateChange>,
}

/// A run to create for a slot.
#[derive(Debug, Clone)]
pub struct NewScheduledRun {
    pub run_id: Uuid,
    pub schedule_id: Uuid,
    pub scheduled_for: DateTime<Utc>,
    /// Claimed ahead of its instant: the claim records and leases the slot, and the run
    /// is created at the instant ([`start_ahead`]).
    pub ahead: bool,
    pub agent_id: Uuid,
    pub owner_id: Uuid,
    pub input: Value,
}

/// New `next_run` (and `last_run` when a slot fired) of a schedule.
#[derive(Debug, Clone)]
pub struct ScheduleUpdate {
    pub id: Uuid,
    pub next_run: Option<DateTime<Utc>>,
    /// `None` keeps the current value.
    pub last_run: Option<DateTime<Utc>>,
}

/// A schedule with nothing to fire for its current definition.
#[derive(Debug, Clone)]
pub struct ScheduleStateChange {
    pub schedule_id: Uuid,
    pub state: ScheduleState,
}

/// Why a schedule has nothing to fire.
#[derive(Debug, Clone)]
pub enum ScheduleState {
    /// `once` after firing, or a rule past its last slot.
    Exhausted,
    /// The row is invalid: reported to its owner by a failed run with this error.
    Invalid {
        error: String,
        report_run_id: Uuid,
        agent_id: Uuid,
        owner_id: Uuid,
        input: Value,
    },
}

/// A run created by the claim, now leased to this worker.
#[derive(Debug, Clone)]
pub struct FiredRun {
    pub run_id: Uuid,
    pub schedule_id: Uuid,
}

impl ClaimTransaction {
    /// Begins the transaction, marked as the worker's own changes of schedules.
    pub async fn begin(pool: &PgPool) -> Result<ClaimTransaction, StoreError> {
        Ok(ClaimTransaction {
            tx: pool.begin_with(BEGIN_OWN_SCHEDULE_CHANGES).await?,
        })
    }

    /// Locks up to `limit` due schedules (oldest `next_run` first; due within `fire_ahead`)
    /// and up to `limit` unplanned ones, skipping rows other replicas hold. Returns the
    /// database's `now`.
    pub async fn lock_schedules(
        &mut self,
        limit: usize,
        fire_ahead: std::time::Duration,
    ) -> Result<(DateTime<Utc>, Vec<LockedSchedule>), StoreError> {
        let rows = exec::query(LOCK_SCHEDULES_SQL)
            .bind(limit as i64)
            .bind(fire_ahead.as_millis() as f64)
            .fetch_all(&mut *self.tx)
            .await?;
        let now = match rows.first() {
            Some(row) => row.try_get("now")?,
            None => {
                exec::query_scalar("SELECT now()")
                    .fetch_one(&mut *self.tx)
                    .await?
            }
        };
        let schedules = rows
            .iter()
            .map(locked_schedule)
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok((now, schedules))
    }

    /// The agents of the claimed schedules, read in the claim's transaction (one statement;
    /// `None` for an agent that does not exist).
    pub async fn load_agents(
        &mut self,
        agent_ids: &[Uuid],
    ) -> Result<Vec<Option<crate::domain::AgentDefinition>>, StoreError> {
        super::agents::load_agents(&mut *self.tx, agent_ids).await
    }

    /// Writes the claim in one statement: fire records (the unique key that forbids a
    /// second run for a slot), runs, leases, schedule updates, states and invalid-row
    /// reports. Returns the runs actually created (a slot fired before is left out).
    pub async fn apply(
        &mut self,
        writes: &ClaimWrites,
        worker_id: &str,
        lease_ttl: std::time::Duration,
    ) -> Result<Vec<FiredRun>, StoreError> {
        let fires = &writes.fires;
        let (mut state_ids, mut kinds, mut errors) = (vec![], vec![], vec![]);
        let (
            mut report_ids,
            mut report_agents,
            mut report_owners,
            mut report_inputs,
            mut report_errors,
        ) = (vec![], vec![], vec![], vec![], vec![]);
        for change in &writes.states {
            state_ids.push(change.schedule_id);
            match &change.state {
                ScheduleState::Exhausted => {
                    kinds.push("exhausted".to_string());
                    errors.push(None);
                }
                ScheduleState::Invalid {
                    error,
                    report_run_id,
                    agent_id,
                    owner_id,
                    input,
                } => {
                    kinds.push("invalid".to_string());
                    errors.push(Some(error.clone()));
                    report_ids.push(*report_run_id);
                    report_agents.push(*agent_id);
                    report_owners.push(*owner_id);
                    report_inputs.push(input.clone());
                    report_errors.push(error.clone());
                }
            }
        }
        let rows = exec::query(
            r#"
            WITH fires AS (
              INSERT INTO agentd.schedule_fires (schedule_id, scheduled_for, run_id)
              SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::uuid[])
              ON CONFLICT DO NOTHING
              RETURNING schedule_id, run_id
            ), x AS (
              SELECT * FROM unnest($3::uuid[], $4::uuid[], $5::uuid[], $6::jsonb[], $2::timestamptz[],
                                   $20::boolean[])
                     AS x(run_id, agent_id, owner_id, input, scheduled_for, ahead)
            ), new_runs AS (
              -- A slot claimed ahead gets its run at its instant (start_ahead).
              INSERT INTO public.runs (id, type, target_id, status, start_time, triggered_by_id, input)
              SELECT x.run_id, 'agent', x.agent_id, 'running', now(), x.owner_id, x.input
                FROM x JOIN fires f ON f.run_id = x.run_id
               WHERE NOT x.ahead
              RETURNING id
            ), new_ahead AS (
              INSERT INTO agentd.ahead_fires (run_id, schedule_id, scheduled_for)
              SELECT f.run_id, f.schedule_id, x.scheduled_for
                FROM x JOIN fires f ON f.run_id = x.run_id
               WHERE x.ahead
            ), new_leases AS (
              -- Ahead: held until the instant, and a lease's length after it.
              INSERT INTO agentd.leases (run_id, worker_id, schedule_id, expires_at)
              SELECT f.run_id, $7, f.schedule_id,
                     CASE WHEN x.ahead THEN greatest(x.scheduled_for, now()) ELSE now() END
                       + $8 * interval '1 millisecond'
                FROM x JOIN fires f ON f.run_id = x.run_id
            ), advanced AS (
              UPDATE public.agent_schedules s
                 SET next_run = u.next_run, last_run = coalesce(u.last_run, s.last_run)
                FROM unnest($9::uuid[], $10::timestamptz[], $11::timestamptz[]) AS u(id, next_run, last_run)
               -- By primary key: a join alone may scan the whole table, and so may a plain
               -- `= ANY($9)` once the planner counts the array (a few hundred of 20,000 rows
               -- costed as a sequential scan); behind a subquery it is costed as a few rows.
               WHERE s.id = ANY(ARRAY(SELECT unnest($9::uuid[]))) AND s.id = u.id
            ), states AS (
              -- The definition's hash, of the row as this transaction locked it.
              INSERT INTO agentd.schedule_states (schedule_id, definition_hash, state, error)
              SELECT x.id, agentd.schedule_definition_hash(s), x.state, x.error
                FROM unnest($12::uuid[], $13::text[], $14::text[]) AS x(id, state, error)
                JOIN public.agent_schedules s ON s.id = ANY($12) AND s.id = x.id
              ON CONFLICT (schedule_id) DO UPDATE
                 SET definition_hash = excluded.definition_hash, state = excluded.state,
                     error = excluded.error, updated_at = now()
            ), reports AS (
              INSERT INTO public.runs (id, type, target_id, status, start_time, end_time, duration,
                                       triggered_by_id, input, error)
              SELECT x.run_id, 'agent', x.agent_id, 'failed', now(), now(), 0, x.owner_id, x.input, x.error
                FROM unnest($15::uuid[], $16::uuid[], $17::uuid[], $18::jsonb[], $19::text[])
                     AS x(run_id, agent_id, owner_id, input, error)
            )
            SELECT run_id, schedule_id FROM fires
            "#,
        )
        .bind(fires.iter().map(|f| f.schedule_id).collect::<Vec<_>>())
        .bind(fires.iter().map(|f| f.scheduled_for).collect::<Vec<_>>())
        .bind(fires.iter().map(|f| f.run_id).collect::<Vec<_>>())
        .bind(fires.iter().map(|f| f.agent_id).collect::<Vec<_>>())
        .bind(fires.iter().map(|f| f.owner_id).collect::<Vec<_>>())
        .bind(fires.iter().map(|f| f.input.clone()).collect::<Vec<_>>())
        .bind(worker_id)
        .bind(lease_ttl.as_millis() as f64)
        .bind(writes.updates.iter().map(|u| u.id).collect::<Vec<_>>())
        .bind(writes.updates.iter().map(|u| u.next_run).collect::<Vec<_>>())
        .bind(writes.updates.iter().map(|u| u.last_run).collect::<Vec<_>>())
        .bind(state_ids)
        .bind(kinds)
        .bind(errors)
        .bind(report_ids)
        .bind(report_agents)
        .bind(report_owners)
        .bind(report_inputs)
        .bind(report_errors)
        .bind(fires.iter().map(|f| f.ahead).collect::<Vec<_>>())
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(FiredRun {
                    run_id: row.try_get("run_id")?,
                    schedule_id: row.try_get("schedule_id")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Commits the claim.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }

    /// Rolls the claim back (the `scale` benchmark times claims without taking them).
    pub async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await?;
        Ok(())
    }
}

/// Creates the runs of slots this worker claimed ahead whose instant has come (`start_time`
/// is now; a slot not yet due by the database's clock is left for a later call), in one
/// statement fenced by their leases (renewed here for a lease's length). A slot whose
/// schedule was edited, disabled or deleted meanwhile (the schedule's trigger took it
/// back), or whose lease ended, gets no run. Returns the database's `now` and the runs
/// created.
///
/// A slot whose schedule the application is changing at this moment (its trigger holds the
/// slot's row) is skipped, not waited for: waiting took the slots in another order than the
/// application's multi-row change did, and the two deadlocked. The change forgets the slot;
/// if it is rolled back instead, the slot's lease ends and the reaper gives it back.
pub async fn start_ahead(
    pool: &PgPool,
    worker_id: &str,
    lease_ttl: std::time::Duration,
    runs: &[NewScheduledRun],
) -> Result<(DateTime<Utc>, Vec<Uuid>), StoreError> {
    let row = exec::query(
        r#"
        WITH free AS (
          SELECT a.run_id FROM agentd.ahead_fires a
            JOIN agentd.leases l ON l.run_id = a.run_id
           WHERE a.run_id = ANY($1) AND a.scheduled_for <= now()
             AND l.worker_id = $5 AND l.expires_at > now()
             FOR UPDATE OF a SKIP LOCKED
        ), started AS (
          DELETE FROM agentd.ahead_fires a
           WHERE a.run_id IN (SELECT run_id FROM free)
          RETURNING a.run_id
        ), renewed AS (
          UPDATE agentd.leases l SET expires_at = now() + $6 * interval '1 millisecond'
            FROM started s WHERE l.run_id = s.run_id
        ), created AS (
          INSERT INTO public.runs (id, type, target_id, status, start_time, triggered_by_id, input)
          SELECT x.run_id, 'agent', x.agent_id, 'running', now(), x.owner_id, x.input
            FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::jsonb[])
                 AS x(run_id, agent_id, owner_id, input)
            JOIN started s ON s.run_id = x.run_id
          RETURNING id
        )
        SELECT now() AS now, ARRAY(SELECT id FROM created) AS created
        "#,
    )
    .bind(runs.iter().map(|r| r.run_id).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.agent_id).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.owner_id).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.input.clone()).collect::<Vec<_>>())
    .bind(worker_id)
    .bind(lease_ttl.as_millis() as f64)
    .fetch_one(exec::on(pool))
    .await?;
    Ok((row.try_get("now")?, row.try_get("created")?))
}

/// Gives back slots this worker claimed ahead and will not start (it is stopping): another
/// replica fires them (see `agentd.return_ahead_fires`). Returns how many were given back.
pub async fn return_ahead(pool: &PgPool, run_ids: &[Uuid]) -> Result<u64, StoreError> {
    let returned: i32 = exec::query_scalar("SELECT agentd.return_ahead_fires($1)")
        .bind(run_ids)
        .fetch_one(exec::on(pool))
        .await?;
    Ok(returned.max(0) as u64)
}

fn locked_schedule(row: &PgRow) -> Result<LockedSchedule, sqlx::Error> {
    let frequency: String = row.try_get("frequency")?;
    let time: Option<String> = row.try_get("time")?;
    let timezone: String = row.try_get("timezone")?;
    let created_at: Option<DateTime<Utc>> = row.try_get("created_at")?;
    let days_count: i32 = row.try_get("days_count")?;
    let days_has_null: bool = row.try_get("days_has_null")?;
    let too_long = |column: &str, text: &str| {
        (text.chars().count() > MAX_SCHEDULE_TEXT_CHARS).then(|| {
            format!(
                "{column}: longer than {MAX_SCHEDULE_TEXT_CHARS} characters: {}",
                crate::text::quoted(text)
            )
        })
    };
    let defect = too_long("frequency", &frequency)
        .or_else(|| time.as_deref().and_then(|time| too_long("time", time)))
        .or_else(|| too_long("timezone", &timezone))
        .or_else(|| {
            (days_count as usize > MAX_SCHEDULE_DAYS).then(|| {
                format!("days: {days_count} elements, at most {MAX_SCHEDULE_DAYS} (weekdays 0…7)")
            })
        })
        .or_else(|| days_has_null.then(|| "days: NULL is not a weekday (expected 0…7)".into()));
    let defect = match (created_at, defect) {
        (None, _) => {
            let text: Option<String> = row.try_get("created_at_text")?;
            Some(format!(
                "created_at: {} is outside the years 1 to 9999",
                crate::text::quoted(text.as_deref().unwrap_or("NULL"))
            ))
        }
        (Some(_), defect) => defect,
    };
    Ok(LockedSchedule {
        id: row.try_get("id")?,
        agent_id: row.try_get("agent_id")?,
        owner_id: row.try_get("owner_id")?,
        spec: ScheduleSpec {
            frequency,
            interval: row.try_get("interval")?,
            time,
            days: row.try_get("days")?,
            date: row.try_get("date")?,
            timezone,
            created_at: created_at.unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
        },
        next_run: row.try_get("next_run")?,
        next_run_unusable: row.try_get("next_run_unusable")?,
        running: row.try_get("running")?,
        defect,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_query_reads_no_more_than_the_limits() {
        let cut = MAX_SCHEDULE_TEXT_CHARS + 1;
        for column in ["frequency", "time", "timezone"] {
            assert!(
                LOCK_SCHEDULES_SQL.contains(&format!("left(s.{column}, {cut})")),
                "{column}"
            );
        }
        assert!(LOCK_SCHEDULES_SQL.contains(&format!("cardinality(s.days) > {MAX_SCHEDULE_DAYS}")));
    }
}
