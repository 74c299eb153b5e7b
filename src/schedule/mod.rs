//! The schedule engine: exactly when an `agent_schedules` row fires (schedules.md).
//!
//! Pure: no I/O, no database, no clock reads; `now` is always a parameter, so every
//! replica computes the same instants from the same row. A row is parsed once into a
//! [`Rule`] (invalid rows get a one-line [`ScheduleError`] naming the column and the
//! value); a rule answers [`Rule::next_after`], [`Rule::latest_at_or_before`] and
//! [`Rule::slots_between`]; [`plan_firing`] is what one claim of a due schedule does.
//!
//! - `rule`: parsing and validation, the typed rule;
//! - `resolve`: local wall-clock time to instant (RFC 5545 gaps and overlaps);
//! - `next`: finding slots;
//! - `cron`: cron expressions (croner) on the local wall clock;
//! - `preview`: `agentd schedule preview`.

mod cron;
mod next;
pub mod preview;
mod resolve;
mod rule;

use chrono::{DateTime, Utc};

pub use resolve::resolve;
pub use rule::{NEVER_FIRES_HORIZON_YEARS, Rule};

/// The definition columns of an `agent_schedules` row, as read from the database.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScheduleSpec {
    pub frequency: String,
    pub interval: i32,
    pub time: Option<String>,
    pub days: Option<Vec<i32>>,
    pub date: Option<i32>,
    pub timezone: String,
    pub created_at: DateTime<Utc>,
}

/// Why a row is not a valid schedule: the column and one line that names the bad value,
/// e.g. `timezone: unknown time zone "Mars/Olympus"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{column}: {message}")]
pub struct ScheduleError {
    /// The column at fault.
    pub column: &'static str,
    /// What is wrong with its value.
    pub message: String,
}

impl ScheduleError {
    pub(crate) fn new(column: &'static str, message: impl Into<String>) -> ScheduleError {
        ScheduleError {
            column,
            message: message.into(),
        }
    }
}

/// What one claim of a due schedule does (schedules.md, "Firing").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Firing {
    /// The slot the run is for.
    pub scheduled_for: DateTime<Utc>,
    /// Slots from the stored `next_run` up to (not including) `scheduled_for`, capped.
    pub missed: u64,
    /// The schedule's next `next_run`; `None` when nothing is left (`once`).
    pub next_run: Option<DateTime<Utc>>,
}

/// Plans the firing of a schedule whose stored `next_run` is due (`<= now`). `next_run` may
/// have been written by the application and need not be a slot.
///
/// `scheduled_for` is the latest slot `<= now`, or `next_run` itself when that is later or
/// there is none; `missed` counts `next_run` and the slots after it before `scheduled_for`
/// (at most `missed_cap`); the new `next_run` is the first slot after `now`, except for
/// `once`, which has nothing left after firing.
pub fn plan_firing(
    rule: &Rule,
    next_run: DateTime<Utc>,
    now: DateTime<Utc>,
    missed_cap: u64,
) -> Firing {
    // The usual claim: no slot after the stored `next_run` up to `now`. Then one walk answers
    // everything: the run is for `next_run`, nothing was missed, and the first slot after
    // `next_run` is the first after `now` too.
    if !rule.is_once()
        && let Some(after) = rule.next_after(next_run)
        && after > now
    {
        return Firing {
            scheduled_for: next_run,
            missed: 0,
            next_run: Some(after),
        };
    }
    plan_firing_by_definition(rule, next_run, now, missed_cap)
}

/// [`plan_firing`] as its definition reads, walk by walk, whatever lies between the stored
/// `next_run` and `now` (a property test holds the shortcut to it).
pub fn plan_firing_by_definition(
    rule: &Rule,
    next_run: DateTime<Utc>,
    now: DateTime<Utc>,
    missed_cap: u64,
) -> Firing {
    let scheduled_for = match rule.latest_at_or_before(now) {
        Some(latest) if latest >= next_run => latest,
        _ => next_run,
    };
    let mut missed = 0;
    if next_run < scheduled_for {
        missed = 1;
        let mut cursor = next_run;
        while missed < missed_cap {
            match rule.next_after(cursor) {
                Some(slot) if slot < scheduled_for => {
                    missed += 1;
                    cursor = slot;
                }
                _ => break,
            }
        }
    }
    let next_run = if rule.is_once() {
        None
    } else {
        rule.next_after(now.max(scheduled_for))
    };
    Firing {
        scheduled_for,
        missed,
        next_run,
    }
}
