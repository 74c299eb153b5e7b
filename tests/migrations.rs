//! Migrations: they create database-schema.md's schema exactly, run twice without change,
//! and adopt a database where the application (Supabase) already created everything.

mod support;

use sqlx::PgPool;
use support::{SUPABASE_PLATFORM, TestDb, execute_script};

const APPLICATION_TABLES: [&str; 11] = [
    "users",
    "agents",
    "agent_variables",
    "agent_schedules",
    "teams",
    "team_agents",
    "runs",
    "run_logs",
    "run_artifacts",
    "conversations",
    "messages",
];

/// Everything about the schema a migration could change: columns with types, defaults and
/// nullability; constraints; indexes; policies; RLS flags; functions; schemas; grants.
async fn catalog(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar::<_, String>(
        r#"
        SELECT 'column ' || table_schema || '.' || table_name || '.' || column_name || ' '
               || data_type || ' null=' || is_nullable || ' default=' || coalesce(column_default, '-')
          FROM information_schema.columns WHERE table_schema IN ('public', 'agentd', 'auth')
        UNION ALL
        SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace::regnamespace::text IN ('public', 'agentd')
        UNION ALL
        SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname IN ('public', 'agentd')
        UNION ALL
        SELECT 'policy ' || tablename || ' ' || policyname || ' ' || cmd || ' ' || roles::text
               || ' using=' || coalesce(qual, '-') || ' check=' || coalesce(with_check, '-')
          FROM pg_policies
        UNION ALL
        SELECT 'rls ' || oid::regclass || ' ' || relrowsecurity FROM pg_class
         WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'
        UNION ALL
        SELECT 'function ' || p.oid::regprocedure || ' ' || md5(p.prosrc) FROM pg_proc p
         WHERE p.pronamespace::regnamespace::text IN ('public', 'agentd', 'auth')
        UNION ALL
        SELECT 'schema ' || nspname || ' ' || coalesce(nspacl::text, '-') FROM pg_namespace
         WHERE nspname IN ('public', 'agentd', 'auth')
        UNION ALL
        SELECT 'grant ' || table_schema || '.' || table_name || ' ' || grantee || ' ' || privilege_type
          FROM information_schema.role_table_grants WHERE grantee IN ('anon', 'authenticated')
        ORDER BY 1
        "#,
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn migrations_apply_to_an_empty_database_and_a_second_run_changes_nothing() {
    let db = TestDb::new().await;
    let first = agentd::store::migrate(&db.pool).await.unwrap();
    assert!(first.applied.len() >= 4, "{first:?}");
    let before = catalog(&db.pool).await;

    let second = agentd::store::migrate(&db.pool).await.unwrap();
    assert!(second.applied.is_empty(), "{second:?}");
    assert_eq!(second.current, first.current);
    assert_eq!(catalog(&db.pool).await, before);

    // The bookkeeping lives in schema agentd, not in the API-exposed public schema.
    let public_tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut expected: Vec<String> = APPLICATION_TABLES.iter().map(|t| t.to_string()).collect();
    expected.sort();
    assert_eq!(public_tables, expected);
}

#[tokio::test]
async fn the_migrated_schema_is_database_schema_md_exactly() {
    // One database built from the seed's SQL verbatim, one from our migrations: every
    // column, default, constraint and index of the application's tables is the same, and
    // every policy of the seed is there unchanged.
    let seeded = TestDb::new().await;
    execute_script(&seeded.pool, SUPABASE_PLATFORM).await;
    execute_script(
        &seeded.pool,
        include_str!("fixtures/application_schema.sql"),
    )
    .await;
    let migrated = TestDb::migrated().await;

    let seed_catalog = catalog(&seeded.pool).await;
    let our_catalog = catalog(&migrated.pool).await;
    let structural = |line: &&String| {
        (line.starts_with("column public.")
            || line.starts_with("constraint ")
            || line.starts_with("index "))
            && !line.contains("agentd")
    };
    let seed_structure: Vec<&String> = seed_catalog.iter().filter(structural).collect();
    let our_structure: Vec<&String> = our_catalog.iter().filter(structural).collect();
    assert_eq!(our_structure, seed_structure);
    assert!(seed_structure.len() > 100, "catalog query too narrow");

    for policy in seed_catalog.iter().filter(|l| l.starts_with("policy ")) {
        assert!(
            our_catalog.contains(policy),
            "missing seed policy: {policy}"
        );
    }
    for table in APPLICATION_TABLES {
        assert!(
            our_catalog.contains(&format!("rls {table} true")),
            "RLS is off on {table}"
        );
    }
}

#[tokio::test]
async fn migrations_adopt_a_supabase_database_without_touching_rows() {
    let db = TestDb::new().await;
    execute_script(&db.pool, SUPABASE_PLATFORM).await;
    execute_script(&db.pool, include_str!("fixtures/application_schema.sql")).await;
    execute_script(
        &db.pool,
        r#"
        INSERT INTO users (id, email, name) VALUES
          ('00000000-0000-0000-0000-00000000000a', 'a@example.com', 'A');
        INSERT INTO agents (id, name, icon, category, user_id) VALUES
          ('00000000-0000-0000-0000-0000000000a1', 'Writer', 'pen', 'writing', '00000000-0000-0000-0000-00000000000a');
        INSERT INTO agent_variables (agent_id, name, description, value) VALUES
          ('00000000-0000-0000-0000-0000000000a1', 'API_KEY', 'key', 'sk-secret');
        INSERT INTO agent_schedules (agent_id, enabled, frequency, interval, time, timezone) VALUES
          ('00000000-0000-0000-0000-0000000000a1', true, 'daily', 1, '09:00', 'Europe/Berlin');
        INSERT INTO teams (id, name, type, user_id) VALUES
          ('00000000-0000-0000-0000-0000000000b1', 'Team', 'route', '00000000-0000-0000-0000-00000000000a');
        INSERT INTO team_agents (team_id, agent_id, position) VALUES
          ('00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-0000000000a1', 1);
        INSERT INTO runs (id, type, target_id, status, start_time, triggered_by_id) VALUES
          ('00000000-0000-0000-0000-0000000000c1', 'agent', '00000000-0000-0000-0000-0000000000a1', 'completed', now(), '00000000-0000-0000-0000-00000000000a');
        INSERT INTO run_logs (run_id, message) VALUES ('00000000-0000-0000-0000-0000000000c1', 'hello');
        INSERT INTO run_artifacts (run_id, name, type, size, url) VALUES
          ('00000000-0000-0000-0000-0000000000c1', 'out.md', 'text/markdown', 5, 'file:///tmp/out.md');
        INSERT INTO conversations (id, user_id, agent_id, title) VALUES
          ('00000000-0000-0000-0000-0000000000d1', '00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-0000000000a1', 'Chat');
        INSERT INTO messages (conversation_id, content, sender_type) VALUES
          ('00000000-0000-0000-0000-0000000000d1', 'hi', 'user');
        "#,
    )
    .await;
    let uid_source_before: String =
        sqlx::query_scalar("SELECT prosrc FROM pg_proc WHERE oid = 'auth.uid()'::regprocedure")
            .fetch_one(&db.pool)
            .await
            .unwrap();

    agentd::store::migrate(&db.pool).await.unwrap();

    for table in APPLICATION_TABLES {
        assert_eq!(count(&db.pool, table).await, 1, "rows of {table}");
    }
    let value: String = sqlx::query_scalar("SELECT value FROM agent_variables")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(value, "sk-secret");
    // Supabase's own auth.uid() is kept, not replaced by the stand-in.
    let uid_source_after: String =
        sqlx::query_scalar("SELECT prosrc FROM pg_proc WHERE oid = 'auth.uid()'::regprocedure")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(uid_source_after, uid_source_before);
    // And the forgotten policies are now in place.
    let policies: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT tablename) FROM pg_policies WHERE schemaname = 'public'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(policies, 11);
}

#[tokio::test]
async fn auth_uid_reads_the_sub_claim_and_is_null_without_one() {
    let db = TestDb::migrated().await;
    let mut tx = db.pool.begin().await.unwrap();
    let none: Option<uuid::Uuid> = sqlx::query_scalar("SELECT auth.uid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(none, None);
    sqlx::query("SELECT set_config('request.jwt.claims', $1, true)")
        .bind(r#"{"sub":"11111111-2222-3333-4444-555555555555","role":"authenticated"}"#)
        .execute(&mut *tx)
        .await
        .unwrap();
    let some: Option<uuid::Uuid> = sqlx::query_scalar("SELECT auth.uid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(
        some.map(|u| u.to_string()).as_deref(),
        Some("11111111-2222-3333-4444-555555555555")
    );
    sqlx::query("SELECT set_config('request.jwt.claims', '{\"role\":\"anon\"}', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let no_sub: Option<uuid::Uuid> = sqlx::query_scalar("SELECT auth.uid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(no_sub, None);
}

#[tokio::test]
async fn agentd_schema_is_closed_to_api_roles() {
    let db = TestDb::migrated().await;
    for role in ["anon", "authenticated"] {
        let usage: bool = sqlx::query_scalar("SELECT has_schema_privilege($1, 'agentd', 'USAGE')")
            .bind(role)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(!usage, "{role} can use schema agentd");
    }
}

#[tokio::test]
async fn the_migrate_command_applies_then_reports_up_to_date() {
    let db = TestDb::new().await;
    let run = || {
        std::process::Command::new(support::agentd_binary())
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .env("AGENTD__LOGGING__FORMAT", "json")
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{first:?}");
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.starts_with("applied "), "{stdout}");
    let second = run();
    assert!(second.status.success(), "{second:?}");
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(stdout.contains("database is up to date"), "{stdout}");
}

#[tokio::test]
async fn an_older_agentd_accepts_a_database_migrated_by_a_newer_one() {
    let db = TestDb::migrated().await;
    assert!(
        agentd::store::pending_migrations(&db.pool)
            .await
            .unwrap()
            .is_empty()
    );
    // A migration this binary does not know, as a newer agentd would have recorded it.
    sqlx::query(
        "INSERT INTO agentd._sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (29991231000000, 'from the future', true, '\\x00', 1)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let report = agentd::store::migrate(&db.pool).await.unwrap();
    assert!(report.applied.is_empty(), "{report:?}");
    assert!(
        agentd::store::pending_migrations(&db.pool)
            .await
            .unwrap()
            .is_empty(),
        "a newer migration is not pending for an older binary"
    );
    // One of ours missing is pending (what /readyz reports).
    sqlx::query("DELETE FROM agentd._sqlx_migrations WHERE version = 20260101000006")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        agentd::store::pending_migrations(&db.pool).await.unwrap(),
        vec![20260101000006]
    );
}
