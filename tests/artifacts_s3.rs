//! Artifacts in an S3-compatible bucket (`--features s3`), against a real S3 API server on
//! 127.0.0.1: moto's server, from PyPI (`.ci/run` installs it into target/moto-venv; set
//! MOTO_SERVER to another `moto_server` executable).
#![cfg(feature = "s3")]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentd::store::runs::{RunKind, request_run};
use support::{InProcessWorker, TestDb, count, create_agent, create_user, eventually};

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts moto's S3 server on a free port; fails loudly if it is not installed.
async fn moto() -> (Moto, String) {
    let program = std::env::var("MOTO_SERVER").unwrap_or_else(|_| {
        format!(
            "{}/../moto-venv/bin/moto_server",
            env!("CARGO_TARGET_TMPDIR")
        )
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Moto(
        Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {program} (run .ci/run or set MOTO_SERVER): {e}")
            }),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if client
            .put(format!("{endpoint}/artifacts"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return (child, endpoint);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("moto's server did not answer on {endpoint}");
}

#[tokio::test]
async fn artifacts_go_to_the_bucket_with_s3_urls() {
    let (_moto, endpoint) = moto().await;
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let worker = InProcessWorker::start_configured(
        &db,
        "w1",
        &[
            ("AGENTD__ARTIFACTS__URL", "s3://artifacts/runs"),
            ("AWS_ENDPOINT_URL", &endpoint),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ],
    )
    .await;
    let run_id = request_run(&db.pool, RunKind::Agent, agent, None)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the run completes", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE id = '{run_id}' AND status = 'completed'"),
        )
        .await
            == 1
    })
    .await;
    worker.stop().await;
    let (name, url, size): (String, String, i32) =
        sqlx::query_as("SELECT name, url, size FROM run_artifacts WHERE run_id = $1")
            .bind(run_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(name, "result.md");
    assert_eq!(url, format!("s3://artifacts/runs/{run_id}/result.md"));
    // The object is really there, with the recorded size.
    use object_store::ObjectStoreExt;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("artifacts")
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_region("us-east-1")
        .build()
        .unwrap();
    let location = object_store::path::Path::parse(format!("runs/{run_id}/result.md")).unwrap();
    let body = store.get(&location).await.unwrap().bytes().await.unwrap();
    assert_eq!(body.len() as i32, size);
    assert!(body.starts_with(b"# Test agent"));
}

#[tokio::test]
async fn a_file_larger_than_one_upload_part_is_streamed_to_the_bucket() {
    let (_moto, endpoint) = moto().await;
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    // Over two parts of agentd's multipart upload.
    let size = 12 * 1024 * 1024;
    let program = serde_json::to_string(&[
        "sh",
        "-c",
        &format!("yes 0123456789abcde | head -c {size} > \"$AGENTD_ARTIFACTS_DIR/big.txt\""),
    ])
    .unwrap();
    let worker = InProcessWorker::start_configured(
        &db,
        "w1",
        &[
            ("AGENTD__EXECUTION__DEFAULT", "command"),
            ("AGENTD__EXECUTORS__COMMAND__PROGRAM", &program),
            ("AGENTD__ARTIFACTS__MAX_BYTES", "20971520"),
            ("AGENTD__ARTIFACTS__URL", "s3://artifacts/runs"),
            ("AWS_ENDPOINT_URL", &endpoint),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ],
    )
    .await;
    let run_id = request_run(&db.pool, RunKind::Agent, agent, None)
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the run completes", || async {
        count(
            &db.pool,
            &format!("SELECT count(*) FROM runs WHERE id = '{run_id}' AND status = 'completed'"),
        )
        .await
            == 1
    })
    .await;
    worker.stop().await;
    let (url, recorded): (String, i32) =
        sqlx::query_as("SELECT url, size FROM run_artifacts WHERE run_id = $1")
            .bind(run_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(url, format!("s3://artifacts/runs/{run_id}/big.txt"));
    assert_eq!(recorded, size as i32);
    use object_store::ObjectStoreExt;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("artifacts")
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_region("us-east-1")
        .build()
        .unwrap();
    let location = object_store::path::Path::parse(format!("runs/{run_id}/big.txt")).unwrap();
    let body = store.get(&location).await.unwrap().bytes().await.unwrap();
    let expected: Vec<u8> = b"0123456789abcde\n"
        .iter()
        .copied()
        .cycle()
        .take(size)
        .collect();
    assert!(body == expected, "the object differs from the file");
}

/// A bucket whose client cannot be built (here: an `AWS_ALLOW_HTTP` that is not a boolean)
/// stops `agentd run` at start-up with exit 2 and a line naming `artifacts.url`, before it
/// connects to the database, instead of refusing every artifact later.
#[test]
fn a_bucket_client_that_cannot_be_built_stops_start_up() {
    let output = support::agentd()
        .arg("run")
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("AGENTD__ARTIFACTS__URL", "s3://artifacts/runs")
        .env("AWS_ALLOW_HTTP", "maybe")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .find(|line| line.starts_with("artifacts.url:"))
        .unwrap_or_else(|| panic!("no line naming artifacts.url: {stderr}"));
    assert!(line.contains("artifacts cannot be stored"), "{line}");
    assert!(!stderr.contains("connecting to the database"), "{stderr}");
}
