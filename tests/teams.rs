//! Team runs: route, coordinate and collaborate, step order, a failure in the middle, an
//! empty team.

mod support;

use std::time::Duration;

use agentd::store::runs::{RunKind, request_run};
use serde_json::{Value, json};
use support::{InProcessWorker, TestDb, count, create_user, eventually};
use uuid::Uuid;

struct Team {
    db: TestDb,
    team: Uuid,
    _folder: tempfile::TempDir,
    overrides: Vec<(&'static str, String)>,
}

/// A team of `strategy` with members (name, description, category, instructions).
async fn team(strategy: &str, members: &[(&str, &str, &str, &str)]) -> Team {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let team: Uuid = sqlx::query_scalar(
        "INSERT INTO teams (name, type, user_id) VALUES ('Crew', $1, $2) RETURNING id",
    )
    .bind(strategy)
    .bind(user)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    for (position, (name, description, category, instructions)) in members.iter().enumerate() {
        let agent: Uuid = sqlx::query_scalar(
            "INSERT INTO agents (name, description, icon, category, instructions, user_id) \
             VALUES ($1, $2, 'bot', $3, $4, $5) RETURNING id",
        )
        .bind(name)
        .bind(description)
        .bind(category)
        .bind(instructions)
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO team_agents (team_id, agent_id, position) VALUES ($1, $2, $3)")
            .bind(team)
            .bind(agent)
            .bind(position as i32 + 1)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let folder = tempfile::tempdir().unwrap();
    let failing = folder.path().join("fail.sh");
    std::fs::write(&failing, "echo 'cannot do it' >&2\nexit 2\n").unwrap();
    let overrides = vec![
        (
            "AGENTD__ARTIFACTS__DIR",
            folder
                .path()
                .join("artifacts")
                .to_string_lossy()
                .to_string(),
        ),
        (
            "AGENTD__EXECUTION__BY_CATEGORY",
            r#"{ failing = "command" }"#.to_string(),
        ),
        (
            "AGENTD__EXECUTORS__COMMAND__PROGRAM",
            format!(r#"["sh", "{}"]"#, failing.display()),
        ),
    ];
    Team {
        db,
        team,
        _folder: folder,
        overrides,
    }
}

impl Team {
    async fn run(&self, input: Value) -> (String, Option<String>, Value, Vec<String>) {
        let overrides: Vec<(&str, &str)> = self
            .overrides
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let worker = InProcessWorker::start_configured(&self.db, "w1", &overrides).await;
        let run_id = request_run(&self.db.pool, RunKind::Team, self.team, Some(&input))
            .await
            .unwrap();
        eventually(Duration::from_secs(15), "the team run ends", || async {
            count(
                &self.db.pool,
                &format!("SELECT count(*) FROM runs WHERE id = '{run_id}' AND status <> 'running'"),
            )
            .await
                == 1
        })
        .await;
        worker.stop().await;
        let (status, error, output): (String, Option<String>, Option<Value>) = sqlx::query_as(
            "SELECT status, error, output FROM runs WHERE id = $1 AND type = 'team'",
        )
        .bind(run_id)
        .fetch_one(&self.db.pool)
        .await
        .unwrap();
        let logs = sqlx::query_scalar(
            "SELECT message FROM run_logs WHERE run_id = $1 ORDER BY timestamp, id",
        )
        .bind(run_id)
        .fetch_all(&self.db.pool)
        .await
        .unwrap();
        (status, error, output.unwrap_or(Value::Null), logs)
    }
}

fn step_names(output: &Value) -> Vec<String> {
    output["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| step["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn coordinate_runs_members_in_order_passing_outputs_along() {
    let team = team(
        "coordinate",
        &[
            (
                "Researcher",
                "finds facts",
                "research",
                "Research: {{input}}",
            ),
            ("Writer", "writes", "writing", "Write up: {{input}}"),
        ],
    )
    .await;
    let (status, error, output, logs) = team.run(json!("tides")).await;
    assert_eq!(status, "completed", "{error:?}");
    assert_eq!(step_names(&output), ["Researcher", "Writer"]);
    assert_eq!(output["steps"][0]["output"]["text"], "Research: tides");
    // The writer got the researcher's output as its input.
    let written = output["output"]["text"].as_str().unwrap();
    assert!(
        written.starts_with("Write up: {") && written.contains("Research: tides"),
        "{written}"
    );
    let starts: Vec<&String> = logs
        .iter()
        .filter(|line| line.contains(" starts"))
        .collect();
    assert_eq!(
        starts,
        [
            "step 1: Researcher (builtin) starts",
            "step 2: Writer (builtin) starts"
        ]
    );
    for step in output["steps"].as_array().unwrap() {
        assert_eq!(step["status"], "completed");
        assert!(step["duration_ms"].is_u64() && step["agent_id"].is_string());
    }
}

#[tokio::test]
async fn coordinate_stops_at_the_first_failure() {
    let team = team(
        "coordinate",
        &[
            ("First", "", "research", "one"),
            ("Breaker", "", "failing", "two"),
            ("Never", "", "writing", "three"),
        ],
    )
    .await;
    let (status, error, output, _) = team.run(json!("go")).await;
    assert_eq!(status, "failed");
    assert_eq!(
        error.as_deref(),
        Some("step 2 (Breaker) failed: the program exited with status 2: cannot do it")
    );
    assert_eq!(step_names(&output), ["First", "Breaker"]);
    assert_eq!(output["steps"][1]["status"], "failed");
}

#[tokio::test]
async fn collaborate_runs_everyone_on_the_same_input_and_combines_outputs() {
    let team = team(
        "collaborate",
        &[
            ("A", "", "x", "A sees {{input}}"),
            ("B", "", "y", "B sees {{input}}"),
            ("C", "", "z", "C sees {{input}}"),
        ],
    )
    .await;
    let (status, error, output, _) = team.run(json!("the sea")).await;
    assert_eq!(status, "completed", "{error:?}");
    assert_eq!(step_names(&output), ["A", "B", "C"]);
    let texts: Vec<&str> = output["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["output"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["A sees the sea", "B sees the sea", "C sees the sea"]
    );

    let team = self::team(
        "collaborate",
        &[("Good", "", "x", "fine"), ("Bad", "", "failing", "")],
    )
    .await;
    let (status, error, _, _) = team.run(json!("x")).await;
    assert_eq!(status, "failed");
    assert!(
        error
            .unwrap()
            .starts_with("1 of 2 members failed: Bad (the program exited with status 2")
    );
}

#[tokio::test]
async fn route_picks_the_best_suited_member_and_says_why() {
    let team = team(
        "route",
        &[
            (
                "Writer",
                "drafts blog posts",
                "writing",
                "I write about {{input}}",
            ),
            (
                "Analyst",
                "reads sales numbers and charts",
                "data",
                "I analyse {{input}}",
            ),
        ],
    )
    .await;
    let (status, error, output, logs) = team.run(json!("chart last month's sales numbers")).await;
    assert_eq!(status, "completed", "{error:?}");
    assert_eq!(output["chosen"]["name"], "Analyst");
    assert_eq!(
        output["chosen"]["reason"],
        "2 shared word(s): numbers, sales"
    );
    assert_eq!(step_names(&output), ["Analyst"]);
    assert!(
        logs.iter()
            .any(|line| line == "route: chose \"Analyst\" (2 shared word(s): numbers, sales)"),
        "{logs:?}"
    );
}

#[tokio::test]
async fn an_empty_team_fails_clearly() {
    let team = team("coordinate", &[]).await;
    let (status, error, _, _) = team.run(json!("x")).await;
    assert_eq!(status, "failed");
    assert_eq!(error.as_deref(), Some("team \"Crew\" has no members"));
}

/// A model endpoint that always answers `answer` (non-streaming), on loopback.
async fn routing_model(answer: &'static str) -> String {
    use axum::routing::post;
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        post(move || async move {
            axum::Json(
                json!({ "choices": [{ "message": { "role": "assistant", "content": answer } }] }),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{address}/v1")
}

#[tokio::test]
async fn route_asks_the_model_when_configured_and_falls_back_to_words() {
    for (answer, expected, reason_start) in [
        ("Writer", "Writer", "chosen by the model"),
        (
            "Nobody",
            "Analyst",
            "the model answered \"Nobody\", which names no member; by word overlap instead: 2 shared word(s)",
        ),
    ] {
        let mut team = team(
            "route",
            &[
                (
                    "Writer",
                    "drafts blog posts",
                    "writing",
                    "I write about {{input}}",
                ),
                (
                    "Analyst",
                    "reads sales numbers and charts",
                    "data",
                    "I analyse {{input}}",
                ),
            ],
        )
        .await;
        let base = routing_model(answer).await;
        team.overrides
            .push(("AGENTD__EXECUTION__TEAM_ROUTER", "openai".into()));
        team.overrides
            .push(("AGENTD__EXECUTORS__OPENAI__BASE_URL", base));
        let (status, error, output, _) = team.run(json!("chart last month's sales numbers")).await;
        assert_eq!(status, "completed", "{error:?}");
        assert_eq!(output["chosen"]["name"], expected);
        assert!(
            output["chosen"]["reason"]
                .as_str()
                .unwrap()
                .starts_with(reason_start),
            "{output}"
        );
    }
}

/// A team is one more executor: its run's `resource_usage` names the `team` executor and
/// adds up its members' figures, and each member runs under its own executor's timeout
/// (here the command executor's 1 s, not `executor.timeout`).
#[tokio::test]
async fn a_team_run_sums_its_members_usage_and_each_member_has_its_executors_timeout() {
    let crew = team(
        "collaborate",
        &[
            ("Slow", "sleeps", "program", "x"),
            ("Quick", "answers", "program", "x"),
        ],
    )
    .await;
    let script = crew._folder.path().join("member.sh");
    std::fs::write(
        &script,
        "input=$(cat)\ncase \"$input\" in *'\"name\":\"Slow\"'*) sleep 30;; *) echo quick;; esac\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        crew._folder.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut crew = crew;
    crew.overrides
        .retain(|(key, _)| !key.contains("COMMAND__PROGRAM") && !key.contains("BY_CATEGORY"));
    crew.overrides.push((
        "AGENTD__EXECUTORS__COMMAND__PROGRAM",
        format!(r#"["sh", "{}"]"#, script.display()),
    ));
    crew.overrides.push((
        "AGENTD__EXECUTION__BY_CATEGORY",
        r#"{ program = "command" }"#.to_string(),
    ));
    crew.overrides
        .push(("AGENTD__EXECUTORS__COMMAND__TIMEOUT", "1s".to_string()));
    let started = std::time::Instant::now();
    let (status, error, output, _) = crew.run(json!("go")).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the team waited {:?}",
        started.elapsed()
    );
    assert_eq!(status, "failed", "{output:#}");
    assert!(
        error
            .as_deref()
            .is_some_and(|error| error.contains("Slow (timed out: the member took longer than 1s)")),
        "{error:?}"
    );
    let usage: Value = sqlx::query_scalar("SELECT resource_usage FROM runs WHERE type = 'team'")
        .fetch_one(&crew.db.pool)
        .await
        .unwrap();
    assert_eq!(usage["executor"], "team", "{usage:#}");
    // The quick member's program ran and reported its CPU time; the team carries it.
    assert!(usage["cpu_ms"].is_number(), "{usage:#}");
    assert!(usage.get("exit_status").is_none(), "{usage:#}");
}

/// A team whose type is none of the strategies (an adopted schema without the seed's
/// check) fails its run with one clear line instead of running as some other strategy.
#[tokio::test]
async fn a_team_of_an_unknown_strategy_fails_clearly() {
    let crew = team("route", &[("Solo", "does it", "general", "hi")]).await;
    support::execute_script(
        &crew.db.pool,
        &format!(
            "ALTER TABLE teams DROP CONSTRAINT teams_type_check; \
             UPDATE teams SET type = 'swarm' WHERE id = '{}'",
            crew.team
        ),
    )
    .await;
    let (status, error, _, _) = crew.run(json!("go")).await;
    assert_eq!(status, "failed");
    assert_eq!(
        error.as_deref(),
        Some(
            "the team's type \"swarm\" is not a strategy (expected route, coordinate or collaborate)"
        )
    );
}
