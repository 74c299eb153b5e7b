//! The statements of `agentd bench`: scratch databases, seeding, measuring, and the
//! "ceiling" (the same rows a fire writes, by plain SQL in batches).

use super::exec;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::StoreError;

/// Creates database `name` (a plain identifier chosen by the bench).
pub async fn create_database(admin: &PgPool, name: &str) -> Result<(), StoreError> {
    debug_assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    exec::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(admin)
        .await?;
    Ok(())
}

/// Drops database `name`, disconnecting whoever is still on it.
pub async fn drop_database(admin: &PgPool, name: &str) -> Result<(), StoreError> {
    debug_assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    exec::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(admin)
    .await?;
    Ok(())
}

/// A user and one agent of theirs; returns (user, agent).
pub async fn seed_agent(pool: &PgPool) -> Result<(Uuid, Uuid), StoreError> {
    let user: Uuid = exec::query_scalar(
        "INSERT INTO public.users (email, name) VALUES ('bench-' || gen_random_uuid() || '@agentd.invalid', 'bench') RETURNING id",
    )
    .fetch_one(exec::on(pool))
    .await?;
    let agent: Uuid = exec::query_scalar(
        "INSERT INTO public.agents (user_id, name, description, icon, category, instructions) \
         VALUES ($1, 'bench', 'agentd bench', 'bot', 'bench', 'noop') RETURNING id",
    )
    .bind(user)
    .fetch_one(exec::on(pool))
    .await?;
    Ok((user, agent))
}

/// Inserts `count` enabled UTC cron schedules of `agent` with expression `cron`, with
/// `next_run` set (or NULL for the workers to plan).
pub async fn insert_cron_schedules(
    pool: &PgPool,
    agent: Uuid,
    count: i64,
    cron: &str,
    next_run: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    exec::query(
        "INSERT INTO public.agent_schedules (agent_id, enabled, frequency, interval, time, timezone, next_run) \
         SELECT $1, true, 'cron', 1, $2, 'UTC', $3 FROM generate_series(1, $4)",
    )
    .bind(agent)
    .bind(cron)
    .bind(next_run)
    .bind(count)
    .execute(exec::on(pool))
    .await?;
    Ok(())
}

/// Queues `count` requested runs of `agent` in one statement (as `request_run` would, one
/// notification for all).
pub async fn insert_requests(
    pool: &PgPool,
    agent: Uuid,
    owner: Uuid,
    count: i64,
) -> Result<(), StoreError> {
    exec::query(
        r#"
        WITH queued AS (
          INSERT INTO agentd.requests (id, target_type, target_id, requested_by)
          SELECT gen_random_uuid(), 'agent', $1, $2 FROM generate_series(1, $3)
          RETURNING id
        )
        SELECT pg_notify('agentd_requests', (SELECT count(*) FROM queued)::text)
        "#,
    )
    .bind(agent)
    .bind(owner)
    .bind(count)
    .execute(exec::on(pool))
    .await?;
    Ok(())
}

/// Stops every schedule from firing again.
pub async fn disable_schedules(pool: &PgPool) -> Result<(), StoreError> {
    exec::query("UPDATE public.agent_schedules SET enabled = false WHERE enabled")
        .execute(exec::on(pool))
        .await?;
    Ok(())
}

/// Updates the planner's statistics after seeding.
pub async fn analyze(pool: &PgPool) -> Result<(), StoreError> {
    exec::query("ANALYZE").execute(exec::on(pool)).await?;
    Ok(())
}

/// Vacuums and analyzes everything after seeding, so that autovacuum has nothing left to
/// do while an idle replica is measured (its transactions would count). Analyzing writes the
/// rows of `pg_statistic`, which autovacuum then cleaned during the window (4 transactions
/// beside the replica's 1): so this connection's counts are flushed at once (PostgreSQL 15
/// and later; older servers flush them on their own within a second or so) and that
/// catalog is vacuumed once more after them.
pub async fn vacuum_analyze(pool: &PgPool) -> Result<(), StoreError> {
    let mut connection = pool.acquire().await?;
    exec::query("VACUUM (ANALYZE)")
        .execute(&mut *connection)
        .await?;
    exec::query(
        "DO $$ BEGIN PERFORM pg_stat_force_next_flush(); \
         EXCEPTION WHEN undefined_function THEN NULL; END $$",
    )
    .execute(&mut *connection)
    .await?;
    exec::query("VACUUM pg_catalog.pg_statistic")
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// Registered workers.
pub async fn workers_registered(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(exec::query_scalar("SELECT count(*) FROM agentd.workers")
        .fetch_one(exec::on(pool))
        .await?)
}

/// Runs that have an outcome, counted only once nothing is left to do (no due schedule,
/// lease or request); `None` while work remains. The cheap checks come first, the due index
/// before the two small tables (whose dead rows a scan must step over), so polling this
/// does not load the server the benchmark measures.
pub async fn finished_runs(pool: &PgPool) -> Result<Option<i64>, StoreError> {
    Ok(exec::query_scalar(
        r#"
        SELECT CASE WHEN EXISTS (SELECT 1 FROM public.agent_schedules
                                  WHERE enabled AND next_run IS NOT NULL AND next_run <= now())
                      OR EXISTS (SELECT 1 FROM agentd.leases)
                      OR EXISTS (SELECT 1 FROM agentd.requests)
                    THEN NULL
                    ELSE (SELECT count(*) FROM public.runs WHERE status <> 'running') END
        "#,
    )
    .fetch_one(exec::on(pool))
    .await?)
}

/// When runs started and ended, over all runs.
#[derive(Debug, Clone, Copy)]
pub struct RunSpan {
    pub runs: i64,
    pub completed: i64,
    /// Completed or failed.
    pub finished: i64,
    pub first_start: Option<DateTime<Utc>>,
    pub last_start: Option<DateTime<Utc>>,
    pub last_end: Option<DateTime<Utc>>,
}

/// The span of all runs.
pub async fn run_span(pool: &PgPool) -> Result<RunSpan, StoreError> {
    let (runs, completed, finished, first_start, last_start, last_end) = exec::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'completed'), \
                count(*) FILTER (WHERE status <> 'running'), \
                min(start_time), max(start_time), max(end_time) FROM public.runs",
    )
    .fetch_one(exec::on(pool))
    .await?;
    Ok(RunSpan {
        runs,
        completed,
        finished,
        first_start,
        last_start,
        last_end,
    })
}

/// `start_time - scheduled_for` in seconds of every scheduled run whose slot lies in
/// `[from, to)`, sorted.
pub async fn scheduling_lags(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<f64>, StoreError> {
    Ok(exec::query_scalar(
        r#"
        SELECT extract(epoch FROM r.start_time - (r.input->>'scheduled_for')::timestamptz)::float8 AS lag
          FROM public.runs r
         WHERE r.input->>'trigger' = 'schedule'
           AND (r.input->>'scheduled_for')::timestamptz >= $1
           AND (r.input->>'scheduled_for')::timestamptz < $2
         ORDER BY lag
        "#,
    )
    .bind(from)
    .bind(to)
    .fetch_all(exec::on(pool))
    .await?)
}

/// How long each recorded run held its slot (`resource_usage.slot_ms`), in seconds, sorted.
pub async fn slot_times(pool: &PgPool) -> Result<Vec<f64>, StoreError> {
    Ok(exec::query_scalar(
        r#"
        SELECT (resource_usage->>'slot_ms')::float8 / 1000.0 AS slot
          FROM public.runs
         WHERE resource_usage ? 'slot_ms'
         ORDER BY slot
        "#,
    )
    .fetch_all(exec::on(pool))
    .await?)
}

/// Artifacts stored (rows of `run_artifacts`).
pub async fn artifacts_stored(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(
        exec::query_scalar("SELECT count(*) FROM public.run_artifacts")
            .fetch_one(exec::on(pool))
            .await?,
    )
}

/// Log lines stored, and the span of their timestamps.
pub async fn log_span(
    pool: &PgPool,
) -> Result<(i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>), StoreError> {
    Ok(
        exec::query_as("SELECT count(*), min(timestamp), max(timestamp) FROM public.run_logs")
            .fetch_one(exec::on(pool))
            .await?,
    )
}

/// Seconds since the newest visible log line was emitted (None: no line yet).
pub async fn newest_log_age(pool: &PgPool) -> Result<Option<f64>, StoreError> {
    Ok(exec::query_scalar(
        "SELECT extract(epoch FROM clock_timestamp() - max(timestamp))::float8 FROM public.run_logs",
    )
    .fetch_one(exec::on(pool))
    .await?)
}

/// Transactions committed and rolled back in database `name` so far (read from another
/// database, so that reading does not count).
pub async fn transactions(admin: &PgPool, name: &str) -> Result<i64, StoreError> {
    let mut tx = admin.begin().await?;
    exec::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *tx)
        .await?;
    let count: Option<i64> = exec::query_scalar(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(count.unwrap_or(0))
}

/// The server's version string.
pub async fn server_version(pool: &PgPool) -> Result<String, StoreError> {
    Ok(exec::query_scalar("SHOW server_version")
        .fetch_one(exec::on(pool))
        .await?)
}

/// The server's `autovacuum` setting (`on`/`off`): with it off, the tables a run churns
/// (leases, slot records, runs) keep their dead rows for the whole benchmark.
pub async fn server_autovacuum(pool: &PgPool) -> Result<String, StoreError> {
    Ok(exec::query_scalar("SHOW autovacuum")
        .fetch_one(exec::on(pool))
        .await?)
}

/// The ceiling, step 1, one transaction: lock up to `limit` due schedules, insert their
/// runs (running) and advance them by a day. Returns the new runs' ids.
pub async fn ceiling_fire(pool: &PgPool, limit: i64) -> Result<Vec<Uuid>, StoreError> {
    Ok(exec::query_scalar(
        r#"
        WITH due AS (
          SELECT s.id, s.agent_id, s.next_run, a.user_id
            FROM public.agent_schedules s JOIN public.agents a ON a.id = s.agent_id
           WHERE s.enabled AND s.next_run IS NOT NULL AND s.next_run <= now()
           ORDER BY s.next_run
           LIMIT $1
             FOR UPDATE OF s SKIP LOCKED
        ), advanced AS (
          UPDATE public.agent_schedules s
             SET last_run = due.next_run, next_run = due.next_run + interval '1 day'
            FROM due WHERE s.id = ANY(ARRAY(SELECT id FROM due)) AND s.id = due.id
        )
        INSERT INTO public.runs (type, target_id, status, start_time, triggered_by_id, input)
        SELECT 'agent', due.agent_id, 'running', now(), due.user_id,
               jsonb_build_object('trigger', 'schedule', 'schedule_id', due.id,
                                  'scheduled_for', due.next_run, 'missed', 0)
          FROM due
        RETURNING id
        "#,
    )
    .bind(limit)
    .fetch_all(exec::on(pool))
    .await?)
}

/// The ceiling, step 2, one transaction: one log line per run, and the runs completed.
pub async fn ceiling_complete(pool: &PgPool, runs: &[Uuid]) -> Result<(), StoreError> {
    exec::query(
        r#"
        WITH lines AS (
          INSERT INTO public.run_logs (run_id, message, level)
          SELECT id, 'noop line 1', 'info' FROM unnest($1::uuid[]) AS id
        )
        UPDATE public.runs
           SET status = 'completed', end_time = now(), output = '{"noop": true}',
               duration = (extract(epoch FROM now() - start_time) * 1000)::integer
         WHERE id = ANY($1)
        "#,
    )
    .bind(runs)
    .execute(exec::on(pool))
    .await?;
    Ok(())
}

/// Inserts `count` schedules that are not due for a day (for the `scale` scenario).
pub async fn insert_far_schedules(
    pool: &PgPool,
    agent: Uuid,
    count: i64,
) -> Result<(), StoreError> {
    exec::query(
        "INSERT INTO public.agent_schedules (agent_id, enabled, frequency, interval, time, timezone, next_run) \
         SELECT $1, true, 'daily', 1, '09:00', 'UTC', now() + interval '1 day' + g * interval '1 second' \
           FROM generate_series(1, $2) g",
    )
    .bind(agent)
    .bind(count)
    .execute(exec::on(pool))
    .await?;
    Ok(())
}

/// `count` running runs of `agent` (for the ceiling of `logs`); returns their ids.
pub async fn insert_running_runs(
    pool: &PgPool,
    agent: Uuid,
    user: Uuid,
    count: i64,
) -> Result<Vec<Uuid>, StoreError> {
    Ok(exec::query_scalar(
        "INSERT INTO public.runs (type, target_id, status, start_time, triggered_by_id) \
         SELECT 'agent', $1, 'running', now(), $2 FROM generate_series(1, $3) RETURNING id",
    )
    .bind(agent)
    .bind(user)
    .bind(count)
    .fetch_all(exec::on(pool))
    .await?)
}

/// The ceiling of `logs`, one statement: lines of one run, as sent by a client (ids and
/// timestamps made by the client, as agentd's are).
pub async fn ceiling_log_lines(
    pool: &PgPool,
    run: Uuid,
    ids: &[Uuid],
    messages: &[String],
    timestamps: &[DateTime<Utc>],
) -> Result<(), StoreError> {
    exec::query(
        r#"
        INSERT INTO public.run_logs (id, run_id, message, level, timestamp)
        SELECT x.id, $1, x.message, 'info', x.ts
          FROM unnest($2::uuid[], $3::text[], $4::timestamptz[]) AS x(id, message, ts)
        "#,
    )
    .bind(run)
    .bind(ids)
    .bind(messages)
    .bind(timestamps)
    .execute(exec::on(pool))
    .await?;
    Ok(())
}

/// `count` conversations, each of a new user with a new agent of theirs (so that no user
/// waits behind another's conversations); returns their ids.
pub async fn seed_conversations(pool: &PgPool, count: i64) -> Result<Vec<Uuid>, StoreError> {
    Ok(exec::query_scalar(
        r#"
        WITH new_users AS (
          INSERT INTO public.users (email, name)
          SELECT 'bench-' || gen_random_uuid() || '@agentd.invalid', 'bench'
            FROM generate_series(1, $1)
          RETURNING id
        ), new_agents AS (
          INSERT INTO public.agents (user_id, name, description, icon, category, instructions)
          SELECT id, 'bench', 'agentd bench', 'bot', 'bench', 'Answer briefly.' FROM new_users
          RETURNING id, user_id
        )
        INSERT INTO public.conversations (user_id, agent_id, title)
        SELECT user_id, id, 'bench' FROM new_agents
        RETURNING id
        "#,
    )
    .bind(count)
    .fetch_all(exec::on(pool))
    .await?)
}

/// Writes a user message as the application does (one statement, committed at once);
/// returns its id and the database's clock at the end of the insert, just before the
/// commit that queues it for a turn.
pub async fn post_message(
    pool: &PgPool,
    conversation: Uuid,
    content: &str,
) -> Result<(Uuid, DateTime<Utc>), StoreError> {
    Ok(exec::query_as(
        "INSERT INTO public.messages (conversation_id, content, sender_type) \
         VALUES ($1, $2, 'user') RETURNING id, clock_timestamp()",
    )
    .bind(conversation)
    .bind(content)
    .fetch_one(exec::on(pool))
    .await?)
}

/// Those of `conversations` whose reply shows text.
pub async fn replies_with_text(
    pool: &PgPool,
    conversations: &[Uuid],
) -> Result<Vec<Uuid>, StoreError> {
    Ok(exec::query_scalar(
        "SELECT DISTINCT conversation_id FROM public.messages \
          WHERE conversation_id = ANY($1) AND sender_type = 'agent' AND content <> ''",
    )
    .bind(conversations)
    .fetch_all(exec::on(pool))
    .await?)
}

/// For each of `messages` (written at `written_at`, the database's clock) that a turn
/// answered, the seconds from then to the start of its turn's run (`start_time`, the
/// claim transaction's `now()`), sorted.
pub async fn turn_start_lags(
    pool: &PgPool,
    messages: &[Uuid],
    written_at: &[DateTime<Utc>],
) -> Result<Vec<f64>, StoreError> {
    Ok(exec::query_scalar(
        r#"
        SELECT extract(epoch FROM r.start_time - x.written_at)::float8 AS lag
          FROM unnest($1::uuid[], $2::timestamptz[]) AS x(message_id, written_at)
          JOIN agentd.turn_messages tm ON tm.message_id = x.message_id
          JOIN public.runs r ON r.id = tm.run_id
         ORDER BY lag
        "#,
    )
    .bind(messages)
    .bind(written_at)
    .fetch_all(exec::on(pool))
    .await?)
}

/// The replies (agent messages) as they ended.
#[derive(Debug, Clone, Copy)]
pub struct ReplyCounts {
    /// Agent messages.
    pub replies: i64,
    /// Conversations with at least one.
    pub conversations_answered: i64,
    /// Replies whose status is `completed` and whose text is the whole answer.
    pub completed: i64,
    /// Turns (each one run).
    pub turns: i64,
}

/// Counts the replies; `answer` is the text a completed reply must hold.
pub async fn reply_counts(pool: &PgPool, answer: &str) -> Result<ReplyCounts, StoreError> {
    let (replies, conversations_answered, completed, turns) = exec::query_as(
        r#"
        SELECT count(*), count(DISTINCT conversation_id),
               count(*) FILTER (WHERE attachments->>'status' = 'completed' AND content = $1),
               (SELECT count(*) FROM agentd.turns)
          FROM public.messages WHERE sender_type = 'agent'
        "#,
    )
    .bind(answer)
    .fetch_one(exec::on(pool))
    .await?;
    Ok(ReplyCounts {
        replies,
        conversations_answered,
        completed,
        turns,
    })
}

/// Backends connected to database `name` (read from another database).
pub async fn backends(admin: &PgPool, name: &str) -> Result<i64, StoreError> {
    Ok(
        exec::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
            .bind(name)
            .fetch_one(admin)
            .await?,
    )
}

/// Rows inserted and rows updated in `public.messages` since the database was created, as
/// the server's statistics have them (each backend reports its counts at the latest when
/// it exits).
pub async fn message_row_writes(pool: &PgPool) -> Result<(i64, i64), StoreError> {
    let mut tx = pool.begin().await?;
    exec::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *tx)
        .await?;
    let counts: Option<(i64, i64)> = exec::query_as(
        "SELECT n_tup_ins, n_tup_upd FROM pg_stat_user_tables \
          WHERE relid = 'public.messages'::regclass",
    )
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(counts.unwrap_or((0, 0)))
}

/// Backends on database `name` that have finished listening for chat messages: the
/// replicas' notification connections, idle after their `LISTEN` (read from another
/// database).
pub async fn message_listeners(admin: &PgPool, name: &str) -> Result<i64, StoreError> {
    Ok(exec::query_scalar(
        r#"
        SELECT count(*) FROM pg_stat_activity
         WHERE datname = $1 AND state = 'idle' AND query LIKE '%LISTEN "agentd_messages"%'
        "#,
    )
    .bind(name)
    .fetch_one(admin)
    .await?)
}
