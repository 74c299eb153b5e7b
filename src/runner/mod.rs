//! One run's life after the claim: execute it outside any transaction while its lease is
//! renewed, pipe its logs into the database, record its outcome, and end its lease, every
//! write fenced by the lease.
//!
//! A run stops early for one of three reasons ([`StopReason`]): its owner cancelled it, the
//! worker is shutting down past its grace period, or the lease was lost (the worker was cut
//! off or paused too long and another replica reaped the run). The first two are recorded
//! as `failed` with a reason; the last is not recorded at all, because the run is no longer
//! this worker's to write.

pub mod artifacts;
pub mod batch;
pub mod leases;
pub mod logs;
pub mod slots;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::postgres::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::executor::redact::Redactor;
use crate::executor::{ArtifactSink, Executors, LogSink, Outcome, RunContext, Usage};
use crate::store::agents::{AgentDefinition, TeamDefinition, load_agents, load_team};
use crate::store::runs::{
    ClaimedRun, Fenced, LogLine, RunKind, RunOutcome, finish_runs, storable_json, storable_text,
};
use crate::store::workers::HeldLease;
use artifacts::ArtifactOptions;
use batch::Batcher;
use logs::LogLimits;
use slots::{Reservation, Source};

/// What a run executes, loaded before it starts.
enum Target {
    Agent(AgentDefinition),
    Team(TeamDefinition),
}

impl Target {
    /// Warn lines for the run's logs: what the bounds on the target's rows left out.
    fn notices(&self) -> Vec<String> {
        match self {
            Target::Agent(agent) => agent.notices.clone(),
            Target::Team(team) => team
                .notices
                .iter()
                .cloned()
                .chain(team.members.iter().flat_map(|member| {
                    member
                        .notices
                        .iter()
                        .map(move |notice| format!("member {:?}: {notice}", member.name))
                }))
                .collect(),
        }
    }

    /// Why the target cannot run at all.
    fn defect(&self) -> Option<String> {
        match self {
            Target::Agent(agent) => agent.defect.clone(),
            Target::Team(team) => team.defect.clone().or_else(|| {
                team.members.iter().find_map(|member| {
                    member
                        .defect
                        .as_ref()
                        .map(|defect| format!("member {:?}: {defect}", member.name))
                })
            }),
        }
    }
}

/// Lines buffered between an executor and its log writer. A line waits behind the lines
/// queued before it, so this bounds how stale the newest stored line can be when a run prints
/// faster than the database stores (1,024 gave a `logs` visibility p50 of 355 ms, 128 gives
/// 190 ms, at the same rate: the batches stay full, see docs/benchmarks.md).
const LOG_CHANNEL_CAPACITY: usize = 128;

/// Most requests in one grouped load or outcome statement. One writer of each per replica:
/// fewer, larger statements cost the database less than several smaller ones in parallel.
const MAX_GROUP: usize = 1000;

/// `runs.resource_usage`: the executor's own figures and the runner's; a name in both keeps
/// the runner's value.
#[derive(serde::Serialize)]
struct UsageRecord<'a> {
    #[serde(flatten)]
    executor_figures: serde_json::Map<String, serde_json::Value>,
    duration_ms: u64,
    log_lines: u64,
    log_bytes: u64,
    log_lines_dropped: u64,
    log_bytes_dropped: u64,
    artifacts: u64,
    artifact_bytes: u64,
    artifacts_rejected: u64,
    executor: &'a str,
}

impl UsageRecord<'_> {
    /// The runner's figures, by name.
    const RUNNER_FIGURES: [&'static str; 9] = [
        "duration_ms",
        "log_lines",
        "log_bytes",
        "log_lines_dropped",
        "log_bytes_dropped",
        "artifacts",
        "artifact_bytes",
        "artifacts_rejected",
        "executor",
    ];

    /// As JSON text.
    fn render(mut self) -> String {
        self.executor_figures
            .retain(|name, _| !Self::RUNNER_FIGURES.contains(&name.as_str()));
        // Only strings, numbers and a map with string keys: serializing cannot fail.
        serde_json::to_string(&self).unwrap_or_else(|_| "{}".to_string())
    }
}

/// Why a run stopped before its executor finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Its owner asked (`cancel_run`).
    Cancelled,
    /// The worker is shutting down and the grace period is over.
    ShuttingDown,
    /// The lease is gone: the run is no longer this worker's.
    LeaseLost,
}

impl StopReason {
    /// `runs.error` for a run stopped for this reason.
    pub fn error(self) -> &'static str {
        match self {
            StopReason::Cancelled => "cancelled",
            StopReason::ShuttingDown => "worker shutting down",
            StopReason::LeaseLost => "lease lost",
        }
    }
}

/// Shared state of one running run: how it is stopped, and until when its lease is
/// certainly valid by this process's clock.
#[derive(Clone)]
pub struct RunControl {
    inner: Arc<ControlInner>,
}

struct ControlInner {
    cancel: CancellationToken,
    reason: OnceLock<StopReason>,
    lease_deadline: Mutex<Instant>,
    lost: AtomicBool,
    /// The executor has ended: the lease is no longer renewed, so the run's last writes
    /// happen within one lease and a run never stays `running` longer than that.
    executed: AtomicBool,
    write_failures: AtomicU32,
    /// Where the run came from: its slot is given back to that source.
    source: Source,
}

impl RunControl {
    fn new(lease_deadline: Instant, source: Source) -> RunControl {
        RunControl {
            inner: Arc::new(ControlInner {
                cancel: CancellationToken::new(),
                reason: OnceLock::new(),
                lease_deadline: Mutex::new(lease_deadline),
                lost: AtomicBool::new(false),
                executed: AtomicBool::new(false),
                write_failures: AtomicU32::new(0),
                source,
            }),
        }
    }

    /// Stops the run for `reason`; the first reason given wins.
    pub fn stop(&self, reason: StopReason) {
        let _ = self.inner.reason.set(reason);
        if reason == StopReason::LeaseLost {
            self.inner.lost.store(true, Ordering::SeqCst);
        }
        self.inner.cancel.cancel();
    }

    /// Marks the lease lost and stops the run.
    pub fn lose_lease(&self) {
        self.inner.lost.store(true, Ordering::SeqCst);
        self.stop(StopReason::LeaseLost);
    }

    /// The executor has ended: from now on the lease is not renewed.
    fn end_execution(&self) {
        self.inner.executed.store(true, Ordering::SeqCst);
    }

    /// Whether the executor is still executing (its lease is renewed).
    fn executing(&self) -> bool {
        !self.inner.executed.load(Ordering::SeqCst)
    }

    /// Whether the lease is known to be lost.
    pub fn lease_lost(&self) -> bool {
        self.inner.lost.load(Ordering::SeqCst)
    }

    /// Whether the lease has certainly expired by now (no renewal succeeded in time).
    pub fn lease_expired_locally(&self) -> bool {
        Instant::now() >= *self.deadline()
    }

    fn deadline(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.inner
            .lease_deadline
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn extend_lease(&self, until: Instant) {
        let mut deadline = self.deadline();
        if until > *deadline {
            *deadline = until;
        }
    }

    fn reason(&self) -> Option<StopReason> {
        self.inner.reason.get().copied()
    }

    fn note_write_failure(&self) -> u32 {
        self.inner.write_failures.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn reset_write_failures(&self) {
        self.inner.write_failures.store(0, Ordering::SeqCst);
    }
}

/// Executes claimed runs, at most `concurrency` at once.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<RunnerInner>,
}

/// A run's outcome and last lines, shared so that a retry sends them again without a copy.
type OutcomeRequest = (Uuid, Arc<RunOutcome>, Arc<[LogLine]>);

struct RunnerInner {
    pool: PgPool,
    worker_id: String,
    lease_ttl: Duration,
    max_backoff: Duration,
    concurrency: usize,
    run_timeout: Duration,
    log_limits: LogLimits,
    artifacts: ArtifactOptions,
    executors: Executors,
    /// Group commit of the hot-path statements (see [`batch`]).
    log_writer: logs::LogWriter,
    agent_loader: Batcher<Uuid, Option<AgentDefinition>>,
    outcome_writer: Batcher<OutcomeRequest, Fenced>,
    active: Mutex<HashMap<Uuid, RunControl>>,
    tracker: TaskTracker,
    /// The slots the sources of runs share.
    slots: slots::Slots,
}

/// What the runner needs to know, from settings.
#[derive(Clone)]
pub struct RunnerOptions {
    pub worker_id: String,
    pub lease_ttl: Duration,
    pub max_backoff: Duration,
    pub concurrency: usize,
    /// `execution.timeout`: longest a run may execute unless its executor has its own limit.
    pub run_timeout: Duration,
    pub log_limits: LogLimits,
    pub artifacts: ArtifactOptions,
}

impl Runner {
    /// A runner executing with `executors`.
    pub fn new(pool: PgPool, options: RunnerOptions, executors: Executors) -> Runner {
        let log_writer = logs::log_writer(pool.clone(), options.worker_id.clone());
        let agent_loader = {
            let pool = pool.clone();
            Batcher::spawn(1, MAX_GROUP, move |ids: Vec<Uuid>| {
                let pool = pool.clone();
                async move {
                    let agents = load_agents(&pool, &ids).await;
                    (ids, agents)
                }
            })
        };
        let outcome_writer = {
            let pool = pool.clone();
            let worker_id = options.worker_id.clone();
            Batcher::spawn(1, MAX_GROUP, move |outcomes: Vec<OutcomeRequest>| {
                let pool = pool.clone();
                let worker_id = worker_id.clone();
                async move {
                    let views: Vec<(Uuid, &RunOutcome, &[LogLine])> = outcomes
                        .iter()
                        .map(|(id, outcome, lines)| (*id, &**outcome, &**lines))
                        .collect();
                    let written = finish_runs(&pool, &worker_id, &views).await;
                    drop(views);
                    (outcomes, written)
                }
            })
        };
        Runner {
            inner: Arc::new(RunnerInner {
                log_writer,
                agent_loader,
                outcome_writer,
                pool,
                worker_id: options.worker_id,
                lease_ttl: options.lease_ttl,
                max_backoff: options.max_backoff,
                concurrency: options.concurrency.max(1),
                run_timeout: options.run_timeout,
                log_limits: options.log_limits,
                artifacts: options.artifacts,
                executors,
                active: Mutex::new(HashMap::new()),
                tracker: TaskTracker::new(),
                slots: slots::Slots::new(options.concurrency.max(1)),
            }),
        }
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, RunControl>> {
        self.inner
            .active
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs in flight.
    pub fn in_flight(&self) -> usize {
        self.active().len()
    }

    /// Room for more runs.
    pub fn free_slots(&self) -> usize {
        self.inner.slots.available()
    }

    /// The slots, for the sources of runs to reserve room in.
    pub fn slots(&self) -> &slots::Slots {
        &self.inner.slots
    }

    /// Ids of the runs whose executor is still executing: the heartbeat renews their
    /// leases. A run past its executor only writes its last lines and outcome, within the
    /// lease it holds.
    pub fn active_ids(&self) -> Vec<Uuid> {
        self.active()
            .iter()
            .filter(|(_, control)| control.executing())
            .map(|(run_id, _)| *run_id)
            .collect()
    }

    /// Starts executing a claimed run in one of the slots of `reservation`. `claimed_at` is
    /// when the claim was sent: the lease is certainly valid until `claimed_at + ttl`.
    pub fn start(&self, run: ClaimedRun, claimed_at: Instant, reservation: &mut Reservation<'_>) {
        if !reservation.occupy() {
            // Claimed beyond the reservation (never by the sources' own loops): the run is
            // leased to this worker, so it runs all the same.
            self.inner.slots.occupy_extra(reservation.source());
        }
        let control = RunControl::new(claimed_at + self.inner.lease_ttl, reservation.source());
        self.active().insert(run.run_id, control.clone());
        crate::measure::run_started(
            run.kind.as_str(),
            if run.schedule_id.is_some() {
                "schedule"
            } else {
                "request"
            },
        );
        let runner = self.clone();
        let span = tracing::info_span!(
            "run",
            run_id = %run.run_id,
            schedule_id = run.schedule_id.map(|id| id.to_string()),
        );
        // A panic in a run (a bug met by some tenant's input) fails that run alone: it is
        // recorded as failed and its slot freed, like any other outcome.
        self.inner.tracker.spawn(
            async move {
                let (run_id, kind) = (run.run_id, run.kind.as_str());
                let executed = AssertUnwindSafe(runner.execute(run, control.clone()))
                    .catch_unwind()
                    .await;
                if executed.is_err() {
                    tracing::error!("the run panicked; recording it as failed");
                    control.end_execution();
                    runner
                        .finish(
                            run_id,
                            kind,
                            &control,
                            Instant::now(),
                            Some(Outcome::Failed {
                                error: "agentd failed internally while running it (a panic; see the worker's logs)".into(),
                                output: None,
                            }),
                            None,
                            &Redactor::default(),
                            "none",
                            Default::default(),
                            Default::default(),
                        )
                        .await;
                }
            }
            .instrument(span),
        );
    }

    /// Stops every run in flight.
    pub fn stop_all(&self, reason: StopReason) {
        for control in self.active().values() {
            control.stop(reason);
        }
    }

    /// Applies a heartbeat's answer: extends the leases still held (renewal was sent at
    /// `sent_at`), stops runs whose owner asked to cancel, and abandons the runs missing
    /// from `held` that were in flight when the heartbeat was sent (`asked`).
    pub fn leases_renewed(&self, asked: &[Uuid], held: &[HeldLease], sent_at: Instant) {
        let active = self.active();
        for lease in held {
            if let Some(control) = active.get(&lease.run_id) {
                control.extend_lease(sent_at + self.inner.lease_ttl);
                if lease.cancel_requested && control.reason().is_none() {
                    tracing::info!(run_id = %lease.run_id, "cancellation requested");
                    control.stop(StopReason::Cancelled);
                }
            }
        }
        for run_id in asked {
            if !held.iter().any(|lease| lease.run_id == *run_id)
                && let Some(control) = active.get(run_id)
            {
                tracing::warn!(run_id = %run_id, "lease lost; abandoning the run");
                control.lose_lease();
            }
        }
    }

    /// Abandons runs whose lease has expired by this process's clock (heartbeats kept
    /// failing): they may already be another replica's.
    pub fn expire_overdue(&self) {
        for (run_id, control) in self.active().iter() {
            if control.lease_expired_locally() && !control.lease_lost() {
                tracing::warn!(run_id = %run_id, "lease expired without renewal; abandoning the run");
                control.lose_lease();
            }
        }
    }

    /// Waits until every started run has ended. Call after claiming has stopped.
    pub async fn wait_idle(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }

    async fn execute(&self, mut run: ClaimedRun, control: RunControl) {
        let started = Instant::now();
        let run_id = run.run_id;
        let kind = run.kind.as_str();
        let (sink, receiver) = LogSink::channel(LOG_CHANNEL_CAPACITY);
        let pipe = tokio::spawn(
            logs::run_pipe(
                self.inner.log_writer.clone(),
                run_id,
                control.clone(),
                receiver,
                self.inner.log_limits,
                self.inner.max_backoff,
            )
            .in_current_span(),
        );
        let (artifact_sink, artifact_receiver) = ArtifactSink::channel(16);
        let store = tokio::spawn(
            artifacts::run_store(
                self.inner.pool.clone(),
                run_id,
                self.inner.worker_id.clone(),
                control.clone(),
                artifact_receiver,
                self.inner.artifacts.clone(),
                sink.clone(),
            )
            .in_current_span(),
        );

        let target = match (run.defect.take(), run.kind, run.agent.take()) {
            (Some(defect), _, _) => Err(defect),
            (None, RunKind::Agent, Some(agent)) => Ok(Target::Agent(agent)),
            (None, RunKind::Agent, None) => self
                .load_agent(run.target_id, &control)
                .await
                .map(Target::Agent),
            (None, RunKind::Team, _) => self
                .load_team(run.target_id, &control)
                .await
                .map(Target::Team),
        };
        // What the bounds on the target's rows left out goes to the run's own logs; a
        // target that cannot run at all fails the run.
        let target = match target {
            Ok(target) => {
                for notice in target.notices() {
                    sink.log(crate::executor::Level::Warn, notice).await;
                }
                match target.defect() {
                    Some(defect) => Err(defect),
                    None => Ok(target),
                }
            }
            Err(error) => Err(error),
        };
        let target = match target {
            Ok(target) => target,
            Err(error) => {
                control.end_execution();
                drop((sink, artifact_sink));
                let _ = store.await;
                let (log_totals, log_tail) = pipe.await.unwrap_or_default();
                let outcome = Some(Outcome::Failed {
                    error,
                    output: None,
                });
                self.finish(
                    run_id,
                    kind,
                    &control,
                    started,
                    outcome,
                    None,
                    &Redactor::default(),
                    "none",
                    (log_totals, log_tail),
                    Default::default(),
                )
                .await;
                return;
            }
        };
        let (agent, team) = match target {
            Target::Agent(agent) => (Some(agent), None),
            Target::Team(team) => (None, Some(team)),
        };
        let redactor = Redactor::new(
            agent
                .iter()
                .chain(team.iter().flat_map(|team| team.members.iter()))
                .flat_map(|agent| agent.variables.iter())
                .filter_map(|variable| variable.value.as_deref()),
        );
        let executor = self
            .inner
            .executors
            .for_category(agent.as_ref().map(|agent| agent.category.as_str()))
            .clone();
        let (executor_name, timeout) = match &team {
            Some(_) => ("team", self.inner.run_timeout),
            None => (
                executor.name(),
                executor.timeout().unwrap_or(self.inner.run_timeout),
            ),
        };
        tracing::info!(
            executor = executor_name,
            kind = run.kind.as_str(),
            "run started"
        );
        let usage = Usage::default();
        let context = RunContext {
            run,
            agent,
            logs: sink,
            artifacts: artifact_sink,
            usage: usage.clone(),
        };
        let work: crate::executor::BoxFuture<'_, Outcome> = match &team {
            Some(team) => Box::pin(crate::team::run_team(
                team,
                &context.run,
                &self.inner.executors,
                &context.logs,
                &context.artifacts,
                self.inner.concurrency,
            )),
            None => executor.execute(&context),
        };
        let executed = tokio::select! {
            outcome = tokio::time::timeout(timeout, work) => Some(outcome.unwrap_or_else(|_| Outcome::Failed {
                error: format!("timed out: the run took longer than {}", humantime::format_duration(timeout)),
                output: None,
            })),
            _ = control.inner.cancel.cancelled() => None,
        };
        control.end_execution();
        drop(context);
        let artifact_totals = store.await.unwrap_or_default();
        let log = pipe.await.unwrap_or_default();

        let outcome = match (control.reason(), executed) {
            (Some(StopReason::LeaseLost), _) => None,
            (Some(reason), _) => Some(Outcome::Failed {
                error: reason.error().to_string(),
                output: None,
            }),
            (None, Some(outcome)) => Some(outcome),
            (None, None) => Some(Outcome::Failed {
                error: StopReason::Cancelled.error().to_string(),
                output: None,
            }),
        };
        self.finish(
            run_id,
            kind,
            &control,
            started,
            outcome,
            Some(usage),
            &redactor,
            executor.name(),
            log,
            artifact_totals,
        )
        .await;
    }

    /// Reads the agent of an agent run; a missing agent is an error for the run.
    async fn load_agent(
        &self,
        agent_id: Uuid,
        control: &RunControl,
    ) -> Result<AgentDefinition, String> {
        self.load_target("agent", agent_id, control, || {
            self.inner.agent_loader.call(agent_id)
        })
        .await
    }

    /// Reads the team of a team run with its members; a missing team is an error.
    async fn load_team(
        &self,
        team_id: Uuid,
        control: &RunControl,
    ) -> Result<TeamDefinition, String> {
        self.load_target("team", team_id, control, || {
            load_team(&self.inner.pool, team_id)
        })
        .await
    }

    /// Loads a run's target, retrying while the database is unreachable and the lease is
    /// valid.
    async fn load_target<T, F, Fut>(
        &self,
        what: &str,
        id: Uuid,
        control: &RunControl,
        load: F,
    ) -> Result<T, String>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, crate::store::StoreError>>,
    {
        let mut attempt = 0;
        loop {
            match load().await {
                Ok(Some(target)) => return Ok(target),
                Ok(None) => return Err(format!("{what} {id} does not exist (any more)")),
                Err(error) if !control.lease_expired_locally() && !control.lease_lost() => {
                    crate::measure::database_error("load_target");
                    attempt += 1;
                    let delay = crate::store::backoff_delay(attempt, self.inner.max_backoff);
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "loading the run's {what} failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(error) => return Err(format!("could not load {what} {id}: {error}")),
            }
        }
    }

    /// Records the outcome with the run's last log lines (unless the lease was lost) and
    /// frees the run's slot. `log` is what the log pipe wrote and what it left for this.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        run_id: Uuid,
        kind: &'static str,
        control: &RunControl,
        started: Instant,
        outcome: Option<Outcome>,
        usage: Option<Usage>,
        redactor: &Redactor,
        executor: &str,
        log: (logs::LogTotals, Vec<LogLine>),
        artifact_totals: artifacts::ArtifactTotals,
    ) {
        let (mut log_totals, log_tail) = log;
        // The last lines are written with the outcome: count them as stored.
        let tail_bytes: usize = log_tail.iter().map(|line| line.message.len()).sum();
        let tail_lines = log_tail.len();
        log_totals.lines += tail_lines as u64;
        log_totals.bytes += tail_bytes as u64;
        if let Some(outcome) = outcome.filter(|_| !control.lease_lost()) {
            let usage = UsageRecord {
                executor_figures: usage.map(|usage| usage.take()).unwrap_or_default(),
                duration_ms: started.elapsed().as_millis() as u64,
                log_lines: log_totals.lines,
                log_bytes: log_totals.bytes,
                log_lines_dropped: log_totals.dropped_lines,
                log_bytes_dropped: log_totals.dropped_bytes,
                artifacts: artifact_totals.count,
                artifact_bytes: artifact_totals.bytes,
                artifacts_rejected: artifact_totals.rejected,
                executor,
            }
            .render();
            let status = match outcome {
                Outcome::Completed { .. } => "completed",
                Outcome::Failed { .. } => "failed",
            };
            // What the run produced, as the database can hold it.
            let record = match outcome {
                Outcome::Completed { output } => RunOutcome {
                    completed: true,
                    output: Some(storable_json(output)),
                    error: None,
                    resource_usage: Some(usage),
                },
                Outcome::Failed { error, output } => RunOutcome {
                    completed: false,
                    output: output.map(storable_json),
                    error: Some(storable_text(error)),
                    resource_usage: Some(usage),
                },
            };
            if self
                .record(run_id, control, Arc::new(record), log_tail.into(), redactor)
                .await
            {
                crate::measure::run_finished(kind, status, started.elapsed());
                crate::measure::log_lines_written(tail_lines, tail_bytes);
            }
        } else {
            tracing::warn!(
                "run abandoned: its lease was lost, so another replica owns its outcome"
            );
        }
        let ended = self.active().remove(&run_id);
        if let Some(control) = ended {
            crate::measure::run_ended();
            self.inner.slots.release_running(control.inner.source);
        }
    }

    /// Writes the outcome and the run's last lines, retrying with backoff while the database
    /// is unreachable and the lease is still valid. Returns whether it was written.
    ///
    /// An outcome the database refuses for its data (SQLSTATE classes 22 and 23) is not sent
    /// again: the run is recorded as failed with the database's reason instead, without
    /// output or last lines. Whatever the database answers, the lease is no longer renewed,
    /// so the run ends within one lease.
    async fn record(
        &self,
        run_id: Uuid,
        control: &RunControl,
        mut outcome: Arc<RunOutcome>,
        mut last_lines: Arc<[LogLine]>,
        redactor: &Redactor,
    ) -> bool {
        let mut attempt = 0;
        let mut refused_once = false;
        loop {
            match self
                .inner
                .outcome_writer
                .call((run_id, Arc::clone(&outcome), Arc::clone(&last_lines)))
                .await
            {
                Ok(Fenced::Written) => {
                    tracing::info!(
                        status = if outcome.completed {
                            "completed"
                        } else {
                            "failed"
                        },
                        error = outcome.error.as_deref().map(|error| redactor.redact(error)),
                        "run finished"
                    );
                    return true;
                }
                Ok(Fenced::LeaseLost) => {
                    tracing::warn!("outcome refused: this worker no longer holds the run's lease");
                    control.lose_lease();
                    return false;
                }
                Err(error) if error.is_data_error() && !refused_once => {
                    crate::measure::database_error("record_outcome");
                    tracing::warn!(
                        sqlstate = error.sqlstate(),
                        "the database refused the run's outcome; recording the run as failed instead"
                    );
                    refused_once = true;
                    let reason = crate::schedule::quoted(&error.to_string());
                    outcome = Arc::new(RunOutcome {
                        completed: false,
                        output: None,
                        error: Some(storable_text(format!(
                            "the run's outcome could not be stored: {}",
                            redactor.redact(&reason)
                        ))),
                        resource_usage: None,
                    });
                    last_lines = Arc::from(Vec::new());
                }
                Err(error) if error.is_data_error() => {
                    crate::measure::database_error("record_outcome");
                    tracing::error!(
                        sqlstate = error.sqlstate(),
                        "the database refused even the failure record; the run's lease will expire and it will be recorded as lost"
                    );
                    return false;
                }
                Err(error) => {
                    crate::measure::database_error("record_outcome");
                    if control.lease_expired_locally() {
                        tracing::warn!(error = %error, "outcome not recorded: the database stayed unreachable until the lease expired");
                        return false;
                    }
                    attempt += 1;
                    let delay = crate::store::backoff_delay(attempt, self.inner.max_backoff);
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "recording the outcome failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_record_has_every_figure_once_the_runners_winning() {
        let mut executor_figures = serde_json::Map::new();
        executor_figures.insert("tokens".into(), serde_json::json!(42));
        executor_figures.insert("duration_ms".into(), serde_json::json!("executor's"));
        executor_figures.insert("executor".into(), serde_json::json!("executor's"));
        let text = UsageRecord {
            executor_figures,
            duration_ms: 7,
            log_lines: 1,
            log_bytes: 2,
            log_lines_dropped: 3,
            log_bytes_dropped: 4,
            artifacts: 5,
            artifact_bytes: 6,
            artifacts_rejected: 8,
            executor: "builtin",
        }
        .render();
        assert_eq!(text.matches("\"duration_ms\"").count(), 1, "{text}");
        assert_eq!(text.matches("\"executor\"").count(), 1, "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        // The names the executor's figures give way to are exactly the record's own.
        let mut own: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|name| *name != "tokens")
            .collect();
        own.sort_unstable();
        let mut listed = UsageRecord::RUNNER_FIGURES.to_vec();
        listed.sort_unstable();
        assert_eq!(own, listed);
        assert_eq!(
            value,
            serde_json::json!({
                "tokens": 42, "duration_ms": 7, "log_lines": 1, "log_bytes": 2,
                "log_lines_dropped": 3, "log_bytes_dropped": 4, "artifacts": 5,
                "artifact_bytes": 6, "artifacts_rejected": 8, "executor": "builtin",
            })
        );
    }
}
