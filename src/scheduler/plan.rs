//! What a claim does with the schedules it locked: pure, so every rule of schedules.md's
//! "Firing" can be tested without a database. Input: the locked rows, the database's `now`
//! and the policies; output: the writes of the claim and one event per schedule for the
//! logs.

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use crate::config::{MisfirePolicy, OverlapPolicy, SchedulerSettings};
use crate::schedule::{Rule, plan_firing};
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

/// Plans a claim. `new_id` makes run ids (UUIDv7 in production).
pub fn plan_claim(
    rows: &[LockedSchedule],
    now: DateTime<Utc>,
    policy: &SchedulerSettings,
    mut new_id: impl FnMut() -> Uuid,
) -> (ClaimWrites, Vec<PlanEvent>) {
    let mut writes = ClaimWrites::default();
    let mut events = Vec::with_capacity(rows.len());
    let misfire_grace =
        chrono::Duration::from_std(policy.misfire_grace).unwrap_or(chrono::Duration::MAX);

    for row in rows {
        let parsed = if row.days_has_null {
            Err("days: NULL is not a weekday (expected 0…7)".to_string())
        } else {
            Rule::parse(&row.spec, now).map_err(|error| error.to_string())
        };
        let rule = match parsed {
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
                    definition_hash: row.definition_hash.clone(),
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
            // New or edited: the first slot strictly after now.
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

        let firing = plan_firing(&rule, due, now, MISSED_CAP);
        let late = now - firing.scheduled_for;
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
        definition_hash: row.definition_hash.clone(),
        state: ScheduleState::Exhausted,
    });
}
