//! Local wall-clock time to instant, as RFC 5545 (section 3.3.5) says.
//!
//! - A local time that exists once is that instant.
//! - One in a gap (clocks jump forward) is read with the UTC offset in force *before* the
//!   gap: 02:30 on the day New York springs forward is 07:30Z (03:30 EDT).
//! - One that occurs twice (clocks fall back) is its *first* occurrence only.
//!
//! This is Python's `zoneinfo` with `fold=0` and Temporal's "compatible" disambiguation.

use chrono::{DateTime, LocalResult, NaiveDateTime, Offset, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;

/// The instant of local time `local` in `zone`; `None` only outside chrono's range.
pub fn resolve(local: NaiveDateTime, zone: Tz) -> Option<DateTime<Utc>> {
    match zone.from_local_datetime(&local) {
        LocalResult::Single(time) => Some(time.with_timezone(&Utc)),
        LocalResult::Ambiguous(first, second) => {
            Some(first.with_timezone(&Utc).min(second.with_timezone(&Utc)))
        }
        LocalResult::None => {
            // In a gap: the offset in force before it is the offset a day earlier (no
            // zone has two transitions within a day around a gap).
            let before = local.checked_sub_signed(TimeDelta::days(1))?;
            let offset = zone.offset_from_utc_datetime(&before).fix();
            let utc = local
                .checked_sub_signed(TimeDelta::seconds(i64::from(offset.local_minus_utc())))?;
            Some(Utc.from_utc_datetime(&utc))
        }
    }
}

/// The local wall-clock time of `instant` in `zone`; `None` only at the very ends of
/// chrono's range, where the offset would carry it outside.
pub fn local(instant: DateTime<Utc>, zone: Tz) -> Option<NaiveDateTime> {
    let utc = instant.naive_utc();
    utc.checked_add_offset(zone.offset_from_utc_datetime(&utc).fix())
}

/// Whether local time `local` falls in a gap or occurs twice: only near such times can
/// resolution reorder slots, so only there do the searches take the slow, exact path.
pub fn is_irregular(local: NaiveDateTime, zone: Tz) -> bool {
    !matches!(zone.from_local_datetime(&local), LocalResult::Single(_))
}

/// Whether the zone's offset at `instant` is the one it had a day earlier: then no gap or
/// overlap in the last day can move a slot across `instant`, and the nearest wall-clock
/// match (if it exists exactly once) is the nearest slot.
pub fn steady_before(instant: DateTime<Utc>, zone: Tz) -> bool {
    let offset = |instant: DateTime<Utc>| zone.offset_from_utc_datetime(&instant.naive_utc()).fix();
    instant
        .checked_sub_signed(TimeDelta::days(1))
        .is_some_and(|day_before| offset(day_before) == offset(instant))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn at(zone: Tz, y: i32, m: u32, d: u32, h: u32, min: u32) -> String {
        let local = NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(h, min, 0)
            .unwrap();
        resolve(local, zone).unwrap().to_rfc3339()
    }

    #[test]
    fn gaps_take_the_offset_before_and_overlaps_the_first_occurrence() {
        let ny = chrono_tz::America::New_York;
        assert_eq!(at(ny, 2025, 3, 9, 2, 30), "2025-03-09T07:30:00+00:00");
        assert_eq!(at(ny, 2025, 11, 2, 1, 30), "2025-11-02T05:30:00+00:00");
        assert_eq!(at(ny, 2025, 6, 1, 9, 0), "2025-06-01T13:00:00+00:00");
        // Samoa skipped 30 December 2011: noon on the 30th lands on noon of the 31st.
        let apia = chrono_tz::Pacific::Apia;
        assert_eq!(at(apia, 2011, 12, 30, 12, 0), at(apia, 2011, 12, 31, 12, 0));
    }
}
