//! One run's life after the claim: load its target, execute it outside any transaction
//! while its lease is renewed, pipe its logs and artifacts into the database, record its
//! outcome, and end its lease, every write fenced by the lease.
//!
//! The runner does not know what a target is beyond loading it: the executors pick the
//! executor of an agent or of a team ([`Executors::for_target`]).
//!
//! A run stops early for one of three reasons ([`StopReason`]): its owner cancelled it, the
//! worker is shutting down past its grace period, or the lease was lost (the worker was cut
//! off or paused too long and another replica reaped the run). The first two are recorded
//! as `failed` with a reason; the last is not recorded at all, because the run is no longer
//! this worker's to write.

pub mod artifacts;
pub mod batch;
pub mod control;
pub mod leases;
pub mod logs;
pub mod outcome;
pub mod reply;
pub mod slots;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::postgres::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

pub use control::{RunControl, StopReason};

use crate::artifact_store::ArtifactStore;
use crate::domain::{ClaimedRun, Conversation, RunKind, Target, Turn};
use crate::executor::redact::Redactor;
use crate::executor::{
    ArtifactSink, Executors, Level, LogSink, Outcome, ReplySink, RunContext, Usage,
};
use crate::retry::Retry;
use crate::store::agents::{load_agents, load_team};
use crate::store::conversations::{ReplyEnd, load_history, write_replies};
use crate::store::runs::LogLine;
use crate::store::workers::HeldLease;
use batch::Batcher;
use logs::LogLimits;
use outcome::{Recorder, UsageRecord, run_outcome};
use slots::Reservation;

/// Lines buffered between an executor and its log writer. A line waits behind the lines
/// queued before it, so this bounds how stale the newest stored line can be when a run
/// prints faster than the database stores (docs/benchmarks.md has the measurements).
const LOG_CHANNEL_CAPACITY: usize = 128;

/// Most agents in one grouped load. One loader per replica: fewer, larger statements cost
/// the database less than several smaller ones in parallel.
const MAX_GROUP: usize = 1000;

/// Executes claimed runs, as many at once as the slots allow.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<RunnerInner>,
}

struct RunnerInner {
    pool: PgPool,
    worker_id: String,
    lease_ttl: Duration,
    max_backoff: Duration,
    run_timeout: Duration,
    log_limits: LogLimits,
    artifacts: ArtifactStore,
    executors: Executors,
    /// Group commit of the hot-path statements (see [`batch`]).
    log_writer: logs::LogWriter,
    artifact_writer: artifacts::ArtifactWriter,
    agent_loader: Batcher<Uuid, Option<crate::domain::AgentDefinition>>,
    recorder: Recorder,
    reply_writer: reply::ReplyWriter,
    turns: TurnOptions,
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
    /// `worker.max_runs`: most runs at once (fewer when the executors allow fewer).
    pub concurrency: usize,
    /// `execution.timeout`: longest a run may execute unless its executor has its own limit.
    pub run_timeout: Duration,
    pub log_limits: LogLimits,
    pub artifacts: ArtifactStore,
    pub turns: TurnOptions,
}

/// How conversation turns run (from `[conversations]`).
#[derive(Debug, Clone, Copy)]
pub struct TurnOptions {
    pub history_messages: usize,
    pub history_bytes: usize,
    pub stream_interval: Duration,
}

/// How a run's execution ended, with what its log pipe and artifact store did.
struct Ended {
    /// `None`: the lease was lost, nothing is recorded.
    outcome: Option<Outcome>,
    started: Instant,
    /// How long the run held its slot, from its start (`None`: given back only at the end).
    slot: Option<Duration>,
    usage: Usage,
    executor: &'static str,
    redactor: Redactor,
    log: (logs::LogTotals, Vec<LogLine>),
    artifacts: artifacts::ArtifactTotals,
    /// The turn the run answers, with the text its executor streamed.
    turn: Option<(Turn, ReplySink)>,
}

impl Ended {
    /// A run that fails before an executor ran (its target could not be loaded, or the
    /// runner itself failed).
    fn before_executing(error: String) -> Ended {
        Ended {
            outcome: Some(Outcome::Failed {
                error,
                output: None,
            }),
            started: Instant::now(),
            slot: None,
            usage: Usage::default(),
            executor: "none",
            redactor: Redactor::default(),
            log: Default::default(),
            artifacts: Default::default(),
            turn: None,
        }
    }
}

impl Runner {
    /// A runner executing with `executors` (teams included: see [`Executors::with_teams`]).
    pub fn new(pool: PgPool, options: RunnerOptions, executors: Executors) -> Runner {
        // The claim takes no more than the executors can start: with every agent on one
        // executor, the smaller of its limit and the replica's.
        let concurrency = options
            .concurrency
            .min(executors.capacity().unwrap_or(usize::MAX))
            .max(1);
        let log_writer = logs::log_writer(pool.clone(), options.worker_id.clone());
        let artifact_writer = artifacts::artifact_writer(pool.clone(), options.worker_id.clone());
        let agent_loader = {
            let pool = pool.clone();
            Batcher::spawn(1, MAX_GROUP, move |ids: Vec<Uuid>| {
                let pool = pool.clone();
                async move {
                    let agents = load_agents(crate::store::exec::on(&pool), &ids).await;
                    (ids, agents)
                }
            })
        };
        let recorder = Recorder::new(pool.clone(), options.worker_id.clone(), options.max_backoff);
        let reply_writer = {
            let (pool, worker_id) = (pool.clone(), options.worker_id.clone());
            Batcher::spawn(1, reply::MAX_GROUP, move |replies: Vec<_>| {
                let (pool, worker_id) = (pool.clone(), worker_id.clone());
                async move {
                    let written = write_replies(&pool, &worker_id, &replies).await;
                    (replies, written)
                }
            })
        };
        Runner {
            inner: Arc::new(RunnerInner {
                log_writer,
                artifact_writer,
                agent_loader,
                recorder,
                reply_writer,
                turns: options.turns,
                pool,
                worker_id: options.worker_id,
                lease_ttl: options.lease_ttl,
                max_backoff: options.max_backoff,
                run_timeout: options.run_timeout,
                log_limits: options.log_limits,
                artifacts: options.artifacts,
                executors: executors.with_teams(concurrency, options.run_timeout),
                active: Mutex::new(HashMap::new()),
                tracker: TaskTracker::new(),
                slots: slots::Slots::new(concurrency),
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

    /// Most runs at once (`worker.max_runs`, or fewer when the executors allow fewer).
    pub fn capacity(&self) -> usize {
        self.inner.slots.capacity()
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
            } else if run.turn.is_some() {
                "message"
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
                let turn = run.turn.clone();
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
                            Ended {
                                turn: turn.map(|turn| (turn, ReplySink::default())),
                                ..Ended::before_executing(
                                    "agentd failed internally while running it (a panic; see the worker's logs)".into(),
                                )
                            },
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
        let turn = run.turn.clone();
        let reply = ReplySink::default();
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
                self.inner.artifact_writer.clone(),
                run_id,
                control.clone(),
                artifact_receiver,
                self.inner.artifacts.clone(),
                sink.clone(),
            )
            .in_current_span(),
        );

        // What the bounds on the target's rows left out goes to the run's own logs; a
        // target that cannot run at all fails the run. A turn also reads its history.
        let target = match self.target(&mut run, &control).await {
            Ok(target) => {
                for notice in target.notices() {
                    sink.log(Level::Warn, notice).await;
                }
                match (target.defect(), &turn) {
                    (Some(defect), _) => Err(defect),
                    (None, Some(turn)) => self
                        .conversation(turn, &control)
                        .await
                        .map(|conversation| (target, Some(conversation))),
                    (None, None) => Ok((target, None)),
                }
            }
            Err(error) => Err(error),
        };
        let turn = turn.map(|turn| (turn, reply.clone()));
        let (target, conversation) = match target {
            Ok(target) => target,
            Err(error) => {
                control.end_execution();
                self.free_slot(&control);
                let slot = Some(control.in_slot_for());
                drop((sink, artifact_sink));
                let artifacts = store.await.unwrap_or_default();
                let log = pipe.await.unwrap_or_default();
                let ended = Ended {
                    started,
                    slot,
                    log,
                    artifacts,
                    turn,
                    ..Ended::before_executing(error)
                };
                self.finish(run_id, kind, &control, ended).await;
                return;
            }
        };
        let redactor = Redactor::new(target.secrets());
        let executor = self.inner.executors.for_target(&target);
        let timeout = executor.timeout().unwrap_or(self.inner.run_timeout);
        tracing::info!(executor = executor.name(), kind, "run started");
        // A turn's reply streams into its row while the executor runs.
        let streamed = CancellationToken::new();
        let streamer = turn.as_ref().map(|(turn, reply)| {
            tokio::spawn(
                reply::stream(
                    self.inner.reply_writer.clone(),
                    run_id,
                    reply.clone(),
                    control.clone(),
                    self.inner.turns.stream_interval,
                    (turn.waited, started),
                    streamed.clone(),
                )
                .in_current_span(),
            )
        });
        let context = RunContext {
            run,
            target,
            logs: sink,
            artifacts: artifact_sink,
            usage: Usage::default(),
            conversation,
            reply,
        };
        let executed = tokio::select! {
            outcome = tokio::time::timeout(timeout, executor.execute(&context)) => Some(outcome.unwrap_or_else(|_| Outcome::Failed {
                error: format!("timed out: the run took longer than {}", humantime::format_duration(timeout)),
                output: None,
            })),
            _ = control.stopped() => None,
        };
        control.end_execution();
        self.free_slot(&control);
        let slot = Some(control.in_slot_for());
        streamed.cancel();
        if let Some(streamer) = streamer {
            let _ = streamer.await;
        }
        // The run's senders go now, so its log pipe and artifact store can finish.
        let RunContext {
            usage,
            logs,
            artifacts,
            ..
        } = context;
        drop((logs, artifacts));
        let artifacts = store.await.unwrap_or_default();
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
        let ended = Ended {
            outcome,
            started,
            slot,
            usage,
            executor: executor.name(),
            redactor,
            log,
            artifacts,
            turn,
        };
        self.finish(run_id, kind, &control, ended).await;
    }

    /// A turn's conversation: its history, read (retrying while the database is
    /// unreachable and the lease is valid) and cut to the budget.
    async fn conversation(
        &self,
        turn: &Turn,
        control: &RunControl,
    ) -> Result<Conversation, String> {
        let options = self.inner.turns;
        let mut retry = Retry::up_to(self.inner.max_backoff);
        loop {
            match load_history(
                &self.inner.pool,
                turn,
                options.history_messages,
                options.history_bytes,
            )
            .await
            {
                Ok(stored) => {
                    return Ok(Conversation {
                        id: turn.conversation_id,
                        messages: crate::conversation::cut_history(
                            stored,
                            options.history_messages,
                            options.history_bytes,
                        ),
                    });
                }
                Err(error) if !control.lease_expired_locally() && !control.lease_lost() => {
                    crate::measure::database_error("load_history");
                    let delay = retry.failed();
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "loading the conversation failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(error) => return Err(format!("could not load the conversation: {error}")),
            }
        }
    }

    /// Writes a turn's final reply (retrying while the lease is valid). Returns the
    /// outcome to record: a turn a newer message interrupted says so.
    async fn finish_turn(
        &self,
        run_id: Uuid,
        control: &RunControl,
        (_, reply): &(Turn, ReplySink),
        outcome: Outcome,
    ) -> Outcome {
        let last = reply::final_reply(run_id, &outcome, reply.text(), control.reason());
        let mut retry = Retry::up_to(self.inner.max_backoff);
        loop {
            match crate::store::conversations::finish_reply(
                &self.inner.pool,
                &self.inner.worker_id,
                &last,
            )
            .await
            {
                // As the reply's status says: a turn interrupted is one the interruption
                // stopped (cancelled); one that had completed or failed by itself stays so.
                Ok(ReplyEnd::Ended { interrupted: true }) if last.status == "cancelled" => {
                    crate::measure::turn_finished("interrupted");
                    return Outcome::Failed {
                        error: "interrupted: a newer message arrived (conversations.multitask = \"interrupt\")".into(),
                        output: match outcome {
                            Outcome::Failed { output, .. } => output,
                            Outcome::Completed { output } => Some(output),
                        },
                    };
                }
                Ok(ReplyEnd::Ended { .. }) => {
                    crate::measure::turn_finished(last.status);
                    return outcome;
                }
                Ok(ReplyEnd::LeaseLost) => return outcome,
                Err(error) if !control.lease_expired_locally() && !control.lease_lost() => {
                    crate::measure::database_error("finish_reply");
                    let delay = retry.failed();
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "writing the final reply failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "writing the final reply failed; the reaper will end the turn");
                    return outcome;
                }
            }
        }
    }

    /// The run's target: the agent the claim already read, or the agent or team read now,
    /// retrying while the database is unreachable and the lease is valid; a missing target
    /// or an unreadable input is an error for the run.
    async fn target(&self, run: &mut ClaimedRun, control: &RunControl) -> Result<Target, String> {
        if let Some(defect) = run.defect.take() {
            return Err(defect);
        }
        if let Some(agent) = run.agent.take() {
            return Ok(Target::Agent(agent));
        }
        let (what, id) = (run.kind.as_str(), run.target_id);
        let mut retry = Retry::up_to(self.inner.max_backoff);
        loop {
            let loaded = match run.kind {
                RunKind::Agent => self
                    .inner
                    .agent_loader
                    .call(id)
                    .await
                    .map(|agent| agent.map(Target::Agent)),
                RunKind::Team => load_team(&self.inner.pool, id)
                    .await
                    .map(|team| team.map(Target::Team)),
            };
            match loaded {
                Ok(Some(target)) => return Ok(target),
                Ok(None) => return Err(format!("{what} {id} does not exist (any more)")),
                Err(error) if !control.lease_expired_locally() && !control.lease_lost() => {
                    crate::measure::database_error("load_target");
                    let delay = retry.failed();
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "loading the run's {what} failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(error) => return Err(format!("could not load {what} {id}: {error}")),
            }
        }
    }

    /// Records the outcome with the run's last log lines (unless the lease was lost); the
    /// run's slot is free by then (see [`Runner::free_slot`]).
    async fn finish(&self, run_id: Uuid, kind: &'static str, control: &RunControl, ended: Ended) {
        let (mut log_totals, log_tail) = ended.log;
        // The last lines are written with the outcome: count them as stored.
        let tail_bytes: usize = log_tail.iter().map(|line| line.message.len()).sum();
        let tail_lines = log_tail.len();
        log_totals.lines += tail_lines as u64;
        log_totals.bytes += tail_bytes as u64;
        let outcome = match (ended.outcome.filter(|_| !control.lease_lost()), &ended.turn) {
            (Some(outcome), Some(turn)) => {
                Some(self.finish_turn(run_id, control, turn, outcome).await)
            }
            (outcome, _) => outcome,
        };
        match outcome {
            Some(outcome) => {
                let usage = UsageRecord {
                    executor_figures: ended.usage.take(),
                    duration_ms: ended.started.elapsed().as_millis() as u64,
                    slot_ms: ended
                        .slot
                        .unwrap_or_else(|| control.in_slot_for())
                        .as_micros() as f64
                        / 1000.0,
                    log_lines: log_totals.lines,
                    log_bytes: log_totals.bytes,
                    log_lines_dropped: log_totals.dropped_lines,
                    log_bytes_dropped: log_totals.dropped_bytes,
                    artifacts: ended.artifacts.count,
                    artifact_bytes: ended.artifacts.bytes,
                    artifacts_rejected: ended.artifacts.rejected,
                    executor: ended.executor,
                }
                .render();
                let record = run_outcome(outcome, usage);
                let status = record.result.status().as_str();
                if self
                    .inner
                    .recorder
                    .record(
                        run_id,
                        control,
                        Arc::new(record),
                        log_tail.into(),
                        &ended.redactor,
                    )
                    .await
                {
                    crate::measure::run_finished(kind, status, ended.started.elapsed());
                    crate::measure::log_lines_written(tail_lines, tail_bytes);
                }
            }
            None => tracing::warn!(
                "run abandoned: its lease was lost, so another replica owns its outcome"
            ),
        }
        if self.active().remove(&run_id).is_some() {
            crate::measure::run_ended();
            self.free_slot(control);
        }
    }

    /// Gives the run's slot back, once: called when its executor ends, so what is left
    /// (the last log lines, artifacts, a turn's reply, the outcome) is written without
    /// holding room another run could use. Those writes stay fenced by the lease.
    fn free_slot(&self, control: &RunControl) {
        if control.free_slot_once() {
            self.inner.slots.release_running(control.source());
        }
    }
}
