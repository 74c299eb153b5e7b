//! `agentd demo`: seeds once, runs a team at once, chats with the Greeter, prints the logs,
//! stops on Ctrl-C.

mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::{Daemon, TestDb, agentd, count, create_agent, create_user};

/// Runs `agentd demo` (with `args`) until its own team run prints `expected`, then sends
/// SIGINT; returns stdout.
fn demo_until(url: &str, args: &[&str], expected: &str) -> Vec<String> {
    let mut child = agentd()
        .arg("demo")
        .args(args)
        .env("DATABASE_URL", url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let ours = |seen: &[String]| {
        let run = seen
            .iter()
            .find_map(|line| line.strip_prefix("team run "))
            .map(|rest| rest[..8].to_string());
        run.is_some_and(|run| {
            seen.iter()
                .any(|line| line.contains(&format!("run {run} ")) && line.contains(expected))
        }) && seen
            .iter()
            .any(|line| line.starts_with("chat with the Greeter (completed):"))
    };
    while !ours(&seen) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("no {expected:?} within 30 s; saw {seen:#?}");
            }
        }
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_runs_a_team_prints_its_logs_and_does_not_duplicate_its_data() {
    let db = TestDb::new().await;
    let url = db.url.clone();
    let first =
        tokio::task::spawn_blocking(move || demo_until(&url, &[], "step 2: Summarizer completed"))
            .await
            .unwrap();
    assert!(first[0].starts_with("demo data created"), "{first:#?}");
    assert!(
        first
            .iter()
            .any(|line| line.contains("info step 1: Greeter (builtin) starts"))
    );
    let counts = || async {
        (
            count(
                &db.pool,
                "SELECT count(*) FROM users WHERE email = 'demo@agentd.local'",
            )
            .await,
            count(&db.pool, "SELECT count(*) FROM agents").await,
            count(&db.pool, "SELECT count(*) FROM teams").await,
            count(&db.pool, "SELECT count(*) FROM agent_schedules").await,
            count(&db.pool, "SELECT count(*) FROM team_agents").await,
        )
    };
    assert_eq!(counts().await, (1, 3, 3, 2, 7));
    // Its schedules were planned: they fire every minute while the demo runs.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM agent_schedules WHERE next_run IS NOT NULL"
        )
        .await,
        2
    );
    // The chat's reply, printed once final: the Greeter's instructions and the question.
    let chat = first
        .iter()
        .position(|line| line.starts_with("chat with the Greeter"))
        .unwrap();
    assert_eq!(first[chat + 1], "  you: Hello! What can you do?");
    assert!(
        first[chat + 2].starts_with("  Greeter: Hello world!"),
        "{first:#?}"
    );
    let url = db.url.clone();
    let second =
        tokio::task::spawn_blocking(move || demo_until(&url, &[], "step 2: Summarizer completed"))
            .await
            .unwrap();
    assert_eq!(second[0], "demo data already present");
    assert_eq!(counts().await, (1, 3, 3, 2, 7));
    // One conversation; each demo asked once and was answered once.
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM conversations").await,
        1
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM messages WHERE sender_type = 'agent' AND attachments->>'status' = 'completed'").await,
        2
    );
    let statuses: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT status, error FROM runs WHERE type = 'team' ORDER BY start_time")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        statuses,
        vec![
            ("completed".to_string(), None),
            ("completed".to_string(), None)
        ],
        "{first:#?} {second:#?}"
    );
}

/// The database's rows that the demo would write: users, agents, teams, schedules, runs,
/// conversations.
async fn demo_tables(db: &TestDb) -> [i64; 6] {
    let mut counts = [0; 6];
    for (count_of, table) in counts.iter_mut().zip([
        "users",
        "agents",
        "teams",
        "agent_schedules",
        "runs",
        "conversations",
    ]) {
        *count_of = count(&db.pool, &format!("SELECT count(*) FROM {table}")).await;
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_refuses_a_database_holding_other_users_or_agents_unless_told() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    create_agent(&db.pool, user).await;
    create_agent(&db.pool, user).await;

    let mut refused = Daemon::start({
        let mut command = agentd();
        command.arg("demo").env("DATABASE_URL", &db.url);
        command
    });
    let status = refused.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{:#?}", refused.seen);
    // Besides log lines (JSON), stderr holds one line, and stdout nothing.
    let said: Vec<String> = refused
        .seen
        .iter()
        .filter_map(|line| {
            let stderr = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|wrapped| wrapped["stderr"].as_str().map(str::to_string));
            match stderr {
                Some(stderr) if serde_json::from_str::<serde_json::Value>(&stderr).is_ok() => None,
                Some(stderr) => Some(stderr),
                None => Some(format!("stdout: {line}")),
            }
        })
        .collect();
    assert_eq!(
        said,
        [
            "demo: the database holds data the demo did not create (public.users: 1 row, \
          public.agents: 2 rows); its schedules would fire every minute there for as long as \
          a worker runs: use an empty database, or pass --into-existing-database to add the \
          demo data anyway"
        ],
        "{:#?}",
        refused.seen
    );
    assert_eq!(
        demo_tables(&db).await,
        [1, 2, 0, 0, 0, 0],
        "nothing was written"
    );

    // Told to, it adds its data beside the application's.
    let url = db.url.clone();
    let told = tokio::task::spawn_blocking(move || {
        demo_until(
            &url,
            &["--into-existing-database"],
            "step 2: Summarizer completed",
        )
    })
    .await
    .unwrap();
    assert!(told[0].starts_with("demo data created"), "{told:#?}");
    let [users, agents, teams, schedules, ..] = demo_tables(&db).await;
    assert_eq!((users, agents, teams, schedules), (2, 5, 3, 2));
    assert_eq!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM agents WHERE user_id = '{user}'")
        )
        .await,
        2,
        "the application's agents are left as they were"
    );
}
