//! The seed's constraints still reject what they should after agentd's migrations.

mod support;

use support::{TestDb, execute_script};

const BASE: &str = r#"
INSERT INTO users (id, email, name) VALUES ('00000000-0000-0000-0000-00000000000a', 'a@example.com', 'A');
INSERT INTO agents (id, name, icon, category, user_id) VALUES
  ('00000000-0000-0000-0000-0000000001aa', 'A agent', 'i', 'c', '00000000-0000-0000-0000-00000000000a');
INSERT INTO conversations (id, user_id, agent_id, title) VALUES
  ('00000000-0000-0000-0000-0000000008aa', '00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-0000000001aa', 'chat');
"#;

/// Runs `sql` and returns the SQLSTATE of the error it must raise.
async fn rejection(db: &TestDb, sql: &str) -> String {
    match sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&db.pool)
        .await
    {
        Err(sqlx::Error::Database(error)) => error.code().unwrap_or_default().into_owned(),
        other => panic!("accepted: {sql}: {other:?}"),
    }
}

#[tokio::test]
async fn seed_constraints_reject_bad_rows() {
    let db = TestDb::migrated().await;
    execute_script(&db.pool, BASE).await;
    let check = "23514";
    let unique = "23505";
    let foreign_key = "23503";
    let not_null = "23502";
    let cases = [
        (
            "INSERT INTO teams (name, type, user_id) VALUES ('t', 'mob', '00000000-0000-0000-0000-00000000000a')",
            check,
        ),
        (
            "INSERT INTO runs (type, target_id, status, start_time, triggered_by_id) VALUES ('agent', gen_random_uuid(), 'paused', now(), '00000000-0000-0000-0000-00000000000a')",
            check,
        ),
        (
            "INSERT INTO runs (type, target_id, status, start_time, triggered_by_id) VALUES ('crew', gen_random_uuid(), 'running', now(), '00000000-0000-0000-0000-00000000000a')",
            check,
        ),
        (
            "INSERT INTO messages (conversation_id, content, sender_type) VALUES ('00000000-0000-0000-0000-0000000008aa', 'x', 'system')",
            check,
        ),
        (
            "INSERT INTO users (email, name) VALUES ('a@example.com', 'again')",
            unique,
        ),
        (
            "INSERT INTO agents (name, icon, category, user_id) VALUES ('x', 'i', 'c', '00000000-0000-0000-0000-0000000000ff')",
            foreign_key,
        ),
        (
            "INSERT INTO agent_variables (agent_id, name, description) VALUES (gen_random_uuid(), 'k', 'd')",
            foreign_key,
        ),
        (
            "INSERT INTO run_logs (run_id, message) VALUES (gen_random_uuid(), 'x')",
            foreign_key,
        ),
        (
            "INSERT INTO team_agents (team_id, agent_id, position) VALUES (gen_random_uuid(), '00000000-0000-0000-0000-0000000001aa', 1)",
            foreign_key,
        ),
        (
            "INSERT INTO agents (name, icon, category) VALUES ('x', 'i', 'c')",
            not_null,
        ),
        (
            "INSERT INTO agent_schedules (agent_id, frequency, interval) VALUES ('00000000-0000-0000-0000-0000000001aa', 'daily', 1)",
            not_null,
        ),
    ];
    for (sql, code) in cases {
        assert_eq!(rejection(&db, sql).await, code, "{sql}");
    }
    // Deleting a user who still owns agents is refused too.
    assert_eq!(
        rejection(
            &db,
            "DELETE FROM users WHERE id = '00000000-0000-0000-0000-00000000000a'"
        )
        .await,
        foreign_key
    );
}
