//! A schedule row parsed into a typed rule, once, at the edge: code past [`Rule::parse`]
//! cannot hold an invalid schedule.

use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, TimeDelta, Utc, Weekday};
use chrono_tz::Tz;

use super::cron::CronRule;
use super::resolve::{local, resolve};
use super::{ScheduleError, ScheduleSpec};
use crate::text::quoted;

/// How far ahead a rule must have a slot to be valid.
pub const NEVER_FIRES_HORIZON_YEARS: i32 = 10;

/// A set of weekdays (bit 0 = Sunday … bit 6 = Saturday).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weekdays(u8);

impl Weekdays {
    /// Whether `day` is in the set.
    pub fn contains(self, day: Weekday) -> bool {
        self.0 & (1 << day.num_days_from_sunday()) != 0
    }

    fn of(day: Weekday) -> Weekdays {
        Weekdays(1 << day.num_days_from_sunday())
    }
}

/// What kind of slots a rule has.
#[derive(Debug, Clone)]
pub enum Kind {
    /// One slot.
    Once { at: DateTime<Utc> },
    /// `minutely`/`hourly`: a real-time grid `origin + k·period`, optionally filtered by
    /// local weekday.
    Grid {
        origin: DateTime<Utc>,
        period_seconds: i64,
        days: Option<Weekdays>,
    },
    /// `daily`: every `interval` days from the anchor date, optionally filtered.
    Daily {
        interval: i64,
        days: Option<Weekdays>,
    },
    /// `weekly`: these weekdays of every `interval`-th week (weeks start on Monday).
    Weekly { interval: i64, days: Weekdays },
    /// `monthly`: one day (clamped) of every `interval`-th month.
    Monthly { interval: i64, date: i32 },
    /// `cron`: every matching local wall-clock time.
    Cron(Box<CronRule>),
}

/// A valid schedule: slots are a pure function of it.
#[derive(Debug, Clone)]
pub struct Rule {
    pub(crate) kind: Kind,
    pub(crate) zone: Tz,
    pub(crate) created_at: DateTime<Utc>,
    /// Local date of `created_at`: interval counting starts here.
    pub(crate) anchor_date: NaiveDate,
    /// Local time of day of the slots (not used by `cron`).
    pub(crate) time: NaiveTime,
}

impl Rule {
    /// Parses and validates a row; `now` is used only to check that the rule fires within
    /// the next ten years.
    pub fn parse(spec: &ScheduleSpec, now: DateTime<Utc>) -> Result<Rule, ScheduleError> {
        let zone = Tz::from_str(&spec.timezone).map_err(|_| {
            ScheduleError::new(
                "timezone",
                format!("unknown time zone {}", quoted(&spec.timezone)),
            )
        })?;
        let frequency = spec.frequency.as_str();
        let uses_interval = !matches!(frequency, "once" | "cron");
        if !matches!(
            frequency,
            "once" | "minutely" | "hourly" | "daily" | "weekly" | "monthly" | "cron"
        ) {
            return Err(ScheduleError::new(
                "frequency",
                format!(
                    "unknown frequency {} (expected once, minutely, hourly, daily, weekly, monthly or cron)",
                    quoted(&spec.frequency)
                ),
            ));
        }
        if uses_interval && !(1..=10_000).contains(&spec.interval) {
            return Err(ScheduleError::new(
                "interval",
                format!("{} is outside 1…10000", spec.interval),
            ));
        }
        let interval = i64::from(spec.interval);
        let uses_days = matches!(frequency, "minutely" | "hourly" | "daily" | "weekly");
        let days = if uses_days {
            parse_days(spec.days.as_deref())?
        } else {
            None
        };
        // Years 1 to 9999, as the store reads them: every computation stays far from the
        // ends of chrono's range.
        if !(1..=9999).contains(&spec.created_at.year()) {
            return Err(ScheduleError::new(
                "created_at",
                format!("{} is outside the years 1 to 9999", spec.created_at),
            ));
        }
        let anchor_local = local(spec.created_at, zone)
            .ok_or_else(|| ScheduleError::new("created_at", "out of range"))?;
        let anchor_date = anchor_local.date();

        let (kind, time) = if frequency == "cron" {
            let expression = spec.time.as_deref().ok_or_else(|| {
                ScheduleError::new(
                    "time",
                    "a cron schedule needs its expression in time, which is NULL",
                )
            })?;
            (
                Kind::Cron(Box::new(CronRule::parse(expression)?)),
                NaiveTime::MIN,
            )
        } else {
            let time = match spec.time.as_deref() {
                None => NaiveTime::MIN,
                Some(text) => parse_time(text)?,
            };
            let at_anchor = |date: NaiveDate| resolve(date.and_time(time), zone);
            let kind = match frequency {
                "once" => {
                    let first = at_anchor(anchor_date).filter(|t| *t >= spec.created_at);
                    let at = first
                        .or_else(|| anchor_date.succ_opt().and_then(at_anchor))
                        .ok_or_else(|| ScheduleError::new("created_at", "out of range"))?;
                    Kind::Once { at }
                }
                "minutely" | "hourly" => {
                    let unit = if frequency == "hourly" { 3600 } else { 60 };
                    Kind::Grid {
                        origin: at_anchor(anchor_date)
                            .ok_or_else(|| ScheduleError::new("created_at", "out of range"))?,
                        period_seconds: interval * unit,
                        days,
                    }
                }
                "daily" => Kind::Daily { interval, days },
                "weekly" => Kind::Weekly {
                    interval,
                    days: days.unwrap_or_else(|| Weekdays::of(anchor_date.weekday())),
                },
                _ => {
                    let date = match spec.date {
                        None => anchor_date.day() as i32,
                        Some(date) if date != 0 && (-31..=31).contains(&date) => date,
                        Some(date) => {
                            return Err(ScheduleError::new(
                                "date",
                                format!(
                                    "{date} is not a day of the month (1…31, or -1…-31 from the end)"
                                ),
                            ));
                        }
                    };
                    Kind::Monthly { interval, date }
                }
            };
            (kind, time)
        };
        let rule = Rule {
            kind,
            zone,
            created_at: spec.created_at,
            anchor_date,
            time,
        };
        // A finite rule (`once`) has its one slot; any other must fire within ten years.
        if !matches!(rule.kind, Kind::Once { .. }) {
            let start = now.max(spec.created_at);
            let from = start
                .checked_sub_signed(TimeDelta::nanoseconds(1))
                .unwrap_or(start);
            let horizon = from
                .with_year(from.year().saturating_add(NEVER_FIRES_HORIZON_YEARS))
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            if rule.next_after(from).is_none_or(|next| next > horizon) {
                let (column, what) = match frequency {
                    "cron" => (
                        "time",
                        format!(
                            "cron expression {}",
                            quoted(spec.time.as_deref().unwrap_or(""))
                        ),
                    ),
                    _ => ("days", format!("{} schedule", frequency)),
                };
                return Err(ScheduleError::new(column, format!("{what} never fires")));
            }
        }
        Ok(rule)
    }

    /// The zone the rule's local times are in.
    pub fn timezone(&self) -> Tz {
        self.zone
    }

    /// Whether the rule has a single slot.
    pub fn is_once(&self) -> bool {
        matches!(self.kind, Kind::Once { .. })
    }
}

/// `HH:MM` or `HH:MM:SS`, 24-hour, the hour may have one digit.
fn parse_time(text: &str) -> Result<NaiveTime, ScheduleError> {
    let invalid = || {
        ScheduleError::new(
            "time",
            format!(
                "{} is not a time of day (HH:MM or HH:MM:SS, 24-hour)",
                quoted(text)
            ),
        )
    };
    let parts: Vec<&str> = text.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(invalid());
    }
    let number = |part: &str, max: u32, widths: &[usize]| -> Option<u32> {
        if !widths.contains(&part.len()) || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse::<u32>().ok().filter(|n| *n <= max)
    };
    let hour = number(parts[0], 23, &[1, 2]).ok_or_else(invalid)?;
    let minute = number(parts[1], 59, &[2]).ok_or_else(invalid)?;
    let second = match parts.get(2) {
        Some(part) => number(part, 59, &[2]).ok_or_else(invalid)?,
        None => 0,
    };
    NaiveTime::from_hms_opt(hour, minute, second).ok_or_else(invalid)
}

/// Weekdays 0…7 (0 and 7 are Sunday); NULL or empty means no filter.
fn parse_days(days: Option<&[i32]>) -> Result<Option<Weekdays>, ScheduleError> {
    let Some(days) = days.filter(|days| !days.is_empty()) else {
        return Ok(None);
    };
    let mut set = 0u8;
    for day in days {
        if !(0..=7).contains(day) {
            return Err(ScheduleError::new(
                "days",
                format!("{day} is not a weekday (0 = Sunday … 6 = Saturday, 7 = Sunday)"),
            ));
        }
        set |= 1 << (day % 7);
    }
    Ok(Some(Weekdays(set)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_quotes_at_most_a_few_hundred_characters() {
        let long = "x".repeat(1 << 20);
        let error = Rule::parse(
            &ScheduleSpec {
                frequency: "daily".into(),
                interval: 1,
                time: Some(long),
                days: None,
                date: None,
                timezone: "UTC".into(),
                created_at: DateTime::<Utc>::UNIX_EPOCH,
            },
            DateTime::<Utc>::UNIX_EPOCH,
        )
        .unwrap_err();
        assert!(error.to_string().len() < 300, "{error}");
    }

    #[test]
    fn times_of_day() {
        assert_eq!(
            parse_time("9:05").unwrap(),
            NaiveTime::from_hms_opt(9, 5, 0).unwrap()
        );
        assert_eq!(
            parse_time("23:59:59").unwrap(),
            NaiveTime::from_hms_opt(23, 59, 59).unwrap()
        );
        for bad in [
            "24:00",
            "9:5",
            "09:60",
            "",
            "9",
            "09:00:00:00",
            "+9:00",
            "٩:00",
            "09:00:60",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
