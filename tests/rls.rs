//! Row level security: a signed-in user sees and changes only their own rows in every
//! table, cannot create rows owned by someone else, cannot write runs, logs or artifacts,
//! and an anonymous caller reads nothing.

mod support;

use sqlx::PgPool;
use support::{TestDb, execute_script};

const USER_A: &str = "00000000-0000-0000-0000-00000000000a";
const USER_B: &str = "00000000-0000-0000-0000-00000000000b";

/// Two users with one row each in every table. Ids end in the owner's letter.
const WORLD: &str = r#"
INSERT INTO users (id, email, name) VALUES
  ('00000000-0000-0000-0000-00000000000a', 'a@example.com', 'A'),
  ('00000000-0000-0000-0000-00000000000b', 'b@example.com', 'B');
INSERT INTO agents (id, name, icon, category, user_id) VALUES
  ('00000000-0000-0000-0000-0000000001aa', 'A agent', 'i', 'c', '00000000-0000-0000-0000-00000000000a'),
  ('00000000-0000-0000-0000-0000000001bb', 'B agent', 'i', 'c', '00000000-0000-0000-0000-00000000000b');
INSERT INTO agent_variables (id, agent_id, name, description, value) VALUES
  ('00000000-0000-0000-0000-0000000002aa', '00000000-0000-0000-0000-0000000001aa', 'KEY', 'd', 'a-secret'),
  ('00000000-0000-0000-0000-0000000002bb', '00000000-0000-0000-0000-0000000001bb', 'KEY', 'd', 'b-secret');
INSERT INTO agent_schedules (id, agent_id, frequency, interval, timezone) VALUES
  ('00000000-0000-0000-0000-0000000003aa', '00000000-0000-0000-0000-0000000001aa', 'daily', 1, 'UTC'),
  ('00000000-0000-0000-0000-0000000003bb', '00000000-0000-0000-0000-0000000001bb', 'daily', 1, 'UTC');
INSERT INTO teams (id, name, type, user_id) VALUES
  ('00000000-0000-0000-0000-0000000004aa', 'A team', 'route', '00000000-0000-0000-0000-00000000000a'),
  ('00000000-0000-0000-0000-0000000004bb', 'B team', 'route', '00000000-0000-0000-0000-00000000000b');
INSERT INTO team_agents (team_id, agent_id, position) VALUES
  ('00000000-0000-0000-0000-0000000004aa', '00000000-0000-0000-0000-0000000001aa', 1),
  ('00000000-0000-0000-0000-0000000004bb', '00000000-0000-0000-0000-0000000001bb', 1);
INSERT INTO runs (id, type, target_id, status, start_time, triggered_by_id) VALUES
  ('00000000-0000-0000-0000-0000000005aa', 'agent', '00000000-0000-0000-0000-0000000001aa', 'completed', now(), '00000000-0000-0000-0000-00000000000a'),
  ('00000000-0000-0000-0000-0000000005bb', 'agent', '00000000-0000-0000-0000-0000000001bb', 'completed', now(), '00000000-0000-0000-0000-00000000000b');
INSERT INTO run_logs (id, run_id, message) VALUES
  ('00000000-0000-0000-0000-0000000006aa', '00000000-0000-0000-0000-0000000005aa', 'a log'),
  ('00000000-0000-0000-0000-0000000006bb', '00000000-0000-0000-0000-0000000005bb', 'b log');
INSERT INTO run_artifacts (id, run_id, name, type, size, url) VALUES
  ('00000000-0000-0000-0000-0000000007aa', '00000000-0000-0000-0000-0000000005aa', 'a.md', 'text/markdown', 1, 'file:///a'),
  ('00000000-0000-0000-0000-0000000007bb', '00000000-0000-0000-0000-0000000005bb', 'b.md', 'text/markdown', 1, 'file:///b');
INSERT INTO conversations (id, user_id, agent_id, title) VALUES
  ('00000000-0000-0000-0000-0000000008aa', '00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-0000000001aa', 'A chat'),
  ('00000000-0000-0000-0000-0000000008bb', '00000000-0000-0000-0000-00000000000b', '00000000-0000-0000-0000-0000000001bb', 'B chat');
INSERT INTO messages (id, conversation_id, content, sender_type) VALUES
  ('00000000-0000-0000-0000-0000000009aa', '00000000-0000-0000-0000-0000000008aa', 'a msg', 'user'),
  ('00000000-0000-0000-0000-0000000009bb', '00000000-0000-0000-0000-0000000008bb', 'b msg', 'user');
"#;

/// (table, the column that tells the owner apart in WORLD: ids end in "aa"/"bb", except
/// users and team_agents).
const TABLES: [(&str, &str); 11] = [
    ("users", "id::text"),
    ("agents", "id::text"),
    ("agent_variables", "id::text"),
    ("agent_schedules", "id::text"),
    ("teams", "id::text"),
    ("team_agents", "team_id::text"),
    ("runs", "id::text"),
    ("run_logs", "id::text"),
    ("run_artifacts", "id::text"),
    ("conversations", "id::text"),
    ("messages", "id::text"),
];

/// Who a statement runs as.
#[derive(Clone, Copy)]
enum Caller<'a> {
    /// `authenticated` with this user id as the JWT's `sub`.
    User(&'a str),
    /// `anon`, without claims.
    Anonymous,
}

/// Runs one statement as the caller, in a transaction that is rolled back, and returns the
/// rows it affected or returned, or the database's refusal.
async fn run_as(pool: &PgPool, caller: Caller<'_>, sql: &str) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await.unwrap();
    match caller {
        Caller::User(id) => {
            sqlx::query("SET LOCAL ROLE authenticated")
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::query("SELECT set_config('request.jwt.claims', $1, true)")
                .bind(format!(r#"{{"sub":"{id}","role":"authenticated"}}"#))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        Caller::Anonymous => {
            sqlx::query("SET LOCAL ROLE anon")
                .execute(&mut *tx)
                .await
                .unwrap();
        }
    }
    let result = if sql.trim_start().to_uppercase().starts_with("SELECT") {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut *tx)
            .await
            .map(|n| n as u64)
    } else {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut *tx)
            .await
            .map(|done| done.rows_affected())
    };
    let _ = tx.rollback().await;
    result
}

fn assert_refused(result: Result<u64, sqlx::Error>, what: &str) {
    match result {
        Err(sqlx::Error::Database(error)) => assert_eq!(
            error.code().as_deref(),
            Some("42501"),
            "{what}: expected a privilege or policy refusal, got {error}"
        ),
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

async fn world() -> TestDb {
    let db = TestDb::migrated().await;
    execute_script(&db.pool, WORLD).await;
    db
}

#[tokio::test]
async fn a_user_reads_exactly_their_own_rows_in_every_table() {
    let db = world().await;
    for (table, column) in TABLES {
        let all = run_as(
            &db.pool,
            Caller::User(USER_A),
            &format!("SELECT count(*) FROM {table}"),
        )
        .await
        .unwrap();
        let own_marker = if table == "users" { "a" } else { "aa" };
        let own = run_as(
            &db.pool,
            Caller::User(USER_A),
            &format!("SELECT count(*) FROM {table} WHERE {column} LIKE '%{own_marker}'"),
        )
        .await
        .unwrap();
        assert_eq!(
            (all, own),
            (1, 1),
            "{table}: A must see exactly A's one row"
        );
    }
}

#[tokio::test]
async fn a_user_cannot_read_someone_elses_secrets_schedules_logs_artifacts_or_messages() {
    let db = world().await;
    for (table, expected_text) in [
        ("agent_variables", "value"),
        ("agent_schedules", "frequency"),
        ("run_logs", "message"),
        ("run_artifacts", "url"),
        ("messages", "content"),
        ("team_agents", "position::text"),
    ] {
        let key = if table == "team_agents" {
            "team_id"
        } else {
            "id"
        };
        let seen = run_as(
            &db.pool,
            Caller::User(USER_A),
            &format!("SELECT count({expected_text}) FROM {table} WHERE {key}::text LIKE '%bb'"),
        )
        .await
        .unwrap();
        assert_eq!(seen, 0, "A can read B's {table}");
        // B, for contrast, sees their own.
        let own = run_as(
            &db.pool,
            Caller::User(USER_B),
            &format!("SELECT count({expected_text}) FROM {table} WHERE {key}::text LIKE '%bb'"),
        )
        .await
        .unwrap();
        assert_eq!(own, 1, "B cannot read B's own {table}");
    }
}

#[tokio::test]
async fn a_user_changes_only_their_own_rows() {
    let db = world().await;
    let changes = [
        ("agents", "name = 'x'", "id"),
        ("agent_variables", "value = 'x'", "id"),
        ("agent_schedules", "enabled = true", "id"),
        ("teams", "name = 'x'", "id"),
        ("team_agents", "position = 2", "team_id"),
        ("conversations", "title = 'x'", "id"),
        ("messages", "content = 'x'", "id"),
    ];
    for (table, set, key) in changes {
        let own = run_as(
            &db.pool,
            Caller::User(USER_A),
            &format!("UPDATE {table} SET {set} WHERE {key}::text LIKE '%aa'"),
        )
        .await
        .unwrap();
        assert_eq!(own, 1, "A cannot update A's {table}");
        let other = run_as(
            &db.pool,
            Caller::User(USER_A),
            &format!("UPDATE {table} SET {set} WHERE {key}::text LIKE '%bb'"),
        )
        .await
        .unwrap();
        assert_eq!(other, 0, "A updated B's {table}");
        let deleted = run_as(
            &db.pool,
            Caller::User(USER_A),
            &format!("DELETE FROM {table} WHERE {key}::text LIKE '%bb'"),
        )
        .await;
        // Row level security hides B's rows from A: the delete finds nothing (an error of
        // any kind, a typo in this statement included, would not say so).
        assert_eq!(
            deleted.map_err(|error| error.to_string()),
            Ok(0),
            "A's delete of B's {table}"
        );
    }
    // users has only the seed's read policy: nobody changes user rows through the API.
    let updated = run_as(
        &db.pool,
        Caller::User(USER_A),
        "UPDATE users SET name = 'x'",
    )
    .await
    .unwrap();
    assert_eq!(updated, 0);
}

#[tokio::test]
async fn a_user_cannot_create_rows_owned_by_someone_else() {
    let db = world().await;
    let attempts = [
        (
            "agent for B",
            format!(
                "INSERT INTO agents (name, icon, category, user_id) VALUES ('x', 'i', 'c', '{USER_B}')"
            ),
        ),
        (
            "variable on B's agent",
            "INSERT INTO agent_variables (agent_id, name, description, value) VALUES \
             ('00000000-0000-0000-0000-0000000001bb', 'K', 'd', 'v')"
                .to_string(),
        ),
        (
            "schedule on B's agent",
            "INSERT INTO agent_schedules (agent_id, frequency, interval, timezone) VALUES \
             ('00000000-0000-0000-0000-0000000001bb', 'daily', 1, 'UTC')"
                .to_string(),
        ),
        (
            "team for B",
            format!("INSERT INTO teams (name, type, user_id) VALUES ('t', 'route', '{USER_B}')"),
        ),
        (
            "B's agent in A's team",
            "INSERT INTO team_agents (team_id, agent_id, position) VALUES \
             ('00000000-0000-0000-0000-0000000004aa', '00000000-0000-0000-0000-0000000001bb', 2)"
                .to_string(),
        ),
        (
            "A's agent in B's team",
            "INSERT INTO team_agents (team_id, agent_id, position) VALUES \
             ('00000000-0000-0000-0000-0000000004bb', '00000000-0000-0000-0000-0000000001aa', 2)"
                .to_string(),
        ),
        (
            "conversation for B",
            format!(
                "INSERT INTO conversations (user_id, agent_id, title) VALUES \
                 ('{USER_B}', '00000000-0000-0000-0000-0000000001bb', 't')"
            ),
        ),
        (
            "message in B's conversation",
            "INSERT INTO messages (conversation_id, content, sender_type) VALUES \
             ('00000000-0000-0000-0000-0000000008bb', 'x', 'user')"
                .to_string(),
        ),
        (
            "moving A's variable to B's agent",
            "UPDATE agent_variables SET agent_id = '00000000-0000-0000-0000-0000000001bb' \
             WHERE id = '00000000-0000-0000-0000-0000000002aa'"
                .to_string(),
        ),
        (
            "handing A's agent to B",
            format!(
                "UPDATE agents SET user_id = '{USER_B}' WHERE id = '00000000-0000-0000-0000-0000000001aa'"
            ),
        ),
    ];
    for (what, sql) in attempts {
        assert_refused(run_as(&db.pool, Caller::User(USER_A), &sql).await, what);
    }
    // The same kind of insert for A's own rows works.
    let own = run_as(
        &db.pool,
        Caller::User(USER_A),
        "INSERT INTO agent_variables (agent_id, name, description, value) VALUES \
         ('00000000-0000-0000-0000-0000000001aa', 'K2', 'd', 'v')",
    )
    .await
    .unwrap();
    assert_eq!(own, 1);
}

#[tokio::test]
async fn runs_logs_and_artifacts_are_written_only_by_the_worker() {
    let db = world().await;
    let attempts = [
        format!(
            "INSERT INTO runs (type, target_id, status, start_time, triggered_by_id) VALUES \
             ('agent', '00000000-0000-0000-0000-0000000001aa', 'running', now(), '{USER_A}')"
        ),
        "UPDATE runs SET status = 'failed' WHERE id = '00000000-0000-0000-0000-0000000005aa'".into(),
        "DELETE FROM runs WHERE id = '00000000-0000-0000-0000-0000000005aa'".into(),
        "INSERT INTO run_logs (run_id, message) VALUES ('00000000-0000-0000-0000-0000000005aa', 'x')".into(),
        "UPDATE run_logs SET message = 'x'".into(),
        "INSERT INTO run_artifacts (run_id, name, type, size, url) VALUES \
         ('00000000-0000-0000-0000-0000000005aa', 'n', 't', 1, 'u')"
            .into(),
        "DELETE FROM run_artifacts".into(),
    ];
    for sql in attempts {
        assert_refused(run_as(&db.pool, Caller::User(USER_A), &sql).await, &sql);
    }
}

#[tokio::test]
async fn anonymous_callers_read_nothing() {
    let db = world().await;
    for (table, _) in TABLES {
        let result = run_as(
            &db.pool,
            Caller::Anonymous,
            &format!("SELECT count(*) FROM {table}"),
        )
        .await;
        match result {
            Ok(rows) => assert_eq!(rows, 0, "anon reads {table}"),
            Err(error) => assert_refused(Err(error), table),
        }
    }
    // A signed-in role without a subject claim is no one: it sees nothing either.
    let db_pool = &db.pool;
    let mut tx = db_pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE authenticated")
        .execute(&mut *tx)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM agent_variables")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(seen, 0);
}
