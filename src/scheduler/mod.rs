//! The schedule loop: sleep until something is due (the earliest `next_run`, a
//! notification, or the poll interval as a safety net), claim a batch of due schedules in
//! one short transaction, hand the runs to the runner, repeat.
//!
//! An idle wake-up costs one cheap query ([`due_summary`], which also marks the replica as
//! seen and says whether requests wait); the claim transaction runs only when that query
//! says schedules are due. Requests are claimed by their own loop ([`requests`]): neither
//! claim waits for, or fails with, the other, and the runner's slots are shared between
//! them ([`crate::runner::slots`]).

pub mod conversations;
pub mod listener;
pub mod plan;
pub mod queue;
pub mod requests;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{LeaseSettings, SchedulerSettings};
use crate::retry::Retry;
use crate::runner::Runner;
use crate::runner::slots::{Reservation, Source};
use crate::store::StoreError;
use crate::store::runs::{ClaimedRun, RunKind};
use crate::store::schedules::{
    ClaimTransaction, Heartbeat, NewScheduledRun, due_summary, return_ahead, start_ahead,
};
use crate::store::workers::{WorkerInfo, register_worker};
use listener::MIN_NOTIFIED_GAP;
use plan::{PlanEvent, RuleCache, plan_claim};

/// The schedule loop's service.
#[derive(Clone)]
pub struct Scheduler {
    pub pool: PgPool,
    pub runner: Runner,
    /// This replica, as registered (again, should the others forget it).
    pub worker: WorkerInfo,
    /// Other replicas not seen for this long are deleted from `agentd.workers`.
    pub forget_after: Duration,
    pub settings: SchedulerSettings,
    pub lease: LeaseSettings,
    pub max_backoff: Duration,
    /// Notified by the listener when schedules change.
    pub wake: Arc<Notify>,
    /// Notified when this loop's look finds requests waiting (the request loop's safety
    /// net when a notification was lost).
    pub requests: Arc<Notify>,
    /// Notified when this loop's look finds user messages waiting for a turn (the
    /// conversation loop's safety net).
    pub messages: Arc<Notify>,
}

/// Runs of slots claimed ahead of their instant, waiting for it in the slots reserved for
/// them.
struct Ahead<'a> {
    /// When to start it, on this process's clock: its instant, or the next attempt after a
    /// failed one.
    at: Instant,
    /// The instant, on this process's clock (for the lag).
    instant: Instant,
    /// Backoff between attempts when the database refuses the start.
    retry: Retry,
    /// The instant, on the database's clock (for the lag).
    scheduled_for: chrono::DateTime<chrono::Utc>,
    runs: Vec<ClaimedRun>,
    /// The slot records' runs as the claim planned them.
    planned: Vec<NewScheduledRun>,
    reservation: Reservation<'a>,
}

/// How close a batch claimed ahead may be to its instant for the scheduler to wait for it
/// and start it rather than begin another claim first.
const START_BEFORE_CLAIM: Duration = Duration::from_millis(100);

/// What the loop does after a look.
enum Next {
    /// Work may remain: look again at once.
    Again,
    /// Sleep up to this long (a notification ends it early).
    Sleep(Duration),
    /// Schedules are due but every slot is taken: sleep until a run ends (or this long).
    Room(Duration),
}

impl Scheduler {
    /// Claims and dispatches until `shutdown` fires; then returns at once (running runs are
    /// the runner's to finish).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut retry = Retry::up_to(self.max_backoff);
        let mut last_heartbeat: Option<Instant> = None;
        let mut freed = self.runner.slots().subscribe();
        // Parsed rules of the definitions seen so far.
        let mut rules = RuleCache::default();
        // Slots claimed ahead, earliest instant first.
        let mut ahead: Vec<Ahead<'_>> = Vec::new();
        while !shutdown.is_cancelled() {
            // A batch claimed ahead whose instant is about to come starts before the next
            // claim, which takes tens of milliseconds under load and would make it late
            // (the next second's slots come within fire_ahead at this second's instant).
            if let Some(first) = ahead.first().map(|batch| batch.at)
                && first <= Instant::now() + START_BEFORE_CLAIM
            {
                tokio::select! {
                    _ = tokio::time::sleep_until(first) => {}
                    _ = shutdown.cancelled() => continue,
                }
                self.start_due(&mut ahead).await;
            }
            freed.borrow_and_update();
            let last_look = Instant::now();
            let ticked = self.tick(&mut last_heartbeat, &mut rules, &mut ahead).await;
            ahead.sort_by_key(|batch| batch.at);
            let (sleep_for, room) = match ticked {
                Ok(Next::Again) => {
                    retry.succeeded();
                    continue;
                }
                Ok(Next::Sleep(sleep_for)) => {
                    retry.succeeded();
                    (sleep_for, false)
                }
                Ok(Next::Room(sleep_for)) => {
                    retry.succeeded();
                    (sleep_for, true)
                }
                Err(error) => {
                    crate::measure::database_error("claim");
                    let delay = retry.failed();
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "claim failed; retrying");
                    (delay, false)
                }
            };
            let next_instant = ahead.first().map(|batch| batch.at);
            tokio::select! {
                _ = tokio::time::sleep(sleep_for) => {}
                _ = self.wake.notified() => {
                    tokio::time::sleep_until(last_look + MIN_NOTIFIED_GAP).await;
                }
                _ = freed.changed(), if room => {}
                _ = tokio::time::sleep_until(next_instant.unwrap_or_else(Instant::now)), if next_instant.is_some() => {}
                _ = shutdown.cancelled() => {}
            }
            self.start_due(&mut ahead).await;
        }
        // Slots claimed ahead and not started go back to the fleet at once.
        let unstarted: Vec<Uuid> = ahead
            .iter()
            .flat_map(|batch| batch.runs.iter().map(|run| run.run_id))
            .collect();
        if !unstarted.is_empty() {
            match return_ahead(&self.pool, &unstarted).await {
                Ok(returned) => tracing::info!(
                    slots = returned,
                    "slots claimed ahead given back: another replica fires them"
                ),
                Err(error) => tracing::warn!(
                    error = %error,
                    slots = unstarted.len(),
                    "could not give back the slots claimed ahead; they fire once their lease ends"
                ),
            }
        }
        drop(ahead);
        self.runner.slots().set_waiting(Source::Schedules, false);
        tracing::info!("scheduler stopped claiming");
    }

    /// Starts the batches claimed ahead whose instant has come; `ahead` stays sorted.
    async fn start_due<'a>(&self, ahead: &mut Vec<Ahead<'a>>) {
        let mut early = Vec::new();
        while ahead
            .first()
            .is_some_and(|batch| batch.at <= Instant::now())
        {
            let batch = ahead.remove(0);
            early.extend(self.start_ahead(batch).await);
        }
        ahead.extend(early);
        ahead.sort_by_key(|batch| batch.at);
    }

    /// Creates the runs of slots claimed ahead, at their instant, and starts them in the
    /// slots reserved for them. A batch this process's clock woke a little before the
    /// database's instant comes back, to wait for the rest; so does one the database
    /// refused, to be tried again later while its lease lasts.
    async fn start_ahead<'a>(&self, mut batch: Ahead<'a>) -> Option<Ahead<'a>> {
        let sent_at = Instant::now();
        match start_ahead(&self.pool, &self.worker.id, self.lease.ttl, &batch.planned).await {
            Ok((now, created)) if created.is_empty() && now < batch.scheduled_for => {
                let early = (batch.scheduled_for - now).to_std().unwrap_or_default();
                batch.at = Instant::now() + early;
                batch.instant = batch.at;
                Some(batch)
            }
            Ok((_, created)) => {
                let created: std::collections::HashSet<Uuid> = created.into_iter().collect();
                // The instant was mapped to this process's clock at the claim.
                let lag = sent_at.saturating_duration_since(batch.instant);
                let dropped = batch.runs.len() - created.len();
                if dropped > 0 {
                    tracing::info!(
                        slots = dropped,
                        scheduled_for = %batch.scheduled_for,
                        "slots claimed ahead not started: their schedule changed before the instant, or the lease ended"
                    );
                }
                for run in batch.runs {
                    if created.contains(&run.run_id) {
                        crate::measure::scheduling_lag(lag);
                        self.runner.start(run, sent_at, &mut batch.reservation);
                    }
                }
                None
            }
            Err(error) => {
                crate::measure::database_error("start_ahead");
                // The slots stay this replica's until their lease ends, a lease's length
                // after the instant: try again then, without holding up the other batches
                // (a read-only spell, a failover). After that the reaper gives them back.
                if batch.instant.elapsed() >= self.lease.ttl {
                    tracing::warn!(error = %error, slots = batch.runs.len(), "could not start the slots claimed ahead before their lease ended; another replica fires them");
                    return None;
                }
                let delay = batch.retry.failed();
                tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "starting the slots claimed ahead failed; retrying");
                batch.at = Instant::now() + delay;
                Some(batch)
            }
        }
    }

    /// One look at the database, and a claim when schedules are due (or due within
    /// `scheduler.fire_ahead`) and a slot is free.
    async fn tick<'a>(
        &'a self,
        last_heartbeat: &mut Option<Instant>,
        rules: &mut RuleCache,
        ahead: &mut Vec<Ahead<'a>>,
    ) -> Result<Next, StoreError> {
        // The summary doubles as the replica's heartbeat (every lease.ttl / 3 at most).
        let heartbeat = last_heartbeat.is_none_or(|at| at.elapsed() >= self.lease.renew_interval());
        let summary = due_summary(
            &self.pool,
            heartbeat.then_some(Heartbeat {
                worker_id: &self.worker.id,
                forget_after: self.forget_after,
            }),
        )
        .await?;
        if heartbeat {
            *last_heartbeat = Some(Instant::now());
            for worker_id in &summary.forgotten {
                tracing::warn!(
                    forgotten_worker_id = %worker_id,
                    forget_after = ?self.forget_after,
                    "worker not seen for too long: removed from agentd.workers"
                );
            }
            if !summary.seen {
                tracing::warn!(
                    forget_after = ?self.forget_after,
                    "this worker went unseen for too long and was removed from agentd.workers; registering again"
                );
                register_worker(&self.pool, &self.worker).await?;
            }
        }
        if summary.requests_waiting {
            self.requests.notify_one();
        }
        if summary.messages_waiting {
            self.messages.notify_one();
        }
        // Sleep until the earliest next_run, within the poll interval. The summary was
        // read before this tick's claims: a claim moves a due schedule's next_run only
        // later, a next_run it plans is accounted for after the claim, and an earlier one
        // written by the application arrives with a notification.
        let fire_ahead = self.settings.fire_ahead;
        let until_due = summary
            .next_due
            .filter(|due| *due > summary.now)
            .and_then(|due| (due - summary.now).to_std().ok())
            .map(|until| until.saturating_sub(fire_ahead));
        let sleep_for = until_due.map_or(self.settings.poll_interval, |d| {
            d.min(self.settings.poll_interval)
        });
        let slots = self.runner.slots();
        if !summary.schedules_due(fire_ahead) {
            slots.set_waiting(Source::Schedules, false);
            return Ok(Next::Sleep(sleep_for));
        }
        slots.set_waiting(Source::Schedules, true);
        let mut reservation = slots.reserve(Source::Schedules, self.settings.batch_size);
        if reservation.is_empty() {
            return Ok(Next::Room(self.settings.poll_interval));
        }
        let limit = reservation.len();
        let claimed = self.claim_schedules(&mut reservation, rules, ahead).await?;
        if claimed.locked >= limit {
            return Ok(Next::Again);
        }
        slots.set_waiting(Source::Schedules, false);
        // Due rows were locked by other replicas or just claimed: look again soon. Rows not
        // due yet that the claim left alone (their previous run still runs: they are
        // claimed at their instant) wait for it.
        let soon = Duration::from_millis(50);
        let mut sleep_for = match summary.next_due {
            Some(due) if due > summary.now => (due - summary.now)
                .to_std()
                .unwrap_or(soon)
                .clamp(soon, self.settings.poll_interval.max(soon)),
            _ => sleep_for.min(soon),
        };
        // A schedule this claim planned (new, edited, enabled) may come before anything the
        // look saw, and the claim's own write wakes no one: wake for it as for any other.
        if let Some(until) = claimed.until_planned {
            sleep_for = sleep_for.min(until.saturating_sub(fire_ahead).max(soon));
        }
        Ok(Next::Sleep(sleep_for))
    }

    /// One claim transaction of at most `reservation.len()` schedules of each kind (due, to
    /// plan).
    async fn claim_schedules<'a>(
        &self,
        reservation: &mut Reservation<'a>,
        rules: &mut RuleCache,
        ahead: &mut Vec<Ahead<'a>>,
    ) -> Result<Claimed, StoreError> {
        let limit = reservation.len();
        let sent_at = Instant::now();
        let mut transaction = ClaimTransaction::begin(&self.pool).await?;
        let (now, rows) = transaction
            .lock_schedules(limit, self.settings.fire_ahead)
            .await?;
        if rows.is_empty() {
            transaction.commit().await?;
            return Ok(Claimed {
                locked: 0,
                until_planned: None,
            });
        }
        let (writes, events) = plan_claim(&rows, now, &self.settings, rules, Uuid::now_v7);
        let until_planned = events
            .iter()
            .filter_map(|event| match event {
                PlanEvent::Planned { next_run, .. } => Some(*next_run),
                PlanEvent::Fired { .. }
                | PlanEvent::Skipped { .. }
                | PlanEvent::Exhausted { .. }
                | PlanEvent::Invalid { .. } => None,
            })
            .min()
            .map(|next_run| (next_run - now).to_std().unwrap_or_default());
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
            .apply(&writes, &self.worker.id, self.lease.ttl)
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
        // Slots claimed ahead wait for their instant in slots of their own, by instant.
        let mut waiting: Vec<Ahead<'a>> = Vec::new();
        for new in writes.fires {
            if !fired.contains(&new.run_id) {
                continue;
            }
            let run = ClaimedRun {
                run_id: new.run_id,
                kind: RunKind::Agent,
                target_id: new.agent_id,
                owner_id: new.owner_id,
                input: Some(new.input.clone()),
                schedule_id: Some(new.schedule_id),
                // Absent: the agent was deleted; the runner's own read says so.
                agent: agent_ids
                    .binary_search(&new.agent_id)
                    .ok()
                    .and_then(|index| agents.get(index).cloned().flatten()),
                defect: None,
                turn: None,
            };
            if new.ahead {
                let batch = match waiting
                    .iter_mut()
                    .position(|batch| batch.scheduled_for == new.scheduled_for)
                {
                    Some(index) => &mut waiting[index],
                    None => {
                        let until = (new.scheduled_for - now).to_std().unwrap_or_default();
                        waiting.push(Ahead {
                            at: sent_at + until,
                            instant: sent_at + until,
                            retry: Retry::up_to(self.max_backoff),
                            scheduled_for: new.scheduled_for,
                            runs: Vec::new(),
                            planned: Vec::new(),
                            reservation: reservation.split_off(0),
                        });
                        waiting.last_mut().expect("just pushed")
                    }
                };
                batch.reservation.absorb(reservation.split_off(1));
                batch.runs.push(run);
                batch.planned.push(new);
                continue;
            }
            // start_time is the claim transaction's now().
            crate::measure::scheduling_lag((now - new.scheduled_for).to_std().unwrap_or_default());
            self.runner.start(run, sent_at, reservation);
        }
        // One batch per instant, however many claims it took: its runs are created in one
        // statement at the instant.
        for batch in waiting {
            match ahead
                .iter_mut()
                .find(|known| known.scheduled_for == batch.scheduled_for)
            {
                Some(known) => {
                    known.runs.extend(batch.runs);
                    known.planned.extend(batch.planned);
                    known.reservation.absorb(batch.reservation);
                }
                None => ahead.push(batch),
            }
        }
        Ok(Claimed {
            locked: rows.len(),
            until_planned,
        })
    }
}

/// What one claim transaction did, for the loop's next sleep.
struct Claimed {
    /// Schedules it locked.
    locked: usize,
    /// How long from the claim until the earliest `next_run` it planned for a new, edited
    /// or enabled schedule (`None`: it planned none).
    until_planned: Option<Duration>,
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
