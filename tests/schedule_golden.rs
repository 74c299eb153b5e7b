//! Golden tables: slots worked out by hand from the tz database (the transitions as
//! `zdump -v` prints them from the system's tzdata), not by the code under test.
//!
//! 2025 transitions used below (local wall clock):
//! - America/New_York: Mar 9 02:00 EST → 03:00 EDT; Nov 2 02:00 EDT → 01:00 EST.
//! - Europe/London, Europe/Dublin: Mar 30 01:00 → 02:00; Oct 26 02:00 → 01:00 (Dublin's
//!   winter time is its "negative DST"; the offsets are London's).
//! - Australia/Lord_Howe (+10:30/+11): Apr 6 02:00 → 01:30; Oct 5 02:00 → 02:30.
//! - Antarctica/Troll (+00/+02): Mar 30 01:00 → 03:00; Oct 26 03:00 → 01:00.
//! - Pacific/Chatham (+12:45/+13:45): Apr 6 03:45 → 02:45; Sep 28 02:45 → 03:45.
//! - America/Santiago (-04/-03): Apr 5 24:00 → 23:00; Sep 7 00:00 → 01:00.
//! - Pacific/Apia, 2011: Dec 29 24:00 (-10) → Dec 31 00:00 (+14); December 30 did not exist.

use agentd::schedule::{Rule, ScheduleSpec};
use chrono::{DateTime, Utc};

struct Case<'a> {
    frequency: &'a str,
    interval: i32,
    time: Option<&'a str>,
    days: Option<&'a [i32]>,
    date: Option<i32>,
    zone: &'a str,
    created_at: &'a str,
    after: Option<&'a str>,
}

impl<'a> Case<'a> {
    fn new(frequency: &'a str, time: Option<&'a str>, zone: &'a str, created_at: &'a str) -> Self {
        Case {
            frequency,
            interval: 1,
            time,
            days: None,
            date: None,
            zone,
            created_at,
            after: None,
        }
    }
    fn interval(mut self, interval: i32) -> Self {
        self.interval = interval;
        self
    }
    fn days(mut self, days: &'a [i32]) -> Self {
        self.days = Some(days);
        self
    }
    fn date(mut self, date: i32) -> Self {
        self.date = Some(date);
        self
    }
    fn after(mut self, after: &'a str) -> Self {
        self.after = Some(after);
        self
    }

    fn rule(&self) -> Rule {
        let created_at: DateTime<Utc> = self.created_at.parse().unwrap();
        let spec = ScheduleSpec {
            frequency: self.frequency.into(),
            interval: self.interval,
            time: self.time.map(Into::into),
            days: self.days.map(<[i32]>::to_vec),
            date: self.date,
            timezone: self.zone.into(),
            created_at,
        };
        Rule::parse(&spec, created_at).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The first `expected.len()` slots after `after` (or created_at) must be `expected`.
    fn expect(self, expected: &[&str]) {
        let rule = self.rule();
        let mut cursor: DateTime<Utc> = self.after.unwrap_or(self.created_at).parse().unwrap();
        let mut got = Vec::new();
        for _ in expected {
            match rule.next_after(cursor) {
                Some(slot) => {
                    got.push(slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                    cursor = slot;
                }
                None => break,
            }
        }
        assert_eq!(
            got, expected,
            "{} {:?} in {}",
            self.frequency, self.time, self.zone
        );
        // Walking back: the latest slot at or before each slot is that slot, and just
        // before it is the previous one.
        let slots: Vec<DateTime<Utc>> = got.iter().map(|s| s.parse().unwrap()).collect();
        for (index, slot) in slots.iter().enumerate() {
            assert_eq!(
                rule.latest_at_or_before(*slot),
                Some(*slot),
                "latest at {slot}"
            );
            if index > 0 {
                let just_before = *slot - chrono::TimeDelta::seconds(1);
                assert_eq!(
                    rule.latest_at_or_before(just_before),
                    Some(slots[index - 1]),
                    "latest before {slot}"
                );
            }
        }
    }
}

#[test]
fn new_york_gap_and_overlap() {
    // 02:30 on the spring-forward day is read with EST: 07:30Z = 03:30 EDT.
    Case::new(
        "daily",
        Some("02:30"),
        "America/New_York",
        "2025-03-07T12:00:00Z",
    )
    .expect(&[
        "2025-03-08T07:30:00Z",
        "2025-03-09T07:30:00Z",
        "2025-03-10T06:30:00Z",
    ]);
    // 01:30 on the fall-back day fires once, at its first occurrence (EDT).
    Case::new(
        "daily",
        Some("01:30"),
        "America/New_York",
        "2025-10-31T12:00:00Z",
    )
    .expect(&[
        "2025-11-01T05:30:00Z",
        "2025-11-02T05:30:00Z",
        "2025-11-03T06:30:00Z",
    ]);
    Case::new(
        "once",
        Some("02:30"),
        "America/New_York",
        "2025-03-09T05:00:00Z",
    )
    .expect(&["2025-03-09T07:30:00Z"]);
}

#[test]
fn hourly_and_minutely_keep_real_time_spacing_across_both_transitions() {
    // Origin: 00:00 local of the anchor date (Mar 8, EST) = 05:00Z; a grid of real hours.
    Case::new("hourly", None, "America/New_York", "2025-03-09T04:00:00Z")
        .after("2025-03-09T05:30:00Z")
        .expect(&[
            "2025-03-09T06:00:00Z",
            "2025-03-09T07:00:00Z",
            "2025-03-09T08:00:00Z",
        ]);
    // Both 01:00s of the fall-back night are an hour apart in real time: both fire.
    Case::new("hourly", None, "America/New_York", "2025-11-01T12:00:00Z")
        .after("2025-11-02T04:30:00Z")
        .expect(&[
            "2025-11-02T05:00:00Z",
            "2025-11-02T06:00:00Z",
            "2025-11-02T07:00:00Z",
        ]);
    // Every 30 minutes from 00:15 EST (05:15Z on Mar 8).
    Case::new(
        "minutely",
        Some("00:15"),
        "America/New_York",
        "2025-03-08T12:00:00Z",
    )
    .interval(30)
    .after("2025-03-09T06:20:00Z")
    .expect(&[
        "2025-03-09T06:45:00Z",
        "2025-03-09T07:15:00Z",
        "2025-03-09T07:45:00Z",
    ]);
    // Troll's two-hour jump: local 00:00 then 03:00, one real hour apart.
    Case::new("hourly", None, "Antarctica/Troll", "2025-03-29T12:00:00Z")
        .after("2025-03-30T00:30:00Z")
        .expect(&[
            "2025-03-30T01:00:00Z",
            "2025-03-30T02:00:00Z",
            "2025-03-30T03:00:00Z",
        ]);
    // A weekday filter on a grid: only Sunday's minutes.
    Case::new("minutely", None, "UTC", "2025-01-03T23:58:00Z")
        .days(&[0])
        .expect(&[
            "2025-01-05T00:00:00Z",
            "2025-01-05T00:01:00Z",
            "2025-01-05T00:02:00Z",
        ]);
}

#[test]
fn london_and_dublin_negative_dst() {
    for zone in ["Europe/London", "Europe/Dublin"] {
        Case::new("daily", Some("01:30"), zone, "2025-03-28T12:00:00Z").expect(&[
            "2025-03-29T01:30:00Z",
            "2025-03-30T01:30:00Z",
            "2025-03-31T00:30:00Z",
        ]);
        Case::new("daily", Some("01:30"), zone, "2025-10-24T12:00:00Z").expect(&[
            "2025-10-25T00:30:00Z",
            "2025-10-26T00:30:00Z",
            "2025-10-27T01:30:00Z",
        ]);
    }
}

#[test]
fn lord_howe_thirty_minute_dst() {
    Case::new(
        "daily",
        Some("02:15"),
        "Australia/Lord_Howe",
        "2025-10-03T00:00:00Z",
    )
    .expect(&[
        "2025-10-03T15:45:00Z",
        "2025-10-04T15:45:00Z",
        "2025-10-05T15:15:00Z",
    ]);
    Case::new(
        "daily",
        Some("01:45"),
        "Australia/Lord_Howe",
        "2025-04-04T00:00:00Z",
    )
    .expect(&[
        "2025-04-04T14:45:00Z",
        "2025-04-05T14:45:00Z",
        "2025-04-06T15:15:00Z",
    ]);
}

#[test]
fn troll_two_hour_dst() {
    Case::new(
        "daily",
        Some("02:00"),
        "Antarctica/Troll",
        "2025-03-28T12:00:00Z",
    )
    .expect(&[
        "2025-03-29T02:00:00Z",
        "2025-03-30T02:00:00Z",
        "2025-03-31T00:00:00Z",
    ]);
    Case::new(
        "daily",
        Some("02:00"),
        "Antarctica/Troll",
        "2025-10-24T12:00:00Z",
    )
    .expect(&[
        "2025-10-25T00:00:00Z",
        "2025-10-26T00:00:00Z",
        "2025-10-27T02:00:00Z",
    ]);
}

#[test]
fn chatham_quarter_hour_offsets() {
    Case::new(
        "daily",
        Some("03:00"),
        "Pacific/Chatham",
        "2025-09-26T00:00:00Z",
    )
    .expect(&[
        "2025-09-26T14:15:00Z",
        "2025-09-27T14:15:00Z",
        "2025-09-28T13:15:00Z",
    ]);
    Case::new(
        "daily",
        Some("03:00"),
        "Pacific/Chatham",
        "2025-04-04T00:00:00Z",
    )
    .expect(&[
        "2025-04-04T13:15:00Z",
        "2025-04-05T13:15:00Z",
        "2025-04-06T14:15:00Z",
    ]);
}

#[test]
fn apia_skipped_the_thirtieth_of_december_2011() {
    // Noon on the 30th resolves onto noon of the 31st: one slot.
    Case::new(
        "daily",
        Some("12:00"),
        "Pacific/Apia",
        "2011-12-28T00:00:00Z",
    )
    .expect(&[
        "2011-12-28T22:00:00Z",
        "2011-12-29T22:00:00Z",
        "2011-12-30T22:00:00Z",
        "2011-12-31T22:00:00Z",
    ]);
    // Friday the 30th did not exist; its slot is Saturday noon's instant.
    Case::new(
        "weekly",
        Some("12:00"),
        "Pacific/Apia",
        "2011-12-20T00:00:00Z",
    )
    .days(&[5])
    .expect(&[
        "2011-12-23T22:00:00Z",
        "2011-12-30T22:00:00Z",
        "2012-01-05T22:00:00Z",
    ]);
}

#[test]
fn santiago_midnight_transitions() {
    Case::new(
        "daily",
        Some("00:30"),
        "America/Santiago",
        "2025-09-05T12:00:00Z",
    )
    .expect(&[
        "2025-09-06T04:30:00Z",
        "2025-09-07T04:30:00Z",
        "2025-09-08T03:30:00Z",
    ]);
    Case::new(
        "daily",
        Some("23:30"),
        "America/Santiago",
        "2025-04-04T12:00:00Z",
    )
    .expect(&[
        "2025-04-05T02:30:00Z",
        "2025-04-06T02:30:00Z",
        "2025-04-07T03:30:00Z",
    ]);
}

#[test]
fn monthly_days_29_30_31_and_from_the_end_across_february() {
    let utc = "UTC";
    Case::new("monthly", Some("10:00"), utc, "2024-01-15T00:00:00Z")
        .date(31)
        .expect(&[
            "2024-01-31T10:00:00Z",
            "2024-02-29T10:00:00Z",
            "2024-03-31T10:00:00Z",
            "2024-04-30T10:00:00Z",
        ]);
    Case::new("monthly", Some("10:00"), utc, "2025-01-15T00:00:00Z")
        .date(29)
        .expect(&[
            "2025-01-29T10:00:00Z",
            "2025-02-28T10:00:00Z",
            "2025-03-29T10:00:00Z",
        ]);
    Case::new("monthly", Some("10:00"), utc, "2024-01-15T00:00:00Z")
        .date(30)
        .expect(&[
            "2024-01-30T10:00:00Z",
            "2024-02-29T10:00:00Z",
            "2024-03-30T10:00:00Z",
        ]);
    Case::new("monthly", Some("10:00"), utc, "2023-01-15T00:00:00Z")
        .date(-1)
        .expect(&[
            "2023-01-31T10:00:00Z",
            "2023-02-28T10:00:00Z",
            "2023-03-31T10:00:00Z",
            "2023-04-30T10:00:00Z",
        ]);
    Case::new("monthly", Some("10:00"), utc, "2024-01-15T00:00:00Z")
        .date(-1)
        .expect(&["2024-01-31T10:00:00Z", "2024-02-29T10:00:00Z"]);
    // -31 is clamped to day 1 where the month is shorter.
    Case::new("monthly", Some("10:00"), utc, "2025-01-15T00:00:00Z")
        .date(-31)
        .expect(&[
            "2025-02-01T10:00:00Z",
            "2025-03-01T10:00:00Z",
            "2025-04-01T10:00:00Z",
        ]);
    // No date: the anchor's day (31), every second month, clamped.
    Case::new("monthly", Some("10:00"), utc, "2025-01-31T09:00:00Z")
        .interval(2)
        .expect(&[
            "2025-01-31T10:00:00Z",
            "2025-03-31T10:00:00Z",
            "2025-05-31T10:00:00Z",
            "2025-07-31T10:00:00Z",
        ]);
    Case::new("monthly", None, utc, "2023-11-30T00:00:00Z")
        .interval(3)
        .after("2023-11-01T00:00:00Z")
        .expect(&[
            "2023-11-30T00:00:00Z",
            "2024-02-29T00:00:00Z",
            "2024-05-30T00:00:00Z",
            "2024-08-30T00:00:00Z",
        ]);
}

#[test]
fn weekly_and_biweekly_anchored_weeks() {
    // The spec's example: weeks counted from the Monday of 1 January 2025's week.
    Case::new(
        "weekly",
        Some("09:30"),
        "Europe/Berlin",
        "2025-01-01T00:00:00Z",
    )
    .interval(2)
    .days(&[1, 3])
    .after("2025-03-01T00:00:00Z")
    .expect(&[
        "2025-03-10T08:30:00Z",
        "2025-03-12T08:30:00Z",
        "2025-03-24T08:30:00Z",
        "2025-03-26T08:30:00Z",
        "2025-04-07T07:30:00Z",
    ]);
    // No days: the anchor's weekday (a Wednesday).
    Case::new("weekly", Some("08:00"), "UTC", "2025-01-01T00:00:00Z").expect(&[
        "2025-01-01T08:00:00Z",
        "2025-01-08T08:00:00Z",
        "2025-01-15T08:00:00Z",
    ]);
    // 7 is Sunday too.
    Case::new("weekly", Some("08:00"), "UTC", "2025-01-01T00:00:00Z")
        .days(&[7])
        .interval(3)
        .expect(&[
            "2025-01-05T08:00:00Z",
            "2025-01-26T08:00:00Z",
            "2025-02-16T08:00:00Z",
        ]);
}

#[test]
fn daily_with_interval_and_weekday_filter() {
    Case::new("daily", Some("07:00"), "UTC", "2025-01-01T00:00:00Z")
        .interval(2)
        .days(&[1, 2, 3, 4, 5])
        .expect(&[
            "2025-01-01T07:00:00Z",
            "2025-01-03T07:00:00Z",
            "2025-01-07T07:00:00Z",
            "2025-01-09T07:00:00Z",
            "2025-01-13T07:00:00Z",
        ]);
    Case::new("daily", Some("9:05:30"), "UTC", "2025-01-01T00:00:00Z")
        .expect(&["2025-01-01T09:05:30Z", "2025-01-02T09:05:30Z"]);
}

#[test]
fn once_fires_once() {
    Case::new("once", Some("09:00"), "UTC", "2025-05-01T10:00:00Z")
        .expect(&["2025-05-02T09:00:00Z"]);
    let case = Case::new("once", Some("11:00"), "UTC", "2025-05-01T10:00:00Z");
    let rule = case.rule();
    let slot: DateTime<Utc> = "2025-05-01T11:00:00Z".parse().unwrap();
    assert_eq!(
        rule.next_after("2025-05-01T10:00:00Z".parse().unwrap()),
        Some(slot)
    );
    assert_eq!(rule.next_after(slot), None);
}

#[test]
fn cron_lists_ranges_steps_names_sunday_and_the_day_or_rule() {
    let cron = |expression: &'static str, created: &'static str| {
        Case::new("cron", Some(expression), "UTC", created)
    };
    cron("0 9 * * 1-5", "2025-01-03T10:00:00Z")
        .expect(&["2025-01-06T09:00:00Z", "2025-01-07T09:00:00Z"]);
    cron("5,35 */6 * * *", "2025-01-01T00:00:00Z").expect(&[
        "2025-01-01T00:05:00Z",
        "2025-01-01T00:35:00Z",
        "2025-01-01T06:05:00Z",
        "2025-01-01T06:35:00Z",
    ]);
    cron("0 12 * JAN,JUL SUN", "2025-01-01T00:00:00Z").expect(&[
        "2025-01-05T12:00:00Z",
        "2025-01-12T12:00:00Z",
        "2025-01-19T12:00:00Z",
        "2025-01-26T12:00:00Z",
        "2025-07-06T12:00:00Z",
    ]);
    cron("0 8 * * 7", "2025-01-01T00:00:00Z")
        .expect(&["2025-01-05T08:00:00Z", "2025-01-12T08:00:00Z"]);
    // The 13th or a Friday (Vixie cron's OR when both day fields are restricted).
    cron("0 0 13 * 5", "2025-06-01T00:00:00Z").expect(&[
        "2025-06-06T00:00:00Z",
        "2025-06-13T00:00:00Z",
        "2025-06-20T00:00:00Z",
        "2025-06-27T00:00:00Z",
        "2025-07-04T00:00:00Z",
        "2025-07-11T00:00:00Z",
        "2025-07-13T00:00:00Z",
    ]);
}

#[test]
fn cron_macros_and_seconds() {
    let cron = |expression: &'static str| {
        Case::new("cron", Some(expression), "UTC", "2025-01-01T00:30:00Z")
    };
    cron("@hourly").expect(&["2025-01-01T01:00:00Z", "2025-01-01T02:00:00Z"]);
    cron("@daily").expect(&["2025-01-02T00:00:00Z"]);
    cron("@midnight").expect(&["2025-01-02T00:00:00Z"]);
    cron("@weekly").expect(&["2025-01-05T00:00:00Z", "2025-01-12T00:00:00Z"]);
    cron("@monthly").expect(&["2025-02-01T00:00:00Z"]);
    cron("@yearly").expect(&["2026-01-01T00:00:00Z"]);
    cron("@annually").expect(&["2026-01-01T00:00:00Z"]);
    // A slot at created_at itself counts (no slot is *earlier* than created_at).
    Case::new(
        "cron",
        Some("*/20 * * * * *"),
        "UTC",
        "2025-01-01T00:00:00Z",
    )
    .after("2024-12-31T23:59:00Z")
    .expect(&[
        "2025-01-01T00:00:00Z",
        "2025-01-01T00:00:20Z",
        "2025-01-01T00:00:40Z",
        "2025-01-01T00:01:00Z",
    ]);
    Case::new("cron", Some("30 0 12 * * *"), "UTC", "2025-01-01T00:00:00Z")
        .expect(&["2025-01-01T12:00:30Z", "2025-01-02T12:00:30Z"]);
}

#[test]
fn cron_on_the_local_wall_clock_across_gaps_and_overlaps() {
    let ny = "America/New_York";
    Case::new("cron", Some("30 2 * * *"), ny, "2025-03-08T12:00:00Z")
        .expect(&["2025-03-09T07:30:00Z", "2025-03-10T06:30:00Z"]);
    // Created at 08:00 EDT on Nov 1, after that day's 01:30.
    Case::new("cron", Some("30 1 * * *"), ny, "2025-11-01T12:00:00Z").expect(&[
        "2025-11-02T05:30:00Z",
        "2025-11-03T06:30:00Z",
        "2025-11-04T06:30:00Z",
    ]);
    // Wall-clock matches in the repeated hour fire at their first occurrence only.
    Case::new("cron", Some("*/30 * * * *"), ny, "2025-10-01T00:00:00Z")
        .after("2025-11-02T04:45:00Z")
        .expect(&[
            "2025-11-02T05:00:00Z",
            "2025-11-02T05:30:00Z",
            "2025-11-02T07:00:00Z",
            "2025-11-02T07:30:00Z",
        ]);
    // Matches in the gap land on the same instants as the hour after it: one slot each.
    Case::new("cron", Some("*/30 * * * *"), ny, "2025-03-01T00:00:00Z")
        .after("2025-03-09T06:15:00Z")
        .expect(&[
            "2025-03-09T06:30:00Z",
            "2025-03-09T07:00:00Z",
            "2025-03-09T07:30:00Z",
            "2025-03-09T08:00:00Z",
        ]);
    Case::new("cron", Some("*/20 2 * * *"), ny, "2025-03-08T12:00:00Z").expect(&[
        "2025-03-09T07:00:00Z",
        "2025-03-09T07:20:00Z",
        "2025-03-09T07:40:00Z",
        "2025-03-10T06:00:00Z",
    ]);
}

/// Parses `spec` and returns the error line.
fn error_of(
    frequency: &str,
    interval: i32,
    time: Option<&str>,
    days: Option<Vec<i32>>,
    date: Option<i32>,
    zone: &str,
) -> String {
    let spec = ScheduleSpec {
        frequency: frequency.into(),
        interval,
        time: time.map(Into::into),
        days,
        date,
        timezone: zone.into(),
        created_at: "2025-01-01T00:00:00Z".parse().unwrap(),
    };
    Rule::parse(&spec, spec.created_at).unwrap_err().to_string()
}

#[test]
fn validation_errors_name_the_column_and_the_value() {
    assert_eq!(
        error_of("daily", 1, None, None, None, "Mars/Olympus"),
        r#"timezone: unknown time zone "Mars/Olympus""#
    );
    assert_eq!(
        error_of("cron", 1, Some("0 0 30 2 *"), None, None, "UTC"),
        r#"time: cron expression "0 0 30 2 *" never fires"#
    );
    assert!(
        error_of("Daily", 1, None, None, None, "UTC")
            .starts_with(r#"frequency: unknown frequency "Daily""#)
    );
    assert_eq!(
        error_of("daily", 0, None, None, None, "UTC"),
        "interval: 0 is outside 1…10000"
    );
    assert_eq!(
        error_of("hourly", 10001, None, None, None, "UTC"),
        "interval: 10001 is outside 1…10000"
    );
    assert_eq!(
        error_of("daily", 1, Some("25:00"), None, None, "UTC"),
        r#"time: "25:00" is not a time of day (HH:MM or HH:MM:SS, 24-hour)"#
    );
    assert_eq!(
        error_of("weekly", 1, None, Some(vec![1, 8]), None, "UTC"),
        "days: 8 is not a weekday (0 = Sunday … 6 = Saturday, 7 = Sunday)"
    );
    for date in [0, 32, -32] {
        assert_eq!(
            error_of("monthly", 1, None, None, Some(date), "UTC"),
            format!("date: {date} is not a day of the month (1…31, or -1…-31 from the end)")
        );
    }
    assert!(
        error_of("cron", 1, Some("* * * *"), None, None, "UTC")
            .starts_with(r#"time: cron expression "* * * *" is invalid: it has 4 fields"#)
    );
    assert!(
        error_of("cron", 1, Some("61 * * * *"), None, None, "UTC")
            .starts_with(r#"time: cron expression "61 * * * *" is invalid: "#)
    );
    assert!(error_of("cron", 1, Some("@sometimes"), None, None, "UTC").contains("unknown macro"));
    assert_eq!(
        error_of("cron", 1, None, None, None, "UTC"),
        "time: a cron schedule needs its expression in time, which is NULL"
    );
    // 2025-01-01 is a Wednesday: every 7th day from it is a Wednesday, never a Monday.
    assert_eq!(
        error_of("daily", 7, None, Some(vec![1]), None, "UTC"),
        "days: daily schedule never fires"
    );
    // Columns a frequency ignores do not make it invalid.
    let spec = ScheduleSpec {
        frequency: "cron".into(),
        interval: 0,
        time: Some("0 9 * * *".into()),
        days: Some(vec![42]),
        date: Some(99),
        timezone: "UTC".into(),
        created_at: "2025-01-01T00:00:00Z".parse().unwrap(),
    };
    assert!(Rule::parse(&spec, spec.created_at).is_ok());
}
