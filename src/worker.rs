//! A worker: the services of one replica, started together and stopped in order.
//!
//! Start: register the worker, then the listener, lease keeper, reaper and scheduler.
//! Shutdown (the token fires): the scheduler stops claiming at once; running runs get
//! `shutdown.grace` to finish; the rest are cancelled and recorded as failed ("worker
//! shutting down"), which also ends their leases; then the other services stop and the
//! worker deregisters.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::executor::Executors;
use crate::health::Health;
use crate::maintenance::reaper::Reaper;
use crate::maintenance::retention::Retention;
use crate::runner::artifacts::ArtifactOptions;
use crate::runner::leases::LeaseKeeper;
use crate::runner::logs::LogLimits;
use crate::runner::{Runner, RunnerOptions, StopReason};
use crate::scheduler::Scheduler;
use crate::scheduler::listener::Listener;
use crate::store::workers::{WorkerInfo, deregister_worker, register_worker};

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
) -> Result<(), crate::store::StoreError> {
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
    register_worker(&pool, &info).await?;

    let runner = Runner::new(
        pool.clone(),
        RunnerOptions {
            worker_id: worker_id.clone(),
            lease_ttl: settings.lease.ttl,
            max_backoff: settings.database.max_backoff,
            concurrency: settings.worker.concurrency,
            run_timeout: settings.executor.timeout,
            log_limits: LogLimits {
                max_lines: settings.logs.max_lines_per_run,
                max_bytes: settings.logs.max_bytes_per_run,
            },
            artifacts: ArtifactOptions::from_settings(
                &settings.artifacts,
                settings.database.max_backoff,
            ),
        },
        executors,
    );
    let wake = Arc::new(Notify::new());
    let leases = Arc::new(Notify::new());
    // Services that must outlive the runs (leases are renewed during the grace period).
    let services_stop = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    // A service that ends before it is told to is dead, and so is the process (/healthz).
    let until = |token: &CancellationToken| {
        let token = token.clone();
        move || token.is_cancelled()
    };
    tracker.spawn(
        health.watch(
            "listener",
            until(&services_stop),
            Listener {
                pool: pool.clone(),
                runner: runner.clone(),
                wake: wake.clone(),
                leases: leases.clone(),
                max_backoff: settings.database.max_backoff,
            }
            .run(services_stop.clone()),
        ),
    );
    tracker.spawn(
        health.watch(
            "lease keeper",
            until(&services_stop),
            LeaseKeeper {
                pool: pool.clone(),
                runner: runner.clone(),
                worker_id: worker_id.clone(),
                ttl: settings.lease.ttl,
                interval: settings.lease.renew_interval(),
            }
            .run(services_stop.clone()),
        ),
    );
    tracker.spawn(
        health.watch(
            "reaper",
            until(&services_stop),
            Reaper {
                pool: pool.clone(),
                retry: settings.lease.renew_interval(),
                leases,
            }
            .run(services_stop.clone()),
        ),
    );
    if settings.retention.enabled() {
        tracker.spawn(
            health.watch(
                "retention",
                until(&services_stop),
                Retention {
                    pool: pool.clone(),
                    worker_id: worker_id.clone(),
                    settings: settings.retention.clone(),
                    artifacts: ArtifactOptions::from_settings(
                        &settings.artifacts,
                        settings.database.max_backoff,
                    ),
                }
                .run(services_stop.clone()),
            ),
        );
    }
    let scheduler = tokio::spawn(
        health.watch(
            "scheduler",
            until(&shutdown),
            Scheduler {
                pool: pool.clone(),
                runner: runner.clone(),
                worker_id: worker_id.clone(),
                settings: settings.scheduler.clone(),
                lease: settings.lease.clone(),
                max_backoff: settings.database.max_backoff,
                wake,
                rules: Default::default(),
            }
            .run(shutdown.clone()),
        ),
    );
    health.set_serving(true);
    tracing::info!(concurrency = settings.worker.concurrency, "worker started");

    shutdown.cancelled().await;
    health.set_stopping();
    let _ = scheduler.await;
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
    Ok(())
}
