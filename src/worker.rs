//! A worker: the services of one replica, started together and stopped in order.
//!
//! Start: register the worker, then the listener, lease keeper, reaper, and the claim
//! loops (schedules, requests, conversation turns). Each loop is supervised ([`Health::supervise`]): restarted
//! when it fails, and when one keeps failing the worker stops as on shutdown and returns
//! an error. Shutdown (the token fires): the claim loops stop at once; running runs get
//! `shutdown.grace` to finish; the rest are cancelled and recorded as failed ("worker
//! shutting down"), which also ends their leases; then the other services stop and the
//! worker deregisters.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::artifact_store::ArtifactStore;
use crate::config::{Multitask, Settings};
use crate::executor::Executors;
use crate::health::Health;
use crate::maintenance::reaper::Reaper;
use crate::maintenance::retention::Retention;
use crate::runner::leases::LeaseKeeper;
use crate::runner::logs::LogLimits;
use crate::runner::{Runner, RunnerOptions, StopReason, TurnOptions};
use crate::scheduler::Scheduler;
use crate::scheduler::conversations::TurnClaimer;
use crate::scheduler::listener::{ListenMode, Listener};
use crate::scheduler::requests::RequestClaimer;
use crate::store::conversations::TurnRules;
use crate::store::workers::{WorkerInfo, deregister_worker, publish_limits, register_worker};

/// The listener's `application_name`: operators tell its connection apart in
/// `pg_stat_activity` (the pool's is `agentd`, the readiness check's `agentd readiness`).
pub const LISTENER_APPLICATION_NAME: &str = "agentd listener";

/// How long cancelled runs get to record their outcome after the grace period.
const CANCEL_SETTLE: Duration = Duration::from_secs(10);

/// Runs one replica's services on `pool` until `shutdown` fires, then stops them in order.
/// `health` learns when the services are up, when shutdown begins, and of any service
/// that ends unexpectedly.
pub async fn serve(
    pool: PgPool,
    settings: &Settings,
    executors: Executors,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let worker_id = settings.worker.id.clone();
    let info = WorkerInfo {
        id: worker_id.clone(),
        host: nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .unwrap_or_default(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    // The listener's own connection: to database.listen_url, or as the pool connects.
    let listen_options = match &settings.database.listen_url {
        Some(url) => crate::store::parse_url(url).map_err(|error| match error {
            crate::store::StoreError::BadUrl(reason) => WorkerError::ListenUrl(reason),
            other => WorkerError::Store(other),
        })?,
        None => (*pool.connect_options()).clone(),
    }
    .application_name(LISTENER_APPLICATION_NAME);
    register_worker(&pool, &info).await?;
    publish_limits(&pool, settings.requests.max_pending_per_user).await?;

    let runner = Runner::new(
        pool.clone(),
        RunnerOptions {
            worker_id: worker_id.clone(),
            lease_ttl: settings.lease.ttl,
            max_backoff: settings.database.max_backoff,
            concurrency: settings.worker.max_runs,
            run_timeout: settings.executor.timeout,
            log_limits: LogLimits {
                max_lines: settings.logs.max_lines_per_run,
                max_bytes: settings.logs.max_bytes_per_run,
            },
            artifacts: ArtifactStore::from_settings(
                &settings.artifacts,
                settings.database.max_backoff,
            ),
            turns: TurnOptions {
                history_messages: settings.conversations.history_messages,
                history_bytes: settings.conversations.history_bytes,
                stream_interval: settings.conversations.stream_interval,
            },
        },
        executors,
    );
    let wake = Arc::new(Notify::new());
    let requests = Arc::new(Notify::new());
    let messages = Arc::new(Notify::new());
    let leases = Arc::new(Notify::new());
    let renew = Arc::new(Notify::new());
    // Claiming stops on shutdown, or when a loop keeps failing (`fatal`): then the worker
    // stops as on shutdown and `serve` returns an error, so the process exits non-zero.
    let fatal = CancellationToken::new();
    let claiming = shutdown.child_token();
    // Services that must outlive the runs (leases are renewed during the grace period).
    let services_stop = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let until = |token: &CancellationToken| {
        let token = token.clone();
        move || token.is_cancelled()
    };
    // Each loop is supervised: restarted when it panics or ends early, given up on (and
    // the process stopped) when it keeps failing.
    let listener = Listener {
        pool: pool.clone(),
        listen_options,
        mode: ListenMode::of(settings, crate::store::exec::transaction_pooler()),
        runner: runner.clone(),
        worker_id: worker_id.clone(),
        lease_ttl: settings.lease.ttl,
        connect_timeout: settings.database.connect_timeout,
        wake: wake.clone(),
        requests: requests.clone(),
        messages: messages.clone(),
        leases: leases.clone(),
        renew: renew.clone(),
        max_backoff: settings.database.max_backoff,
    };
    let stop = services_stop.clone();
    tracker.spawn(health.supervise(
        "listener",
        until(&services_stop),
        fatal.clone(),
        move || listener.clone().run(stop.clone()),
    ));
    let lease_keeper = LeaseKeeper {
        pool: pool.clone(),
        runner: runner.clone(),
        worker_id: worker_id.clone(),
        ttl: settings.lease.ttl,
        interval: settings.lease.renew_interval(),
        renew,
    };
    let stop = services_stop.clone();
    tracker.spawn(health.supervise(
        "lease keeper",
        until(&services_stop),
        fatal.clone(),
        move || lease_keeper.clone().run(stop.clone()),
    ));
    let reaper = Reaper {
        pool: pool.clone(),
        retry: settings.lease.renew_interval(),
        leases,
    };
    let stop = services_stop.clone();
    tracker.spawn(
        health.supervise("reaper", until(&services_stop), fatal.clone(), move || {
            reaper.clone().run(stop.clone())
        }),
    );
    if settings.retention.enabled() {
        let retention = Retention {
            pool: pool.clone(),
            worker_id: worker_id.clone(),
            settings: settings.retention.clone(),
            artifacts: ArtifactStore::from_settings(
                &settings.artifacts,
                settings.database.max_backoff,
            ),
        };
        let stop = services_stop.clone();
        tracker.spawn(health.supervise(
            "retention",
            until(&services_stop),
            fatal.clone(),
            move || retention.clone().run(stop.clone()),
        ));
    }
    let claimers = tokio_util::task::TaskTracker::new();
    let request_claimer = RequestClaimer {
        pool: pool.clone(),
        runner: runner.clone(),
        worker_id: worker_id.clone(),
        lease_ttl: settings.lease.ttl,
        batch_size: settings.scheduler.batch_size,
        max_backoff: settings.database.max_backoff,
        wake: requests.clone(),
    };
    let stop = claiming.clone();
    claimers.spawn(
        health.supervise("requests", until(&claiming), fatal.clone(), move || {
            request_claimer.clone().run(stop.clone())
        }),
    );
    let scheduler = Scheduler {
        pool: pool.clone(),
        runner: runner.clone(),
        worker: info.clone(),
        forget_after: settings.worker_forget_after(),
        settings: settings.scheduler.clone(),
        lease: settings.lease.clone(),
        max_backoff: settings.database.max_backoff,
        wake,
        requests,
        messages: messages.clone(),
    };
    let stop = claiming.clone();
    claimers.spawn(
        health.supervise("scheduler", until(&claiming), fatal.clone(), move || {
            scheduler.clone().run(stop.clone())
        }),
    );
    if settings.conversations.enabled {
        let conversations = &settings.conversations;
        let turn_claimer = TurnClaimer {
            pool: pool.clone(),
            runner: runner.clone(),
            worker_id: worker_id.clone(),
            lease_ttl: settings.lease.ttl,
            batch_size: settings.scheduler.batch_size,
            rules: TurnRules {
                debounce: conversations.debounce,
                debounce_max: conversations.debounce_max,
                max_turn_messages: conversations.max_turn_messages,
                interrupt: conversations.multitask == Multitask::Interrupt,
            },
            max_backoff: settings.database.max_backoff,
            wake: messages,
        };
        let stop = claiming.clone();
        claimers.spawn(health.supervise(
            "conversations",
            until(&claiming),
            fatal.clone(),
            move || turn_claimer.clone().run(stop.clone()),
        ));
    }
    claimers.close();
    health.set_serving(true);
    tracing::info!(max_runs = runner.capacity(), "worker started");

    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = fatal.cancelled() => {}
    }
    claiming.cancel();
    health.set_stopping();
    claimers.wait().await;
    let in_flight = runner.in_flight();
    if in_flight > 0 {
        tracing::info!(
            runs = in_flight,
            grace_ms = settings.shutdown.grace.as_millis() as u64,
            "waiting for running runs to finish"
        );
    }
    if tokio::time::timeout(settings.shutdown.grace, runner.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            runs = runner.in_flight(),
            "grace period over; cancelling the remaining runs"
        );
        runner.stop_all(StopReason::ShuttingDown);
        if tokio::time::timeout(CANCEL_SETTLE, runner.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                runs = runner.in_flight(),
                "runs did not settle; their leases will expire"
            );
        }
    }
    services_stop.cancel();
    tracker.close();
    tracker.wait().await;
    if let Err(error) = deregister_worker(&pool, &worker_id).await {
        tracing::warn!(error = %error, "could not deregister the worker");
    }
    health.set_serving(false);
    tracing::info!("worker stopped");
    match health.liveness() {
        Ok(()) => Ok(()),
        Err(dead) => Err(WorkerError::LoopFailed(dead)),
    }
}

/// Why a worker stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The database refused to register the worker.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// `database.listen_url` cannot be parsed (the reason never repeats the URL).
    #[error("database.listen_url: not a valid PostgreSQL URL: {0}")]
    ListenUrl(String),
    /// A loop kept failing; the worker stopped so that its supervisor restarts the process.
    #[error("{0}")]
    LoopFailed(String),
}
