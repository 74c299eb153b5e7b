//! The demo's data: a user, agents, one team of each type, schedules firing every minute
//! and a conversation. Fixed ids and `ON CONFLICT DO NOTHING` make seeding twice a no-op.

use super::exec;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::StoreError;

/// The demo user.
pub const USER: Uuid = Uuid::from_u128(0xa9e1_7d00_0000_4000_8000_0000_0000_0001);
/// The coordinate team the demo runs at once.
pub const COORDINATE_TEAM: Uuid = Uuid::from_u128(0xa9e1_7d00_0000_4000_8000_0000_0000_0c01);

/// The demo's conversation, with the Greeter.
pub const CONVERSATION: Uuid = Uuid::from_u128(0xa9e1_7d00_0000_4000_8000_0000_0000_0e01);

/// The demo's agents: the Greeter, the Summarizer and the System reporter.
const AGENTS: [Uuid; 3] = [
    Uuid::from_u128(0xa9e1_7d00_0000_4000_8000_0000_0000_00a1),
    Uuid::from_u128(0xa9e1_7d00_0000_4000_8000_0000_0000_00a2),
    Uuid::from_u128(0xa9e1_7d00_0000_4000_8000_0000_0000_00a3),
];

/// Rows of another table are counted up to this many (a production table is not scanned).
pub const OTHER_ROWS_COUNTED: i64 = 1000;

/// Rows of `public.users` and `public.agents` the demo did not create (each counted up to
/// [`OTHER_ROWS_COUNTED`]; zero for a table that does not exist yet). The demo writes only
/// into a database without them: its schedules would otherwise fire every minute wherever
/// a worker runs on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OtherRows {
    pub users: i64,
    pub agents: i64,
}

/// Counts the rows the demo did not create ([`OtherRows`]), without writing anything.
pub async fn other_rows(pool: &PgPool) -> Result<OtherRows, StoreError> {
    let (users_exist, agents_exist): (bool, bool) = exec::query_as(
        "SELECT to_regclass('public.users') IS NOT NULL, to_regclass('public.agents') IS NOT NULL",
    )
    .fetch_one(exec::on(pool))
    .await?;
    let mut found = OtherRows {
        users: 0,
        agents: 0,
    };
    if users_exist {
        found.users = exec::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM public.users WHERE id <> $1 LIMIT $2) other",
        )
        .bind(USER)
        .bind(OTHER_ROWS_COUNTED)
        .fetch_one(exec::on(pool))
        .await?;
    }
    if agents_exist {
        found.agents = exec::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM public.agents WHERE id <> ALL($1) LIMIT $2) other",
        )
        .bind(&AGENTS[..])
        .bind(OTHER_ROWS_COUNTED)
        .fetch_one(exec::on(pool))
        .await?;
    }
    Ok(found)
}

/// Creates what is missing of the demo data; returns how many rows it inserted.
pub async fn seed(pool: &PgPool) -> Result<u64, StoreError> {
    let done = sqlx::raw_sql(
        r#"
        INSERT INTO public.users (id, email, name) VALUES
          ('a9e17d00-0000-4000-8000-000000000001', 'demo@agentd.local', 'Demo user')
          ON CONFLICT DO NOTHING;
        INSERT INTO public.agents (id, name, description, icon, category, instructions, is_custom, user_id) VALUES
          ('a9e17d00-0000-4000-8000-0000000000a1', 'Greeter', 'greets people and says hello', 'wave', 'greeting',
           'Hello {{NAME}}! The topic of the day is: {{input}}', true, 'a9e17d00-0000-4000-8000-000000000001'),
          ('a9e17d00-0000-4000-8000-0000000000a2', 'Summarizer', 'summarizes text into short notes', 'notes', 'writing',
           'Summary for {{NAME}}: {{input}}', true, 'a9e17d00-0000-4000-8000-000000000001'),
          ('a9e17d00-0000-4000-8000-0000000000a3', 'System reporter', 'reports on the machine it runs on', 'cpu', 'system',
           'Report on the system.', true, 'a9e17d00-0000-4000-8000-000000000001')
          ON CONFLICT DO NOTHING;
        INSERT INTO public.agent_variables (id, agent_id, name, description, value) VALUES
          ('a9e17d00-0000-4000-8000-0000000000b1', 'a9e17d00-0000-4000-8000-0000000000a1', 'NAME', 'who to greet', 'world'),
          ('a9e17d00-0000-4000-8000-0000000000b2', 'a9e17d00-0000-4000-8000-0000000000a2', 'NAME', 'the reader', 'the demo user')
          ON CONFLICT DO NOTHING;
        INSERT INTO public.teams (id, name, description, type, user_id) VALUES
          ('a9e17d00-0000-4000-8000-000000000c01', 'Demo pipeline', 'greets, then summarizes', 'coordinate', 'a9e17d00-0000-4000-8000-000000000001'),
          ('a9e17d00-0000-4000-8000-000000000c02', 'Demo router', 'picks the right agent', 'route', 'a9e17d00-0000-4000-8000-000000000001'),
          ('a9e17d00-0000-4000-8000-000000000c03', 'Demo panel', 'everyone at once', 'collaborate', 'a9e17d00-0000-4000-8000-000000000001')
          ON CONFLICT DO NOTHING;
        INSERT INTO public.team_agents (team_id, agent_id, position) VALUES
          ('a9e17d00-0000-4000-8000-000000000c01', 'a9e17d00-0000-4000-8000-0000000000a1', 1),
          ('a9e17d00-0000-4000-8000-000000000c01', 'a9e17d00-0000-4000-8000-0000000000a2', 2),
          ('a9e17d00-0000-4000-8000-000000000c02', 'a9e17d00-0000-4000-8000-0000000000a1', 1),
          ('a9e17d00-0000-4000-8000-000000000c02', 'a9e17d00-0000-4000-8000-0000000000a2', 2),
          ('a9e17d00-0000-4000-8000-000000000c03', 'a9e17d00-0000-4000-8000-0000000000a1', 1),
          ('a9e17d00-0000-4000-8000-000000000c03', 'a9e17d00-0000-4000-8000-0000000000a2', 2),
          ('a9e17d00-0000-4000-8000-000000000c03', 'a9e17d00-0000-4000-8000-0000000000a3', 3)
          ON CONFLICT DO NOTHING;
        INSERT INTO public.conversations (id, user_id, agent_id, title) VALUES
          ('a9e17d00-0000-4000-8000-000000000e01', 'a9e17d00-0000-4000-8000-000000000001',
           'a9e17d00-0000-4000-8000-0000000000a1', 'Demo chat with the Greeter')
          ON CONFLICT DO NOTHING;
        INSERT INTO public.agent_schedules (id, agent_id, enabled, frequency, interval, time, timezone) VALUES
          ('a9e17d00-0000-4000-8000-0000000000d1', 'a9e17d00-0000-4000-8000-0000000000a1', true, 'minutely', 1, NULL, 'UTC'),
          ('a9e17d00-0000-4000-8000-0000000000d2', 'a9e17d00-0000-4000-8000-0000000000a3', true, 'cron', 1, '* * * * *', 'America/New_York')
          ON CONFLICT DO NOTHING;
        "#,
    )
    .execute(exec::on(pool))
    .await?;
    Ok(done.rows_affected())
}

/// A log line of any run, for the demo's printout.
#[derive(Debug, Clone)]
pub struct PrintedLine {
    pub run_id: Uuid,
    pub timestamp: DateTime<Utc>,
    pub id: Uuid,
    pub level: String,
    pub message: String,
}

/// Log lines of every run after a position, in emission order (at most 500).
pub async fn logs_after(
    pool: &PgPool,
    after: (DateTime<Utc>, Uuid),
) -> Result<Vec<PrintedLine>, StoreError> {
    let rows = exec::query(
        r#"
        SELECT run_id, timestamp, id, level, message FROM public.run_logs
         WHERE (timestamp, id) > ($1, $2)
         ORDER BY timestamp, id
         LIMIT 500
        "#,
    )
    .bind(after.0)
    .bind(after.1)
    .fetch_all(exec::on(pool))
    .await?;
    rows.iter()
        .map(|row| {
            Ok(PrintedLine {
                run_id: row.try_get("run_id")?,
                timestamp: row.try_get("timestamp")?,
                id: row.try_get("id")?,
                level: row.try_get("level")?,
                message: row.try_get("message")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::from)
}
