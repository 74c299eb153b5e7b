//! Cron expressions, matched on the local wall clock with the `croner` crate.
//!
//! Standard 5 fields (minute hour day-of-month month day-of-week) or 6 with leading
//! seconds; lists, ranges, steps, month and day names, 0 or 7 for Sunday; the macros
//! `@yearly @annually @monthly @weekly @daily @midnight @hourly`. As in Vixie cron, when
//! both day fields are restricted a day matching either matches. croner's extensions
//! (`L`, `W`, `#`) are accepted too. croner only matches wall-clock times here; turning them
//! into instants (RFC 5545 gaps and overlaps) is `resolve`'s job, because croner's own rule
//! for gaps differs from the spec's.

use chrono::{NaiveDate, NaiveDateTime, TimeDelta};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use super::ScheduleError;
use crate::text::{cut, quoted};

/// A parsed cron expression.
#[derive(Debug, Clone)]
pub struct CronRule {
    cron: Cron,
}

impl CronRule {
    /// Parses an expression; the error names the column (`time`) and the expression.
    pub fn parse(expression: &str) -> Result<CronRule, ScheduleError> {
        let invalid = |why: String| {
            ScheduleError::new(
                "time",
                format!("cron expression {} is invalid: {why}", quoted(expression)),
            )
        };
        let trimmed = expression.trim();
        let expanded = match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *".to_string(),
            "@monthly" => "0 0 1 * *".to_string(),
            "@weekly" => "0 0 * * 0".to_string(),
            "@daily" | "@midnight" => "0 0 * * *".to_string(),
            "@hourly" => "0 * * * *".to_string(),
            other if other.starts_with('@') => {
                return Err(invalid("unknown macro (expected @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly)".into()));
            }
            _ => trimmed.to_string(),
        };
        let fields = expanded.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(invalid(format!(
                "it has {fields} fields; expected 5 (minute hour day-of-month month day-of-week) or 6 (with leading seconds)"
            )));
        }
        let parser = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build();
        // croner is not expected to panic on any input, but a panic here must not take
        // the worker down: it is reported as an invalid expression.
        let parsed = std::panic::catch_unwind(|| parser.parse(&expanded))
            .map_err(|_| invalid("it cannot be parsed".into()))?;
        // croner's message may repeat the expression: it is cut like any quoted value.
        let cron = parsed.map_err(|error| {
            invalid(cut(&error.to_string().trim_end_matches('.').to_lowercase()))
        })?;
        Ok(CronRule { cron })
    }

    /// The first matching wall-clock time strictly after `after`, within `limit`.
    pub fn next_match(&self, after: NaiveDateTime, limit: NaiveDateTime) -> Option<NaiveDateTime> {
        let found = self.cron.find_next_occurrence(&after, false).ok()?;
        (found <= limit).then_some(found)
    }

    /// The last matching wall-clock time strictly before `before`, not earlier than `limit`.
    pub fn previous_match(
        &self,
        before: NaiveDateTime,
        limit: NaiveDateTime,
    ) -> Option<NaiveDateTime> {
        let found = self.cron.find_previous_occurrence(&before, false).ok()?;
        (found >= limit).then_some(found)
    }

    /// Every matching wall-clock time of one local date, in order.
    pub fn matches_on(&self, date: NaiveDate) -> Vec<NaiveDateTime> {
        let start = date.and_time(chrono::NaiveTime::MIN);
        let Some(end) = start
            .checked_add_signed(TimeDelta::days(1))
            .and_then(|end| end.checked_sub_signed(TimeDelta::seconds(1)))
        else {
            return Vec::new();
        };
        let mut found = Vec::new();
        let mut cursor = match self.cron.find_next_occurrence(&start, true) {
            Ok(first) if first <= end => first,
            _ => return found,
        };
        loop {
            found.push(cursor);
            match self.next_match(cursor, end) {
                Some(next) => cursor = next,
                None => return found,
            }
        }
    }
}
