//! How fast the schedule engine answers `next_after` (the claim calls it for every fired
//! schedule) and how fast it rejects a rule that never fires.
//!
//! Run: `cargo bench --bench next_after`. Figures: docs/benchmarks.md.

use std::hint::black_box;

use agentd::schedule::{Rule, ScheduleSpec};
use chrono::{DateTime, TimeDelta, Utc};
use criterion::{Criterion, criterion_group, criterion_main};

fn spec(frequency: &str, time: &str, days: Option<Vec<i32>>, zone: &str) -> ScheduleSpec {
    ScheduleSpec {
        frequency: frequency.into(),
        interval: 1,
        time: Some(time.into()),
        days,
        date: None,
        timezone: zone.into(),
        created_at: "2024-01-01T00:00:00Z".parse().unwrap(),
    }
}

fn next_after(c: &mut Criterion) {
    let now: DateTime<Utc> = "2025-06-15T10:17:23Z".parse().unwrap();
    let cases = [
        ("daily", spec("daily", "09:30", None, "Europe/Berlin")),
        (
            "daily_weekdays",
            spec(
                "daily",
                "09:30",
                Some(vec![1, 2, 3, 4, 5]),
                "America/New_York",
            ),
        ),
        (
            "weekly",
            spec("weekly", "09:30", Some(vec![1, 3]), "Europe/Berlin"),
        ),
        (
            "monthly",
            spec("monthly", "09:30", None, "Australia/Lord_Howe"),
        ),
        ("hourly", spec("hourly", "00:15", None, "America/New_York")),
        (
            "minutely",
            spec("minutely", "00:00", Some(vec![1, 2, 3, 4, 5]), "UTC"),
        ),
        (
            "cron_weekdays_9am",
            spec("cron", "0 9 * * 1-5", None, "America/New_York"),
        ),
        (
            "cron_every_15_min",
            spec("cron", "*/15 * * * *", None, "Europe/London"),
        ),
        ("cron_seconds", spec("cron", "*/10 * * * * *", None, "UTC")),
        ("cron_yearly", spec("cron", "0 0 29 2 *", None, "UTC")),
    ];
    let mut group = c.benchmark_group("next_after");
    for (name, spec) in &cases {
        let rule = Rule::parse(spec, now).unwrap();
        group.bench_function(*name, |b| b.iter(|| rule.next_after(black_box(now))));
    }
    // Near a transition the cron search takes its exact path.
    let cron = Rule::parse(&spec("cron", "*/15 * * * *", None, "America/New_York"), now).unwrap();
    let before_gap: DateTime<Utc> = "2025-03-09T06:50:00Z".parse().unwrap();
    group.bench_function("cron_every_15_min_at_dst_gap", |b| {
        b.iter(|| cron.next_after(black_box(before_gap)))
    });
    group.finish();

    let mut group = c.benchmark_group("parse");
    let never = spec("cron", "0 0 30 2 *", None, "UTC");
    group.bench_function("cron_never_fires", |b| {
        b.iter(|| Rule::parse(black_box(&never), now).is_err())
    });
    let daily = spec("daily", "09:30", None, "Europe/Berlin");
    group.bench_function("daily", |b| {
        b.iter(|| Rule::parse(black_box(&daily), now).is_ok())
    });
    group.finish();

    // A week of a minutely schedule's slots, as a claim after a long outage counts them.
    let minutely = Rule::parse(&spec("minutely", "00:00", None, "UTC"), now).unwrap();
    c.bench_function("slots_between_minutely_one_day", |b| {
        b.iter(|| {
            minutely
                .slots_between(black_box(now), now + TimeDelta::days(1), 10_000)
                .len()
        })
    });
}

criterion_group!(benches, next_after);
criterion_main!(benches);
