//! `agentd schedule preview`: the spec's flags, the JSON shape, the table, and exit status
//! 2 with one line for an invalid schedule.

mod support;

use support::agentd;

fn preview(args: &[&str]) -> std::process::Output {
    agentd()
        .args(["schedule", "preview"])
        .args(args)
        .output()
        .unwrap()
}

const SPEC_EXAMPLE: [&str; 16] = [
    "--frequency",
    "weekly",
    "--interval",
    "2",
    "--time",
    "09:30",
    "--days",
    "1,3",
    "--timezone",
    "Europe/Berlin",
    "--created-at",
    "2025-01-01T00:00:00Z",
    "--after",
    "2025-03-01T00:00:00Z",
    "--count",
    "5",
];

#[test]
fn json_output_is_one_array_of_utc_and_local() {
    let mut args = SPEC_EXAMPLE.to_vec();
    args.extend(["--format", "json"]);
    let output = preview(&args);
    assert!(output.status.success(), "{output:?}");
    let slots: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        slots,
        serde_json::json!([
            {"utc": "2025-03-10T08:30:00Z", "local": "2025-03-10T09:30:00+01:00"},
            {"utc": "2025-03-12T08:30:00Z", "local": "2025-03-12T09:30:00+01:00"},
            {"utc": "2025-03-24T08:30:00Z", "local": "2025-03-24T09:30:00+01:00"},
            {"utc": "2025-03-26T08:30:00Z", "local": "2025-03-26T09:30:00+01:00"},
            {"utc": "2025-04-07T07:30:00Z", "local": "2025-04-07T09:30:00+02:00"},
        ])
    );
}

#[test]
fn the_default_table_shows_utc_and_local_time_with_offset() {
    let output = preview(&SPEC_EXAMPLE);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert!(
        lines[0].starts_with("UTC") && lines[0].contains("LOCAL"),
        "{text}"
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        [
            "2025-03-10T08:30:00Z",
            "2025-03-10T09:30:00+01:00",
            "Europe/Berlin"
        ]
    );
    assert_eq!(
        lines[5].split_whitespace().collect::<Vec<_>>(),
        [
            "2025-04-07T07:30:00Z",
            "2025-04-07T09:30:00+02:00",
            "Europe/Berlin"
        ]
    );
}

#[test]
fn cron_flag_and_defaults() {
    // --cron stands for --frequency cron; --after defaults to --created-at.
    let output = preview(&[
        "--cron",
        "0 9 * * 1-5",
        "--created-at",
        "2025-01-03T10:00:00Z",
        "--count",
        "2",
        "--format",
        "json",
    ]);
    assert!(output.status.success(), "{output:?}");
    let slots: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(slots[0]["utc"], "2025-01-06T09:00:00Z");
    assert_eq!(slots[1]["utc"], "2025-01-07T09:00:00Z");
    // --created-at defaults to now: the slots are in the future.
    let output = preview(&["--frequency", "hourly", "--count", "1", "--format", "json"]);
    let slots: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let first: chrono::DateTime<chrono::Utc> = slots[0]["utc"].as_str().unwrap().parse().unwrap();
    assert!(first > chrono::Utc::now() - chrono::TimeDelta::seconds(5));
}

#[test]
fn invalid_schedules_exit_2_with_the_one_line_error() {
    let cases: [(&[&str], &str); 8] = [
        (
            &["--timezone", "Mars/Olympus"],
            r#"timezone: unknown time zone "Mars/Olympus""#,
        ),
        (
            &["--cron", "0 0 30 2 *"],
            r#"time: cron expression "0 0 30 2 *" never fires"#,
        ),
        (
            &["--frequency", "fortnightly"],
            r#"frequency: unknown frequency "fortnightly""#,
        ),
        (&["--interval", "0"], "interval: 0 is outside 1…10000"),
        (
            &["--time", "24:00"],
            r#"time: "24:00" is not a time of day"#,
        ),
        (
            &["--frequency", "weekly", "--days", "1,9"],
            "days: 9 is not a weekday",
        ),
        (
            &["--frequency", "monthly", "--date", "0"],
            "date: 0 is not a day of the month",
        ),
        (
            &["--created-at", "yesterday"],
            r#"created-at: "yesterday" is not an RFC 3339 instant"#,
        ),
    ];
    for (args, expected) in cases {
        let output = preview(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with(expected), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty());
    }
}
