//! `agentd bench` end to end, at small sizes: every scenario runs against the real server
//! with real replica processes, the report carries its figures and the ceiling, the chart
//! is written, and no scratch database is left behind. (The figures themselves are for
//! docs/benchmarks.md, measured on a quiet machine; here only their presence and sense.)

mod support;

use serde_json::Value;
use support::{TestDb, agentd, count};

fn number(report: &Value, path: &[&str]) -> f64 {
    let mut value = report;
    for key in path {
        value = &value[*key];
    }
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {report:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_scenario_runs_small_and_reports_its_figures() {
    let db = TestDb::new().await;
    let folder = tempfile::tempdir().unwrap();
    let chart = folder.path().join("lag.svg");
    let output = agentd()
        .args([
            "bench",
            "--scenario",
            "all",
            "--replicas",
            "2",
            "--concurrency",
            "100",
            "--schedules",
            "200",
            "--fires-per-second",
            "20",
            "--duration",
            "3s",
            "--backlog",
            "300",
            "--runs",
            "3",
            "--lines",
            "300",
            "--idle-schedules",
            "1000",
            "--idle-window",
            "3s",
            "--scale-sizes",
            "1000,3000",
            "--format",
            "json",
            "--svg",
        ])
        .arg(&chart)
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));

    assert_eq!(report["burst"]["completed"], 200, "{report:#}");
    let p50 = number(&report, &["burst", "lag_p50_ms"]);
    let p99 = number(&report, &["burst", "lag_p99_ms"]);
    assert!(0.0 <= p50 && p50 <= p99, "{report:#}");
    assert!(number(&report, &["burst", "all_completed_after_ms"]) >= p99);

    // 20 fires a second for 3 s: about 60 (the window's edges may move one slot group).
    let fired = number(&report, &["steady", "fired"]);
    assert!((40.0..=80.0).contains(&fired), "{report:#}");

    assert_eq!(report["throughput"]["completed"], 300, "{report:#}");
    assert!(number(&report, &["throughput", "runs_per_second"]) > 0.0);
    assert!(number(&report, &["throughput", "ceiling_runs_per_second"]) > 0.0);
    assert!(number(&report, &["throughput", "ratio"]) > 0.0);

    assert_eq!(report["logs"]["lines_stored"], 900, "{report:#}");
    assert!(number(&report, &["logs", "visibility_samples"]) >= 1.0);
    assert!(number(&report, &["logs", "ceiling_lines_per_second"]) > 0.0);
    assert!(number(&report, &["logs", "ratio"]) > 0.0);

    // Counted from the replica's own statement log (start-up's must have been found there),
    // 3 s of a 60 s poll interval: at most the one look.
    let statements = number(&report, &["idle", "statements"]);
    assert!(statements <= 1.0, "{report:#}");
    assert_eq!(
        number(&report, &["idle", "queries_per_minute"]),
        statements * 20.0
    );
    assert!(number(&report, &["idle", "server_transactions"]) >= statements);
    assert!(number(&report, &["idle", "rss_mib"]) > 1.0);

    let scale = report["scale"].as_array().unwrap();
    assert_eq!(scale.len(), 2);
    assert_eq!(scale[1]["schedules"], 3000);
    assert!(number(&scale[0], &["claim_ms_median"]) > 0.0);

    let autovacuum = report["machine"]["autovacuum"].as_str().unwrap_or_default();
    assert!(["on", "off"].contains(&autovacuum), "{report:#}");

    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 10, "{report:#}");

    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("burst") && svg.contains("<polyline"));

    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'agentd_bench_%'"
        )
        .await,
        0,
        "scratch databases left behind"
    );
}
