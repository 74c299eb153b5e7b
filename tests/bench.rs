//! `agentd bench` end to end, at small sizes: every scenario runs against the real server
//! with real replica processes, the report carries its figures and the ceiling, the chart
//! is written, and no scratch database is left behind. (The figures themselves are for
//! docs/benchmarks.md, measured on a quiet machine; here only their presence and sense.)
//! One invocation runs them all: scratch databases are counted server-wide, so a second
//! bench running beside it would be counted too.

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
            "--conversations",
            "20",
            "--message-spread",
            "1s",
            "--waiting-runs",
            "50",
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
    // Every run held its slot for a while, never longer than the whole burst.
    let slot_p50 = number(&report, &["burst", "slot_p50_ms"]);
    let slot_p99 = number(&report, &["burst", "slot_p99_ms"]);
    assert!(0.0 < slot_p50 && slot_p50 <= slot_p99, "{report:#}");
    assert!(
        slot_p99 <= number(&report, &["burst", "all_completed_after_ms"]),
        "{report:#}"
    );

    defaults_figures_are_sane(&report);

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

    chat_figures_are_sane(&report);
    waiting_figures_are_sane(&report);

    let scale = report["scale"].as_array().unwrap();
    assert_eq!(scale.len(), 2);
    assert_eq!(scale[1]["schedules"], 3000);
    assert!(number(&scale[0], &["claim_ms_median"]) > 0.0);

    let autovacuum = report["machine"]["autovacuum"].as_str().unwrap_or_default();
    assert!(["on", "off"].contains(&autovacuum), "{report:#}");

    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 14, "{report:#}");

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

/// The `defaults` section of a run with 200 schedules due at one instant, 2 plain
/// replicas, the builtin executor doing its normal work.
fn defaults_figures_are_sane(report: &Value) {
    let defaults = &report["defaults"];
    // Every schedule fired once, and every run completed and stored its artifact.
    for field in ["schedules", "runs", "completed", "artifacts"] {
        assert_eq!(defaults[field], 200, "{field}: {report:#}");
    }
    let p50 = number(report, &["defaults", "lag_p50_ms"]);
    let p99 = number(report, &["defaults", "lag_p99_ms"]);
    let max = number(report, &["defaults", "lag_max_ms"]);
    assert!(0.0 <= p50 && p50 <= p99 && p99 <= max, "{report:#}");
    // The last run started after every lag and ended after it started.
    let started = number(report, &["defaults", "all_started_after_ms"]);
    let completed = number(report, &["defaults", "all_completed_after_ms"]);
    assert!(max <= started && started <= completed, "{report:#}");
    let slot_p50 = number(report, &["defaults", "slot_p50_ms"]);
    let slot_p99 = number(report, &["defaults", "slot_p99_ms"]);
    assert!(0.0 < slot_p50 && slot_p50 <= slot_p99, "{report:#}");
    let rss = defaults["replica_peak_rss_mib"].as_array().unwrap();
    assert_eq!(rss.len(), 2, "{report:#}");
    assert!(rss.iter().all(|mib| mib.as_f64().unwrap() > 1.0));
    let judged = report["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|target| target["scenario"] == "defaults")
        .count();
    assert_eq!(judged, 2, "{report:#}");
}

/// The `waiting` section of a run with 50 runs waiting at once per executor.
fn waiting_figures_are_sane(report: &Value) {
    assert_eq!(report["waiting"]["runs"], 50, "{report:#}");
    for executor in ["openai", "builtin"] {
        let figures = &report["waiting"][executor];
        assert_eq!(figures["runs_waiting"], 50, "{executor}: {report:#}");
        let idle = number(report, &["waiting", executor, "idle_rss_mib"]);
        let busy = number(report, &["waiting", executor, "waiting_rss_mib"]);
        let per_run = number(report, &["waiting", executor, "kib_per_waiting_run"]);
        assert!(1.0 < idle && idle < busy, "{executor}: {report:#}");
        assert!(
            per_run.is_finite() && per_run > 0.0,
            "{executor}: {report:#}"
        );
        // The growth per run, from the rounded figures: within their rounding (0.005 MiB
        // each, over 50 runs) of the reported one.
        let growth = (busy - idle) * 1024.0 / 50.0;
        assert!((growth - per_run).abs() <= 0.25, "{executor}: {report:#}");
    }
}

/// The `chat` section of a run with 20 conversations, 2 replicas and the model's default
/// pace (50 chunks, 100 ms apart: each reply streams for 5 s, over many stream intervals).
fn chat_figures_are_sane(report: &Value) {
    let chat = &report["chat"];
    // Every conversation answered once: one model call, turn and completed reply each.
    for field in [
        "conversations",
        "model_requests",
        "turns",
        "replies",
        "conversations_answered",
        "replies_completed",
        "start_lag_samples",
        "first_text_samples",
    ] {
        assert_eq!(chat[field], 20, "{field}: {report:#}");
    }
    assert_eq!(chat["chunks_per_reply"], 50, "{report:#}");

    // A lag is measured on the database's clock from the insert to the claim's start; a
    // claim that began a moment before the message's commit can read it, hence the small
    // allowance below zero.
    let p50 = number(report, &["chat", "start_lag_p50_ms"]);
    let p99 = number(report, &["chat", "start_lag_p99_ms"]);
    let max = number(report, &["chat", "start_lag_max_ms"]);
    assert!(-5.0 <= p50 && p50 <= p99 && p99 <= max, "{report:#}");
    assert!(max < 5_000.0, "{report:#}");

    // From the model's first chunk to the first look that saw text: the reply's first
    // write does not wait for the stream interval, and comes long before the answer's end.
    let p50 = number(report, &["chat", "first_text_p50_ms"]);
    let p99 = number(report, &["chat", "first_text_p99_ms"]);
    let max = number(report, &["chat", "first_text_max_ms"]);
    assert!(0.0 <= p50 && p50 <= p99 && p99 <= max, "{report:#}");
    assert!(max < 2_000.0, "{report:#}");

    // A reply is inserted, rewritten at most once per stream interval (200 ms) while the
    // 5 s of text stream, and written once more at its end.
    let writes = number(report, &["chat", "writes_per_reply"]);
    assert!((3.0..=52.0).contains(&writes), "{report:#}");
    let total = number(report, &["chat", "reply_row_writes"]);
    assert!((total / 20.0 - writes).abs() < 0.01, "{report:#}");

    let cpu = chat["replica_cpu_seconds"].as_array().unwrap();
    assert_eq!(cpu.len(), 2, "{report:#}");
    assert!(cpu.iter().all(|seconds| seconds.as_f64().unwrap() > 0.0));
    let rss = chat["replica_peak_rss_mib"].as_array().unwrap();
    assert!(rss.iter().all(|mib| mib.as_f64().unwrap() > 1.0));

    let targets = report["targets"].as_array().unwrap();
    let judged = targets
        .iter()
        .filter(|target| target["scenario"] == "chat")
        .count();
    assert_eq!(judged, 2, "{report:#}");
}

#[test]
fn chat_refuses_sizes_it_cannot_run() {
    for (option, value) in [("--conversations", "0"), ("--chunks", "0")] {
        let output = agentd()
            .args(["bench", "--scenario", "chat", option, value])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{option} {value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.starts_with(&format!("error: invalid value '0' for '{option} <")),
            "{stderr}"
        );
    }
}
