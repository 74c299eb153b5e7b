//! `agentd trigger` and `agentd cancel` against a running replica.

mod support;

use std::time::Duration;

use support::{TestDb, agentd, create_agent, create_user, eventually, replica};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn trigger_wait_follows_the_run_and_cancel_stops_one() {
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let mut worker = replica(
        &db.url,
        "r1",
        &[("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "300ms")],
    );
    worker.wait_for("worker started", Duration::from_secs(20));

    let url = db.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        agentd()
            .args([
                "trigger",
                "agent",
                &agent.to_string(),
                "--input",
                r#"{"topic":"tides"}"#,
                "--wait",
            ])
            .env("DATABASE_URL", url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    let mut lines = stdout.lines();
    let run_id: Uuid = lines.next().unwrap().parse().unwrap();
    let rest: Vec<&str> = lines.collect();
    assert!(
        rest.iter()
            .any(|l| l.ends_with(" info starting Test agent")),
        "{stdout}"
    );
    assert!(
        rest.iter()
            .any(|l| l.ends_with(" info finished Test agent")),
        "{stdout}"
    );
    assert_eq!(
        rest.last().copied(),
        Some(format!("run {run_id} completed").as_str())
    );

    // A long run, cancelled from the command line.
    let run_id: Uuid = {
        let output = agentd()
            .args(["trigger", "team", &Uuid::nil().to_string()])
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(1),
            "an unknown team is refused: {output:?}"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr
                .lines()
                .last()
                .unwrap()
                .contains("request_run: no team 00000000-0000-0000-0000-000000000000 that you own"),
            "{stderr}"
        );

        let mut slow = replica(
            &db.url,
            "slow",
            &[("AGENTD__EXECUTORS__BUILTIN__STEP_DELAY", "30s")],
        );
        slow.wait_for("worker started", Duration::from_secs(20));
        worker.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(worker.wait_exit(Duration::from_secs(20)).success());
        let output = agentd()
            .args(["trigger", "agent", &agent.to_string()])
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let run_id: Uuid = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap();
        eventually(Duration::from_secs(5), "the run is running", || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM runs WHERE id = $1 AND status = 'running'",
            )
            .bind(run_id)
            .fetch_one(&db.pool)
            .await
            .unwrap()
                == 1
        })
        .await;
        let output = agentd()
            .args(["cancel", &run_id.to_string()])
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            format!("cancellation of run {run_id} requested")
        );
        eventually(Duration::from_secs(3), "the run failed as cancelled", || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM runs WHERE id = $1 AND status = 'failed' AND error = 'cancelled'")
                .bind(run_id)
                .fetch_one(&db.pool)
                .await
                .unwrap()
                == 1
        })
        .await;
        slow.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(slow.wait_exit(Duration::from_secs(20)).success());
        run_id
    };

    // Cancelling it again: nothing to cancel, exit 1 with one line.
    let output = agentd()
        .args(["cancel", &run_id.to_string()])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("is not running or queued: nothing to cancel")
    );
}

#[test]
fn trigger_rejects_bad_input_before_connecting() {
    let output = agentd()
        .args([
            "trigger",
            "agent",
            &Uuid::nil().to_string(),
            "--input",
            "{not json",
        ])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("--input: not valid JSON: "), "{stderr}");
    let output = agentd().args(["trigger", "robot", "x"]).output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(2),
        "clap refuses unknown targets"
    );
}
