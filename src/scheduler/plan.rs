//! What a claim does with the schedules it locked: pure, so every rule of schedules.md's
//! "Firing" can be tested without a database. Input: the locked rows, the database's `now`
//! and the policies; output: the writes of the claim and one event per schedule for the
//! logs.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use crate::config::{MisfirePolicy, OverlapPolicy, SchedulerSettings};
use crate::schedule::{Firing, Rule, ScheduleSpec, plan_firing};
use crate::store::schedules::{
    ClaimWrites, LockedSchedule, NewScheduledRun, ScheduleState, ScheduleStateChange,
    ScheduleUpdate,
};

/// Missed slots are counted up to this many (the count goes into the run's input).
pub const MISSED_CAP: u64 = 100_000;

/// What happened to one schedule in a claim, for the logs (and metrics later).
#[derive(Debug, Clone, PartialEq)]
pub enum PlanEvent {
    /// A run was planned for this slot.
    Fired {
        schedule_id: Uuid,
        run_id: Uuid,
        scheduled_for: DateTime<Utc>,
        missed: u64,
        next_run: Option<DateTime<Utc>>,
    },
    /// The slot was not fired.
    Skipped {
        schedule_id: Uuid,
        scheduled_for: DateTime<Utc>,
        reason: SkipReason,
        next_run: Option<DateTime<Utc>>,
    },
    /// A new or edited schedule got its first `next_run`.
    Planned {
        schedule_id: Uuid,
        next_run: DateTime<Utc>,
        /// It replaces a stored `next_run` outside the years 1 to 9999.
        replaced_unusable: bool,
    },
    /// The schedule has no slot left (`once` after firing).
    Exhausted { schedule_id: Uuid },
    /// The row is invalid; reported to its owner once per definition.
    Invalid {
        schedule_id: Uuid,
        report_run_id: Uuid,
        error: String,
    },
}

/// Why a due slot was not fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Later than `misfire_grace` with `misfire_policy = "skip"`.
    Misfire,
    /// The previous run still runs and `overlap_policy = "skip"`.
    Overlap,
}

impl SkipReason {
    /// The reason as logged.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Misfire => "misfire",
            SkipReason::Overlap => "overlap",
        }
    }
}

/// Parsed rules by definition, so a schedule's rule is parsed once per definition, not at
/// every claim (parsing a cron expression costs microseconds; a busy replica claims
/// thousands of rows a second). Bounded: emptied when it grows past [`RuleCache::LIMIT`];
/// a definition's texts are at most a few hundred characters (the store cuts longer ones,
/// which are invalid), so the cache holds a few megabytes at most.
#[derive(Default)]
pub struct RuleCache {
    rules: HashMap<ScheduleSpec, Result<Rule, String>>,
}

impl RuleCache {
    /// Most definitions kept.
    pub const LIMIT: usize = 10_000;

    /// The row's rule (or why it is invalid), parsed at `now` the first time its definition
    /// is seen.
    fn rule(&mut self, row: &LockedSchedule, now: DateTime<Utc>) -> Result<&Rule, String> {
        if let Some(defect) = &row.defect {
            return Err(defect.clone());
        }
        if !self.rules.contains_key(&row.spec) {
            if self.rules.len() >= Self::LIMIT {
                self.rules.clear();
            }
            let parsed = Rule::parse(&row.spec, now).map_err(|error| error.to_string());
            self.rules.insert(row.spec.clone(), parsed);
        }
        match self.rules.get(&row.spec) {
            Some(Ok(rule)) => Ok(rule),
            Some(Err(error)) => Err(error.clone()),
            None => unreachable!("the definition was inserted just above"),
        }
    }
}

/// Plans a claim. `new_id` makes run ids (UUIDv7 in production).
pub fn plan_claim(
    rows: &[LockedSchedule],
    now: DateTime<Utc>,
    policy: &SchedulerSettings,
    rules: &mut RuleCache,
    mut new_id: impl FnMut() -> Uuid,
) -> (ClaimWrites, Vec<PlanEvent>) {
    let mut writes = ClaimWrites::default();
    let mut events = Vec::with_capacity(rows.len());
    let misfire_grace =
        chrono::Duration::from_std(policy.misfire_grace).unwrap_or(chrono::Duration::MAX);
    // Schedules of one definition due at the same instant fire alike (a burst at the top of
    // the hour): each firing is worked out once per claim. `plan_firing` is pure, and `now`
    // and the cap are the claim's.
    let mut firings: HashMap<(&ScheduleSpec, DateTime<Utc>), Firing> = HashMap::new();

    for row in rows {
        let rule = match rules.rule(row, now) {
            Ok(rule) => rule,
            Err(error) => {
                let report_run_id = new_id();
                writes.updates.push(ScheduleUpdate {
                    id: row.id,
                    next_run: None,
                    last_run: None,
                });
                writes.states.push(ScheduleStateChange {
                    schedule_id: row.id,
                    state: ScheduleState::Invalid {
                        error: format!("invalid schedule: {error}"),
                        report_run_id,
                        agent_id: row.agent_id,
                        owner_id: row.owner_id,
                        input: json!({
                            "trigger": "schedule",
                            "schedule_id": row.id,
                            "invalid": true,
                        }),
                    },
                });
                events.push(PlanEvent::Invalid {
                    schedule_id: row.id,
                    report_run_id,
                    error,
                });
                continue;
            }
        };

        let Some(due) = row.next_run else {
            // New or edited (or its next_run was unusable): the first slot strictly after now.
            match rule.next_after(now) {
                Some(next_run) => {
                    writes.updates.push(ScheduleUpdate {
                        id: row.id,
                        next_run: Some(next_run),
                        last_run: None,
                    });
                    events.push(PlanEvent::Planned {
                        schedule_id: row.id,
                        next_run,
                        replaced_unusable: row.next_run_unusable,
                    });
                }
                None => {
                    exhaust(&mut writes, row);
                    events.push(PlanEvent::Exhausted {
                        schedule_id: row.id,
                    });
                }
            }
            continue;
        };

        // A slot claimed ahead of its instant (scheduler.fire_ahead) is planned as of that
        // instant, when its run starts: on time, nothing missed.
        let at = now.max(due);
        let firing = *firings
            .entry((&row.spec, due))
            .or_insert_with(|| plan_firing(rule, due, at, MISSED_CAP));
        let late = at - firing.scheduled_for;
        let skip = if late > misfire_grace && policy.misfire_policy == MisfirePolicy::Skip {
            Some(SkipReason::Misfire)
        } else if row.running && policy.overlap_policy == OverlapPolicy::Skip {
            Some(SkipReason::Overlap)
        } else {
            None
        };
        match skip {
            Some(reason) => {
                writes.updates.push(ScheduleUpdate {
                    id: row.id,
                    next_run: firing.next_run,
                    last_run: None,
                });
                events.push(PlanEvent::Skipped {
                    schedule_id: row.id,
                    scheduled_for: firing.scheduled_for,
                    reason,
                    next_run: firing.next_run,
                });
            }
            None => {
                let run_id = new_id();
                writes.fires.push(NewScheduledRun {
                    run_id,
                    schedule_id: row.id,
                    scheduled_for: firing.scheduled_for,
                    ahead: firing.scheduled_for > now,
                    agent_id: row.agent_id,
                    owner_id: row.owner_id,
                    input: json!({
                        "trigger": "schedule",
                        "schedule_id": row.id,
                        "scheduled_for": firing
                            .scheduled_for
                            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                        "missed": firing.missed,
                    }),
                });
                writes.updates.push(ScheduleUpdate {
                    id: row.id,
                    next_run: firing.next_run,
                    last_run: Some(firing.scheduled_for),
                });
                events.push(PlanEvent::Fired {
                    schedule_id: row.id,
                    run_id,
                    scheduled_for: firing.scheduled_for,
                    missed: firing.missed,
                    next_run: firing.next_run,
                });
            }
        }
        if firing.next_run.is_none() {
            exhaust(&mut writes, row);
        }
    }
    (writes, events)
}

fn exhaust(writes: &mut ClaimWrites, row: &LockedSchedule) {
    writes.states.push(ScheduleStateChange {
        schedule_id: row.id,
        state: ScheduleState::Exhausted,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(timezone: &str) -> LockedSchedule {
        LockedSchedule {
            id: Uuid::nil(),
            agent_id: Uuid::nil(),
            owner_id: Uuid::nil(),
            spec: ScheduleSpec {
                frequency: "daily".into(),
                interval: 1,
                time: Some("09:00".into()),
                days: None,
                date: None,
                timezone: timezone.into(),
                created_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            },
            next_run: None,
            next_run_unusable: false,
            running: false,
            defect: None,
        }
    }

    #[test]
    fn a_slot_claimed_ahead_is_planned_as_of_its_instant() {
        let now: DateTime<Utc> = "2026-11-26T08:59:58Z".parse().unwrap();
        let policy = SchedulerSettings {
            poll_interval: std::time::Duration::from_secs(60),
            batch_size: 500,
            misfire_grace: std::time::Duration::from_secs(60),
            misfire_policy: MisfirePolicy::Skip,
            overlap_policy: OverlapPolicy::Skip,
            fire_ahead: std::time::Duration::from_secs(2),
        };
        let mut ahead = row("UTC");
        ahead.next_run = Some("2026-11-26T09:00:00Z".parse().unwrap());
        let mut due_now = row("UTC");
        due_now.next_run = Some("2026-11-25T09:00:00Z".parse().unwrap());
        let mut rules = RuleCache::default();
        let (writes, events) =
            plan_claim(&[ahead, due_now], now, &policy, &mut rules, Uuid::now_v7);
        assert_eq!(writes.fires.len(), 1, "{events:?}");
        let fire = &writes.fires[0];
        assert!(fire.ahead);
        assert_eq!(
            fire.scheduled_for,
            "2026-11-26T09:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(fire.input["missed"], 0, "on time at its instant");
        assert_eq!(
            writes.updates[0].next_run,
            Some("2026-11-27T09:00:00Z".parse().unwrap())
        );
        // The other row is a day late: a misfire, skipped as of now (not of any instant).
        assert!(matches!(
            events[1],
            PlanEvent::Skipped {
                reason: SkipReason::Misfire,
                ..
            }
        ));
    }

    #[test]
    fn firings_worked_out_once_per_definition_and_instant_match_each_rows_own() {
        let now: DateTime<Utc> = "2026-11-26T12:00:30Z".parse().unwrap();
        let policy = SchedulerSettings {
            poll_interval: std::time::Duration::from_secs(60),
            batch_size: 500,
            misfire_grace: std::time::Duration::from_secs(3600 * 24 * 365),
            misfire_policy: MisfirePolicy::Coalesce,
            overlap_policy: OverlapPolicy::Allow,
            fire_ahead: std::time::Duration::ZERO,
        };
        let due = |at: &str, timezone: &str| {
            let mut row = row(timezone);
            row.next_run = Some(at.parse().unwrap());
            row
        };
        // Same definition and instant (shared), the same definition at other instants (one
        // of them with missed slots), and another definition at the first instant.
        let rows = [
            due("2026-11-26T09:00:00Z", "UTC"),
            due("2026-11-26T09:00:00Z", "UTC"),
            due("2026-11-23T09:00:00Z", "UTC"),
            due("2026-11-26T09:00:00Z", "UTC"),
            due("2026-11-26T08:00:00Z", "Europe/Berlin"),
            due("2026-11-26T09:00:00Z", "Europe/Berlin"),
        ];
        let mut rules = RuleCache::default();
        let (writes, _) = plan_claim(&rows, now, &policy, &mut rules, Uuid::now_v7);
        assert_eq!(writes.fires.len(), rows.len());
        for ((row, fire), update) in rows.iter().zip(&writes.fires).zip(&writes.updates) {
            let rule = Rule::parse(&row.spec, now).unwrap();
            let own = plan_firing(&rule, row.next_run.unwrap(), now, MISSED_CAP);
            assert_eq!(fire.scheduled_for, own.scheduled_for, "{row:?}");
            assert_eq!(fire.input["missed"], own.missed, "{row:?}");
            assert_eq!(update.next_run, own.next_run, "{row:?}");
        }
        // The rows differ where they should: missed slots, and Berlin's 09:00 is 08:00 UTC.
        assert_eq!(writes.fires[2].input["missed"], 3);
        assert_eq!(writes.fires[0].input["missed"], 0);
        assert_eq!(
            writes.updates[4].next_run,
            Some("2026-11-27T08:00:00Z".parse().unwrap())
        );
        assert_eq!(
            writes.fires[5].scheduled_for,
            "2026-11-26T09:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
    }

    #[test]
    fn rules_are_parsed_once_per_definition_errors_included() {
        let now: DateTime<Utc> = "2026-11-26T12:00:00Z".parse().unwrap();
        let mut cache = RuleCache::default();
        assert!(cache.rule(&row("UTC"), now).is_ok());
        assert!(cache.rule(&row("UTC"), now).is_ok());
        assert_eq!(cache.rules.len(), 1, "the same definition is parsed once");
        // Another definition is parsed; its error is kept too.
        let error = cache.rule(&row("Mars/Olympus"), now).unwrap_err();
        assert_eq!(error, "timezone: unknown time zone \"Mars/Olympus\"");
        assert_eq!(cache.rule(&row("Mars/Olympus"), now).unwrap_err(), error);
        assert_eq!(cache.rules.len(), 2);
        // Any definition column makes another definition.
        let mut later = row("UTC");
        later.spec.created_at = "2026-01-02T00:00:00Z".parse().unwrap();
        assert!(cache.rule(&later, now).is_ok());
        assert_eq!(cache.rules.len(), 3);
        // A row the store found invalid is refused before the cache is looked at.
        let mut nulls = row("UTC");
        nulls.defect = Some("days: NULL is not a weekday (expected 0…7)".into());
        assert!(
            cache
                .rule(&nulls, now)
                .unwrap_err()
                .starts_with("days: NULL")
        );
        assert_eq!(cache.rules.len(), 3);
    }
}
