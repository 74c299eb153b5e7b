//! The claim loop: sleep until something is due (the earliest `next_run`, a notification,
//! or the poll interval as a safety net), claim a batch in one short transaction, hand the
//! runs to the runner, repeat.
//!
//! An idle wake-up costs one cheap query ([`due_summary`], which also marks the replica as
//! seen); the claim transaction runs only when that query says work is waiting. Requests
//! are claimed before schedules.

pub mod listener;
pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{LeaseSettings, SchedulerSettings};
use crate::runner::Runner;
use crate::store::StoreError;
use crate::store::runs::{ClaimedRun, RunKind, claim_requests};
use crate::store::schedules::{ClaimTransaction, due_summary};
use plan::{PlanEvent, RuleCache, plan_claim};

/// The scheduler service.
pub struct Scheduler {
    pub pool: PgPool,
    pub runner: Runner,
    pub worker_id: String,
    pub settings: SchedulerSettings,
    pub lease: LeaseSettings,
    pub max_backoff: Duration,
    /// Notified by the listener when schedules or requests change.
    pub wake: Arc<Notify>,
    /// Parsed rules of the definitions seen so far.
    pub rules: std::sync::Mutex<RuleCache>,
}

impl Scheduler {
    /// Claims and dispatches until `shutdown` fires; then returns at once (running runs are
    /// the runner's to finish).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        let mut last_heartbeat: Option<Instant> = None;
        while !shutdown.is_cancelled() {
            if self.runner.free_slots() == 0 {
                // Full: wait for a run to end (the poll interval keeps it responsive).
                tokio::select! {
                    _ = self.runner.slot_freed() => {}
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
            let sleep_for = match self.tick(&mut last_heartbeat).await {
                Ok(Some(sleep_for)) => {
                    failures = 0;
                    sleep_for
                }
                Ok(None) => {
                    failures = 0;
                    continue;
                }
                Err(error) => {
                    failures += 1;
                    crate::measure::database_error("claim");
                    let delay = crate::store::backoff_delay(failures, self.max_backoff);
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "claim failed; retrying");
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep_for) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.cancelled() => {}
            }
        }
        tracing::info!("scheduler stopped claiming");
    }

    /// One look at the database. `Ok(None)`: work may remain, look again at once;
    /// `Ok(Some(d))`: sleep up to `d` (a notification or a freed slot ends it early).
    async fn tick(
        &self,
        last_heartbeat: &mut Option<Instant>,
    ) -> Result<Option<Duration>, StoreError> {
        let free = self.runner.free_slots();
        // The summary doubles as the replica's heartbeat (every lease.ttl / 3 at most).
        let heartbeat = last_heartbeat.is_none_or(|at| at.elapsed() >= self.lease.renew_interval());
        let summary = due_summary(&self.pool, heartbeat.then_some(self.worker_id.as_str())).await?;
        if heartbeat {
            *last_heartbeat = Some(Instant::now());
        }
        let limit = free.min(self.settings.batch_size);
        let mut claimed_full_batch = false;

        if summary.requests_waiting {
            let sent_at = Instant::now();
            let runs = claim_requests(&self.pool, limit, &self.worker_id, self.lease.ttl).await?;
            claimed_full_batch |= runs.len() == limit;
            crate::measure::claim_batch(runs.len());
            for run in runs {
                tracing::info!(run_id = %run.run_id, kind = run.kind.as_str(), target_id = %run.target_id, "request claimed");
                self.runner.start(run, sent_at);
            }
        }
        let free = self.runner.free_slots();
        if summary.schedules_due() && free > 0 {
            let limit = free.min(self.settings.batch_size);
            claimed_full_batch |= self.claim_schedules(limit).await? == limit;
        }
        if claimed_full_batch {
            return Ok(None);
        }
        // Sleep until the earliest next_run, within the poll interval. The summary was
        // read before this tick's claims; a claim only moves next_run later, and an
        // earlier one arrives with a notification.
        let until_due = summary
            .next_due
            .filter(|due| *due > summary.now)
            .and_then(|due| (due - summary.now).to_std().ok());
        let sleep_for = until_due.map_or(self.settings.poll_interval, |d| {
            d.min(self.settings.poll_interval)
        });
        if summary.schedules_due() {
            // Due rows were locked by other replicas or just claimed: look again soon.
            return Ok(Some(sleep_for.min(Duration::from_millis(50))));
        }
        Ok(Some(sleep_for))
    }

    /// One claim transaction; returns how many schedules it locked.
    async fn claim_schedules(&self, limit: usize) -> Result<usize, StoreError> {
        let sent_at = Instant::now();
        let mut transaction = ClaimTransaction::begin(&self.pool).await?;
        let (now, rows) = transaction.lock_schedules(limit).await?;
        if rows.is_empty() {
            transaction.commit().await?;
            return Ok(0);
        }
        let (writes, events) = {
            let mut rules = self
                .rules
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            plan_claim(&rows, now, &self.settings, &mut rules, Uuid::now_v7)
        };
        // The agents of the runs, read here: the runs start without a round trip of their own.
        let mut agent_ids: Vec<Uuid> = writes.fires.iter().map(|fire| fire.agent_id).collect();
        agent_ids.sort_unstable();
        agent_ids.dedup();
        let agents = if agent_ids.is_empty() {
            Vec::new()
        } else {
            transaction.load_agents(&agent_ids).await?
        };
        let fired = transaction
            .apply(&writes, &self.worker_id, self.lease.ttl)
            .await?;
        transaction.commit().await?;
        crate::measure::claim_batch(rows.len());

        // Slots fired before are left out of `fired`.
        let fired: std::collections::HashSet<Uuid> =
            fired.iter().map(|fired| fired.run_id).collect();
        for event in &events {
            log_event(event, &fired);
        }
        // Everything the runs need is in hand: no query between the commit and the start,
        // so a connection lost right after the commit cannot strand committed runs.
        for new in writes.fires {
            if fired.contains(&new.run_id) {
                // start_time is the claim transaction's now().
                crate::measure::scheduling_lag(
                    (now - new.scheduled_for).to_std().unwrap_or_default(),
                );
                self.runner.start(
                    ClaimedRun {
                        run_id: new.run_id,
                        kind: RunKind::Agent,
                        target_id: new.agent_id,
                        owner_id: new.owner_id,
                        input: Some(new.input),
                        schedule_id: Some(new.schedule_id),
                        // Absent: the agent was deleted; the runner's own read says so.
                        agent: agent_ids
                            .binary_search(&new.agent_id)
                            .ok()
                            .and_then(|index| agents.get(index).cloned().flatten()),
                        defect: None,
                    },
                    sent_at,
                );
            }
        }
        Ok(rows.len())
    }
}

fn log_event(event: &PlanEvent, fired: &std::collections::HashSet<Uuid>) {
    match event {
        PlanEvent::Fired {
            schedule_id,
            run_id,
            scheduled_for,
            missed,
            next_run,
        } => {
            if fired.contains(run_id) {
                crate::measure::schedule_fired();
                tracing::info!(
                    schedule_id = %schedule_id,
                    run_id = %run_id,
                    scheduled_for = %scheduled_for,
                    missed,
                    next_run = next_run.map(|t| t.to_string()),
                    "schedule fired"
                );
            } else {
                tracing::info!(
                    schedule_id = %schedule_id,
                    scheduled_for = %scheduled_for,
                    "slot already fired; not firing it again"
                );
            }
        }
        PlanEvent::Skipped {
            schedule_id,
            scheduled_for,
            reason,
            next_run,
        } => {
            crate::measure::schedule_skipped(reason.as_str());
            tracing::info!(
                schedule_id = %schedule_id,
                scheduled_for = %scheduled_for,
                reason = reason.as_str(),
                next_run = next_run.map(|t| t.to_string()),
                "schedule slot skipped"
            )
        }
        PlanEvent::Planned {
            schedule_id,
            next_run,
            replaced_unusable: false,
        } => tracing::info!(schedule_id = %schedule_id, next_run = %next_run, "schedule planned"),
        PlanEvent::Planned {
            schedule_id,
            next_run,
            replaced_unusable: true,
        } => tracing::warn!(
            schedule_id = %schedule_id,
            next_run = %next_run,
            "schedule planned anew: its next_run was outside the years 1 to 9999"
        ),
        PlanEvent::Exhausted { schedule_id } => {
            tracing::info!(schedule_id = %schedule_id, "schedule has no further slot")
        }
        PlanEvent::Invalid {
            schedule_id,
            report_run_id,
            error,
        } => {
            crate::measure::schedule_invalid();
            tracing::warn!(
                schedule_id = %schedule_id,
                run_id = %report_run_id,
                error = %error,
                "invalid schedule; reported to its owner, ignored until its definition changes"
            )
        }
    }
}
