//! Finding slots: the next one after an instant, the latest one at or before it, and the
//! ones in between.
//!
//! Calendar rules (`daily`, `weekly`, `monthly`) have at most one slot per local date, and
//! the instant of a later date is never earlier (a gap shifts a time by less than a day,
//! Samoa's lost day by exactly one), so walking candidate dates in order finds slots in
//! order. Grids (`minutely`, `hourly`) are arithmetic in real time. Cron takes a fast path
//! (the next wall-clock match) where no offset change is near, and near one enumerates the
//! matches of the few local dates involved, resolves each and takes the earliest, which is
//! exact whatever the gaps and overlaps do to the order.
//!
//! Every loop is bounded: a rule that never fires answers `None` after a bounded search.

use chrono::{DateTime, Datelike, Months, NaiveDate, NaiveDateTime, TimeDelta, Timelike, Utc};

use super::resolve::{is_irregular, local, resolve, steady_before};
use super::rule::{Kind, Rule};

/// Most candidate dates (or grid jumps) examined by one search before giving up.
const MAX_STEPS: usize = 64;
/// How far the cron searches look, in days (a little over ten years).
const CRON_HORIZON_DAYS: i64 = 3660 + 366;

impl Rule {
    /// The earliest slot strictly after `t`, or `None` if there is none.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // No slot is earlier than created_at.
        let t = t.max(
            self.created_at
                .checked_sub_signed(TimeDelta::nanoseconds(1))?,
        );
        match &self.kind {
            Kind::Once { at } => (*at > t).then_some(*at),
            Kind::Grid {
                origin,
                period_seconds,
                days,
            } => {
                let mut k = (t.timestamp() - origin.timestamp()).div_euclid(*period_seconds) + 1;
                for _ in 0..MAX_STEPS {
                    let slot = origin.checked_add_signed(TimeDelta::try_seconds(
                        k.checked_mul(*period_seconds)?,
                    )?)?;
                    let day = local(slot, self.zone)?.date();
                    match days {
                        Some(days) if !days.contains(day.weekday()) => {
                            // Jump to the first grid point of the next local date.
                            let next_day = resolve(
                                day.succ_opt()?.and_time(chrono::NaiveTime::MIN),
                                self.zone,
                            )?;
                            let skip = (next_day.timestamp() - origin.timestamp() + period_seconds
                                - 1)
                            .div_euclid(*period_seconds);
                            k = skip.max(k + 1);
                        }
                        _ => return Some(slot),
                    }
                }
                None
            }
            Kind::Cron(cron) => self.cron_next(cron, t),
            Kind::Daily { .. } | Kind::Weekly { .. } | Kind::Monthly { .. } => {
                let mut date = local(t, self.zone)?.date().pred_opt()?;
                for _ in 0..MAX_STEPS {
                    let candidate = self.next_active_date(date)?;
                    let slot = resolve(candidate.and_time(self.time), self.zone)?;
                    if slot > t {
                        return Some(slot);
                    }
                    date = candidate.succ_opt()?;
                }
                None
            }
        }
    }

    /// The latest slot at or before `t`, or `None` if there is none.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if t < self.created_at {
            return None;
        }
        let slot = match &self.kind {
            Kind::Once { at } => (*at <= t).then_some(*at),
            Kind::Grid {
                origin,
                period_seconds,
                days,
            } => {
                let mut k = (t.timestamp() - origin.timestamp()).div_euclid(*period_seconds);
                let mut found = None;
                for _ in 0..MAX_STEPS {
                    let slot = origin.checked_add_signed(TimeDelta::try_seconds(
                        k.checked_mul(*period_seconds)?,
                    )?)?;
                    if slot < self.created_at {
                        return None;
                    }
                    let day = local(slot, self.zone)?.date();
                    match days {
                        Some(days) if !days.contains(day.weekday()) => {
                            // Jump to the last grid point of the previous local date.
                            let day_start =
                                resolve(day.and_time(chrono::NaiveTime::MIN), self.zone)?;
                            let skip = (day_start.timestamp() - 1 - origin.timestamp())
                                .div_euclid(*period_seconds);
                            k = skip.min(k - 1);
                        }
                        _ => {
                            found = Some(slot);
                            break;
                        }
                    }
                }
                found
            }
            Kind::Cron(cron) => self.cron_latest(cron, t),
            Kind::Daily { .. } | Kind::Weekly { .. } | Kind::Monthly { .. } => {
                let mut date = local(t, self.zone)?.date().succ_opt()?;
                let mut found = None;
                for _ in 0..MAX_STEPS {
                    let candidate = self.previous_active_date(date)?;
                    let slot = resolve(candidate.and_time(self.time), self.zone)?;
                    if slot <= t {
                        found = Some(slot);
                        break;
                    }
                    date = candidate.pred_opt()?;
                }
                found
            }
        };
        slot.filter(|slot| *slot >= self.created_at)
    }

    /// The slots in `(from, to]`, at most `limit` of them, in order.
    pub fn slots_between(
        &self,
        from_exclusive: DateTime<Utc>,
        to_inclusive: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut slots = Vec::new();
        let mut cursor = from_exclusive;
        while slots.len() < limit {
            match self.next_after(cursor) {
                Some(slot) if slot <= to_inclusive => {
                    slots.push(slot);
                    cursor = slot;
                }
                _ => break,
            }
        }
        slots
    }

    /// The first date on or after `date` that has a slot (calendar rules).
    fn next_active_date(&self, date: NaiveDate) -> Option<NaiveDate> {
        let anchor = self.anchor_date;
        match &self.kind {
            Kind::Daily { interval, days } => {
                let offset = (date - anchor).num_days();
                let first =
                    offset.div_euclid(*interval) + i64::from(offset.rem_euclid(*interval) != 0);
                // The weekday of anchor + k·interval repeats every 7 steps.
                for k in first..first + 7 {
                    let candidate = anchor
                        .checked_add_signed(TimeDelta::try_days(k.checked_mul(*interval)?)?)?;
                    if days.is_none_or(|days| days.contains(candidate.weekday())) {
                        return Some(candidate);
                    }
                }
                None
            }
            Kind::Weekly { interval, days } => {
                let anchor_week = monday_of(anchor);
                let mut week = monday_of(date);
                let mut from = date;
                for _ in 0..3 {
                    let index = (week - anchor_week).num_days() / 7;
                    let rem = index.rem_euclid(*interval);
                    if rem != 0 {
                        week = week.checked_add_signed(TimeDelta::try_weeks(interval - rem)?)?;
                        from = week;
                    }
                    let mut day = from;
                    let week_end = week.checked_add_signed(TimeDelta::days(7))?;
                    while day < week_end {
                        if days.contains(day.weekday()) {
                            return Some(day);
                        }
                        day = day.succ_opt()?;
                    }
                    week = week.checked_add_signed(TimeDelta::try_weeks(*interval)?)?;
                    from = week;
                }
                None
            }
            Kind::Monthly {
                interval,
                date: day,
            } => {
                let mut month = first_of_month(date);
                let anchor_month = first_of_month(anchor);
                let rem = months_between(anchor_month, month).rem_euclid(*interval);
                if rem != 0 {
                    month = month.checked_add_months(Months::new((interval - rem) as u32))?;
                }
                for _ in 0..2 {
                    let candidate = clamp_day(month, *day)?;
                    if candidate >= date {
                        return Some(candidate);
                    }
                    month = month.checked_add_months(Months::new(*interval as u32))?;
                }
                None
            }
            // Not calendar rules: they find their slots without dates.
            Kind::Once { .. } | Kind::Grid { .. } | Kind::Cron(_) => None,
        }
    }

    /// The last date on or before `date` that has a slot (calendar rules).
    fn previous_active_date(&self, date: NaiveDate) -> Option<NaiveDate> {
        let anchor = self.anchor_date;
        match &self.kind {
            Kind::Daily { interval, days } => {
                let mut k = (date - anchor).num_days().div_euclid(*interval);
                for _ in 0..7 {
                    let candidate = anchor
                        .checked_add_signed(TimeDelta::try_days(k.checked_mul(*interval)?)?)?;
                    if days.is_none_or(|days| days.contains(candidate.weekday())) {
                        return Some(candidate);
                    }
                    k -= 1;
                }
                None
            }
            Kind::Weekly { interval, days } => {
                let anchor_week = monday_of(anchor);
                let mut week = monday_of(date);
                let mut from = date;
                for _ in 0..3 {
                    let index = (week - anchor_week).num_days() / 7;
                    let rem = index.rem_euclid(*interval);
                    if rem != 0 {
                        week = week.checked_sub_signed(TimeDelta::try_weeks(rem)?)?;
                        from = week.checked_add_signed(TimeDelta::days(6))?;
                    }
                    let mut day = from;
                    while day >= week {
                        if days.contains(day.weekday()) {
                            return Some(day);
                        }
                        day = day.pred_opt()?;
                    }
                    week = week.checked_sub_signed(TimeDelta::try_weeks(*interval)?)?;
                    from = week.checked_add_signed(TimeDelta::days(6))?;
                }
                None
            }
            Kind::Monthly {
                interval,
                date: day,
            } => {
                let mut month = first_of_month(date);
                let rem = months_between(first_of_month(anchor), month).rem_euclid(*interval);
                if rem != 0 {
                    month = month.checked_sub_months(Months::new(rem as u32))?;
                }
                for _ in 0..2 {
                    let candidate = clamp_day(month, *day)?;
                    if candidate <= date {
                        return Some(candidate);
                    }
                    month = month.checked_sub_months(Months::new(*interval as u32))?;
                }
                None
            }
            // Not calendar rules: they find their slots without dates.
            Kind::Once { .. } | Kind::Grid { .. } | Kind::Cron(_) => None,
        }
    }

    fn cron_next(&self, cron: &super::cron::CronRule, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let wall = local(t, self.zone)?;
        let limit = wall.checked_add_signed(TimeDelta::days(CRON_HORIZON_DAYS))?;
        // Fast path: the next wall-clock match, when it exists exactly once and no offset
        // changed in the day before t (nothing earlier can be shifted past t, and t is not
        // in a repeated hour). Matches between t and it there are none, by definition.
        let wall_second = truncate_to_second(wall);
        let first = cron.next_match(wall_second, limit)?;
        if !is_irregular(first, self.zone) && steady_before(t, self.zone) {
            let slot = resolve(first, self.zone)?;
            if slot > t {
                return Some(slot);
            }
        }
        // Exact path: resolve every match of the dates around, take the earliest after t.
        // A date two after the first date with such a slot cannot hold an earlier one (a gap
        // moves a time forward by at most a day).
        let start = wall
            .date()
            .pred_opt()?
            .and_time(chrono::NaiveTime::MIN)
            .checked_sub_signed(TimeDelta::seconds(1))?;
        let mut day = cron.next_match(start, limit)?.date();
        let mut best: Option<DateTime<Utc>> = None;
        let mut hit_day: Option<NaiveDate> = None;
        loop {
            for matched in cron.matches_on(day) {
                if let Some(slot) = resolve(matched, self.zone).filter(|slot| *slot > t) {
                    best = Some(best.map_or(slot, |best| best.min(slot)));
                }
            }
            if best.is_some() && hit_day.is_none() {
                hit_day = Some(day);
            }
            let end_of_day = day
                .succ_opt()?
                .and_time(chrono::NaiveTime::MIN)
                .checked_sub_signed(TimeDelta::seconds(1))?;
            let Some(next) = cron.next_match(end_of_day, limit) else {
                return best;
            };
            let next_day = next.date();
            if let Some(hit) = hit_day
                && next_day > hit.succ_opt()?
            {
                return best;
            }
            day = next_day;
        }
    }

    fn cron_latest(&self, cron: &super::cron::CronRule, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let wall = truncate_to_second(local(t, self.zone)?);
        let limit = local(self.created_at, self.zone)?.checked_sub_signed(TimeDelta::days(2))?;
        let after = wall.checked_add_signed(TimeDelta::seconds(1))?;
        let last = cron.previous_match(after, limit)?;
        if !is_irregular(last, self.zone) && steady_before(t, self.zone) {
            let slot = resolve(last, self.zone)?;
            if slot <= t {
                return Some(slot);
            }
        }
        let start = wall
            .date()
            .succ_opt()?
            .succ_opt()?
            .and_time(chrono::NaiveTime::MIN);
        let mut day = cron.previous_match(start, limit)?.date();
        let mut best: Option<DateTime<Utc>> = None;
        let mut hit_day: Option<NaiveDate> = None;
        loop {
            for matched in cron.matches_on(day) {
                if let Some(slot) = resolve(matched, self.zone).filter(|slot| *slot <= t) {
                    best = Some(best.map_or(slot, |best| best.max(slot)));
                }
            }
            if best.is_some() && hit_day.is_none() {
                hit_day = Some(day);
            }
            let start_of_day = day.and_time(chrono::NaiveTime::MIN);
            let Some(previous) = cron.previous_match(start_of_day, limit) else {
                return best;
            };
            let previous_day = previous.date();
            if let Some(hit) = hit_day
                && previous_day < hit.pred_opt()?
            {
                return best;
            }
            day = previous_day;
        }
    }
}

fn truncate_to_second(time: NaiveDateTime) -> NaiveDateTime {
    time.with_nanosecond(0).unwrap_or(time)
}

fn monday_of(date: NaiveDate) -> NaiveDate {
    date.checked_sub_signed(TimeDelta::days(i64::from(
        date.weekday().num_days_from_monday(),
    )))
    .unwrap_or(NaiveDate::MIN)
}

fn first_of_month(date: NaiveDate) -> NaiveDate {
    date.with_day(1).unwrap_or(date)
}

fn months_between(from: NaiveDate, to: NaiveDate) -> i64 {
    (i64::from(to.year()) * 12 + i64::from(to.month0()))
        - (i64::from(from.year()) * 12 + i64::from(from.month0()))
}

/// Day `day` of the month starting at `month` (1…31 from the start, -1…-31 from the end),
/// clamped into the month.
fn clamp_day(month: NaiveDate, day: i32) -> Option<NaiveDate> {
    let next = month.checked_add_months(Months::new(1))?;
    let length = (next - month).num_days() as i32;
    let day = if day > 0 {
        day.min(length)
    } else {
        (length + 1 + day).max(1)
    };
    month.with_day(day as u32)
}
