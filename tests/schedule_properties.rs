//! Property tests of the schedule engine over random rules, zones and instants, checked
//! against a brute-force oracle that decides slot by slot, without any search.

use std::collections::BTreeSet;

use agentd::schedule::{Rule, ScheduleSpec, plan_firing, plan_firing_by_definition, resolve};
use chrono::{
    DateTime, Datelike, Months, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Utc,
};
use chrono_tz::Tz;
use proptest::prelude::*;

const ZONES: [&str; 12] = [
    "UTC",
    "America/New_York",
    "Europe/London",
    "Europe/Dublin",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Antarctica/Troll",
    "Pacific/Chatham",
    "Pacific/Apia",
    "America/Santiago",
    "Asia/Kolkata",
    "America/St_Johns",
];

/// A random schedule row, kept to minute-resolution times so the oracle can enumerate.
#[derive(Debug, Clone)]
struct Row {
    frequency: &'static str,
    interval: i32,
    time: Option<String>,
    days: Option<Vec<i32>>,
    date: Option<i32>,
    zone: &'static str,
    created_at: DateTime<Utc>,
}

impl Row {
    fn spec(&self) -> ScheduleSpec {
        ScheduleSpec {
            frequency: self.frequency.into(),
            interval: self.interval,
            time: self.time.clone(),
            days: self.days.clone(),
            date: self.date,
            timezone: self.zone.into(),
            created_at: self.created_at,
        }
    }
}

/// Instants near DST transitions (March, April, September, October, November of
/// 2010…2030, and Samoa's December 2011) or anywhere.
fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    let months = prop::sample::select(vec![3u32, 4, 9, 10, 11, 12, 1, 6]);
    (2010i32..2030, months, 1u32..29, 0i64..86_400).prop_map(|(year, month, day, second)| {
        let year = if month == 12 && day > 20 { 2011 } else { year };
        Utc.from_utc_datetime(
            &NaiveDate::from_ymd_opt(year, month, day)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap(),
        ) + TimeDelta::seconds(second)
    })
}

/// The instants in `year` at which `zone` changes its offset (found by probing days and
/// bisecting to the second), independent of the engine.
fn transitions(zone: Tz, year: i32) -> Vec<DateTime<Utc>> {
    use chrono::Offset;
    let offset = |t: DateTime<Utc>| zone.offset_from_utc_datetime(&t.naive_utc()).fix();
    let mut found = Vec::new();
    let mut day = Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).unwrap();
    let end = Utc.with_ymd_and_hms(year + 1, 1, 1, 0, 0, 0).unwrap();
    while day < end {
        let next = day + TimeDelta::days(1);
        if offset(day) != offset(next) {
            let (mut low, mut high) = (day, next);
            while high - low > TimeDelta::seconds(1) {
                let middle = low + (high - low) / 2;
                if offset(middle) == offset(low) {
                    low = middle
                } else {
                    high = middle
                }
            }
            found.push(high);
        }
        day = next;
    }
    found
}

/// Zones with instants near one of their transitions (or anywhere, for zones without).
fn zone_and_instant() -> impl Strategy<Value = (&'static str, DateTime<Utc>)> {
    (
        prop::sample::select(ZONES.to_vec()),
        2010i32..2030,
        0usize..4,
        -2160i64..2160,
        instant(),
    )
        .prop_map(|(zone, year, which, minutes, anywhere)| {
            let tz: Tz = zone.parse().unwrap();
            let year = if zone == "Pacific/Apia" && which == 3 {
                2011
            } else {
                year
            };
            let near = transitions(tz, year);
            let instant = match near.get(which % near.len().max(1)) {
                Some(transition) if which < 3 || zone == "Pacific/Apia" => {
                    *transition + TimeDelta::minutes(minutes)
                }
                _ => anywhere,
            };
            // Whole seconds, as created_at usually is not: keep some fraction too.
            (zone, instant)
        })
}

fn row() -> impl Strategy<Value = Row> {
    let frequency = prop::sample::select(vec![
        "once", "minutely", "hourly", "daily", "weekly", "monthly", "cron",
    ]);
    let cron = prop::sample::select(vec![
        "*/15 * * * *",
        "30 1,2,3 * * *",
        "0 */2 * * *",
        "45 2 * * 0",
        "0 0 13 * 5",
        "5 0-4 * * 1-5",
        "0 12 * * *",
        "*/20 23,0,1 * * *",
    ]);
    (
        frequency,
        1i32..4,
        (0u32..24, prop::sample::select(vec![0u32, 15, 30, 45])),
        prop::option::of(prop::collection::vec(0i32..8, 1..4)),
        prop::option::of(prop::sample::select(vec![
            1, 15, 28, 29, 30, 31, -1, -2, -31,
        ])),
        zone_and_instant(),
        cron,
    )
        .prop_map(
            |(frequency, interval, (hour, minute), days, date, (zone, created_at), cron)| {
                // Grids get small periods so a window holds several slots.
                let interval = match frequency {
                    "minutely" => interval * 20,
                    _ => interval,
                };
                Row {
                    frequency,
                    interval,
                    time: Some(if frequency == "cron" {
                        cron.to_string()
                    } else {
                        format!("{hour:02}:{minute:02}")
                    }),
                    days,
                    date,
                    zone,
                    created_at,
                }
            },
        )
}

/// Every slot of `row` in `[from, to]`, decided one candidate at a time.
fn oracle(row: &Row, from: DateTime<Utc>, to: DateTime<Utc>) -> BTreeSet<DateTime<Utc>> {
    let zone: Tz = row.zone.parse().unwrap();
    let local = |t: DateTime<Utc>| t.with_timezone(&zone).naive_local();
    let anchor = local(row.created_at).date();
    let days: Option<BTreeSet<u32>> = row
        .days
        .as_ref()
        .filter(|d| !d.is_empty())
        .map(|d| d.iter().map(|x| (*x % 7) as u32).collect());
    let day_ok = |date: NaiveDate| {
        days.as_ref()
            .is_none_or(|set| set.contains(&date.weekday().num_days_from_sunday()))
    };
    let time = row
        .time
        .as_deref()
        .and_then(|t| NaiveTime::parse_from_str(t, "%H:%M").ok())
        .unwrap_or(NaiveTime::MIN);
    let mut slots = BTreeSet::new();
    let mut keep = |slot: Option<DateTime<Utc>>| {
        if let Some(slot) = slot
            && slot >= row.created_at
            && slot >= from
            && slot <= to
        {
            slots.insert(slot);
        }
    };
    match row.frequency {
        "minutely" | "hourly" => {
            let unit = if row.frequency == "hourly" { 3600 } else { 60 };
            let period = i64::from(row.interval) * unit;
            let origin = resolve(anchor.and_time(time), zone).unwrap();
            let mut t = Utc
                .timestamp_opt(from.timestamp() - from.timestamp().rem_euclid(60), 0)
                .unwrap();
            while t <= to {
                if (t - origin).num_seconds().rem_euclid(period) == 0 && day_ok(local(t).date()) {
                    keep(Some(t));
                }
                t += TimeDelta::minutes(1);
            }
        }
        _ => {
            // Every local minute of the dates around the window.
            let first = local(from).date() - TimeDelta::days(2);
            let last = local(to).date() + TimeDelta::days(2);
            let cron = (row.frequency == "cron")
                .then(|| croner::Cron::from_str(row.time.as_deref().unwrap()).unwrap());
            let mut date = first;
            while date <= last {
                let matches: Vec<NaiveDateTime> = match row.frequency {
                    "cron" => (0..1440)
                        .map(|m| date.and_time(NaiveTime::MIN) + TimeDelta::minutes(m))
                        .filter(|l| cron.as_ref().unwrap().is_time_matching(l).unwrap())
                        .collect(),
                    "once" => {
                        let first_slot = resolve(anchor.and_time(time), zone).unwrap();
                        let once_date = if first_slot >= row.created_at {
                            anchor
                        } else {
                            anchor.succ_opt().unwrap()
                        };
                        if date == once_date {
                            vec![date.and_time(time)]
                        } else {
                            vec![]
                        }
                    }
                    "daily" => {
                        let n = i64::from(row.interval);
                        if (date - anchor).num_days().rem_euclid(n) == 0 && day_ok(date) {
                            vec![date.and_time(time)]
                        } else {
                            vec![]
                        }
                    }
                    "weekly" => {
                        let monday = |d: NaiveDate| {
                            d - TimeDelta::days(i64::from(d.weekday().num_days_from_monday()))
                        };
                        let week = (monday(date) - monday(anchor)).num_days() / 7;
                        let weekday_ok = match &days {
                            Some(_) => day_ok(date),
                            None => date.weekday() == anchor.weekday(),
                        };
                        if week.rem_euclid(i64::from(row.interval)) == 0 && weekday_ok {
                            vec![date.and_time(time)]
                        } else {
                            vec![]
                        }
                    }
                    _ => {
                        let months = (date.year() * 12 + date.month0() as i32)
                            - (anchor.year() * 12 + anchor.month0() as i32);
                        let month_start = date.with_day(1).unwrap();
                        let length = (month_start + Months::new(1) - month_start).num_days() as i32;
                        let wanted = row.date.unwrap_or(anchor.day() as i32);
                        let day = if wanted > 0 {
                            wanted.min(length)
                        } else {
                            (length + 1 + wanted).max(1)
                        };
                        if months.rem_euclid(row.interval) == 0 && date.day() as i32 == day {
                            vec![date.and_time(time)]
                        } else {
                            vec![]
                        }
                    }
                };
                for wall in matches {
                    keep(resolve(wall, zone));
                }
                date = date.succ_opt().unwrap();
            }
        }
    }
    slots
}

use std::str::FromStr as _;

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    /// next_after agrees with the oracle on a three-day window: it is the first slot after t,
    /// strictly later, with no slot in between; latest_at_or_before likewise.
    #[test]
    fn next_after_and_latest_match_the_oracle(row in row(), offset_minutes in 0i64..1440, seconds in 0i64..60) {
        let Ok(rule) = Rule::parse(&row.spec(), row.created_at) else {
            // Only rules that never fire are rejected here; the oracle must agree on the window.
            let slots = oracle(&row, row.created_at, row.created_at + TimeDelta::days(2));
            prop_assert!(slots.is_empty(), "rejected a rule with slots: {row:?}");
            return Ok(());
        };
        let window_start = row.created_at - TimeDelta::hours(6);
        let window_end = row.created_at + TimeDelta::days(3);
        let slots = oracle(&row, window_start, window_end);
        let t = row.created_at - TimeDelta::hours(3) + TimeDelta::minutes(offset_minutes) + TimeDelta::seconds(seconds);
        let expected_next = slots.range((std::ops::Bound::Excluded(t), std::ops::Bound::Unbounded)).next().copied();
        let next = rule.next_after(t);
        if let Some(next) = next {
            prop_assert!(next > t);
        }
        if expected_next.is_some() || next.is_some_and(|n| n <= window_end) {
            prop_assert_eq!(next, expected_next, "t = {}, row = {:?}", t, row);
        }
        let expected_latest = slots.range(..=t).next_back().copied();
        prop_assert_eq!(rule.latest_at_or_before(t), expected_latest, "latest at {}, row = {:?}", t, row);
    }

    /// Walking next_after from any slot gives the same sequence as from any earlier point,
    /// and no two slots are equal.
    #[test]
    fn walks_agree_and_never_repeat(row in row(), skip in 1usize..5) {
        let Ok(rule) = Rule::parse(&row.spec(), row.created_at) else { return Ok(()); };
        let start = row.created_at - TimeDelta::hours(1);
        let walk: Vec<_> = rule.slots_between(start, start + TimeDelta::days(400), 12);
        for pair in walk.windows(2) {
            prop_assert!(pair[0] < pair[1], "not strictly increasing: {:?}", walk);
        }
        if walk.len() > skip {
            let from_slot = rule.slots_between(walk[skip - 1], start + TimeDelta::days(400), 12 - skip);
            prop_assert_eq!(&from_slot[..], &walk[skip..]);
        }
    }

    /// plan_firing's shortcut (one walk when nothing lies between the stored next_run and
    /// now) gives what its definition gives, walk by walk. next_run is a slot or any instant
    /// (the application may write one), now up to a day later.
    #[test]
    fn plan_firing_matches_its_definition(
        row in row(),
        start_minutes in 0i64..2880,
        on_slot in any::<bool>(),
        late_seconds in prop::sample::select(vec![0i64, 1, 59, 600, 3_600, 86_400]),
    ) {
        let Ok(rule) = Rule::parse(&row.spec(), row.created_at) else { return Ok(()); };
        let from = row.created_at + TimeDelta::minutes(start_minutes);
        let next_run = if on_slot {
            match rule.next_after(from) { Some(slot) => slot, None => return Ok(()) }
        } else {
            from
        };
        let now = next_run + TimeDelta::seconds(late_seconds);
        prop_assert_eq!(
            plan_firing(&rule, next_run, now, 1000),
            plan_firing_by_definition(&rule, next_run, now, 1000),
            "row = {:?}, next_run = {}, now = {}", row, next_run, now
        );
    }

    /// No input string, number or array makes parsing panic.
    #[test]
    fn parsing_never_panics(
        frequency in prop::sample::select(vec!["once", "minutely", "hourly", "daily", "weekly", "monthly", "cron", "", "DAILY", "yearly"]),
        interval in any::<i32>(),
        time in prop::option::of(".{0,24}"),
        cron_like in prop::option::of("[0-9*/,@A-Za-z#LW? -]{0,30}"),
        days in prop::option::of(prop::collection::vec(any::<i32>(), 0..5)),
        date in prop::option::of(any::<i32>()),
        zone in prop::sample::select(vec!["UTC", "Mars/Olympus", "", "Europe/Berlin", "utc", "America/New_York"]),
        created in instant(),
    ) {
        let spec = ScheduleSpec {
            frequency: frequency.into(),
            interval,
            time: if frequency == "cron" { cron_like } else { time },
            days,
            date,
            timezone: zone.into(),
            created_at: created,
        };
        if let Ok(rule) = Rule::parse(&spec, created) {
            let _ = rule.next_after(created);
            let _ = rule.latest_at_or_before(created + TimeDelta::days(30));
        }
    }

    /// Any instant chrono can hold, as `created_at`, `now` or the instant asked about
    /// (±infinity read as the range's ends included): parsing, the searches and planning
    /// never panic; a `created_at` outside the years 1 to 9999 is an invalid row.
    #[test]
    fn the_whole_range_of_instants_never_panics(
        frequency in prop::sample::select(vec!["once", "minutely", "hourly", "daily", "weekly", "monthly", "cron"]),
        zone in prop::sample::select(vec!["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago", "Europe/Berlin", "America/St_Johns"]),
        created in extreme_instant(),
        now in extreme_instant(),
        asked in extreme_instant(),
    ) {
        let spec = ScheduleSpec {
            frequency: frequency.into(),
            interval: 1,
            time: Some(if frequency == "cron" { "*/5 * * * *".into() } else { "09:30".into() }),
            days: None,
            date: None,
            timezone: zone.into(),
            created_at: created,
        };
        match Rule::parse(&spec, now) {
            Ok(rule) => {
                prop_assert!((1..=9999).contains(&created.year()), "{:?}", created);
                let _ = rule.next_after(asked);
                let _ = rule.latest_at_or_before(asked);
                let _ = rule.slots_between(asked, asked.max(now), 3);
                let _ = plan_firing(&rule, asked.min(now), now, 100);
            }
            Err(error) => {
                if !(1..=9999).contains(&created.year()) {
                    prop_assert_eq!(error.column, "created_at");
                }
            }
        }
    }
}

/// Instants across chrono's whole range, its very ends included.
fn extreme_instant() -> impl Strategy<Value = DateTime<Utc>> {
    let (min, max) = (
        DateTime::<Utc>::MIN_UTC.timestamp(),
        DateTime::<Utc>::MAX_UTC.timestamp(),
    );
    prop_oneof![
        Just(DateTime::<Utc>::MIN_UTC),
        Just(DateTime::<Utc>::MAX_UTC),
        (min..=max).prop_map(|seconds| DateTime::from_timestamp(seconds, 0).unwrap()),
        (-62_135_596_800i64..253_402_300_799)
            .prop_map(|seconds| DateTime::from_timestamp(seconds, 0).unwrap()),
        instant(),
    ]
}
