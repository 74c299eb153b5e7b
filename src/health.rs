//! Liveness and readiness as the process knows them: which long-running loops ended when
//! they should not have, and whether the process is shutting down. The HTTP endpoints read
//! this; the worker writes it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;

use crate::retry::Backoff;

/// Failures of one loop that make the process give up on it (see [`Health::supervise`]).
pub const MAX_RESTARTS: usize = 5;
/// The wait before a failed loop starts again: from 500 ms, doubling with each failure in
/// the window (the one retry policy, jitter included).
const RESTART_BACKOFF: Backoff = Backoff {
    first: std::time::Duration::from_millis(500),
    max: std::time::Duration::from_secs(16),
};
/// The window in which [`MAX_RESTARTS`] failures count.
pub const RESTART_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// Shared health state of one process.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Shutdown has begun: not ready any more (still alive).
    stopping: AtomicBool,
    /// The worker's loops are running.
    serving: AtomicBool,
    /// Loops that ended (or panicked) while they should have been running.
    dead: Mutex<Vec<String>>,
}

impl Health {
    /// A fresh state: alive, not serving yet.
    pub fn new() -> Health {
        Health::default()
    }

    /// Runs one of the worker's loops, started by `start`, for as long as the process
    /// serves. A loop that panics or returns before shutdown began is logged and started
    /// again after a short backoff; one that fails [`MAX_RESTARTS`] times within
    /// [`RESTART_WINDOW`] is recorded as dead and `fatal` is cancelled, so the process stops
    /// and exits non-zero for its supervisor to restart it. A process never looks alive
    /// while one of its loops does nothing.
    pub fn supervise<S, F>(
        &self,
        name: &'static str,
        stopping: impl Fn() -> bool + Send + 'static,
        fatal: tokio_util::sync::CancellationToken,
        start: S,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        S: Fn() -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        self.supervise_with(name, stopping, fatal, start, RESTART_BACKOFF)
    }

    fn supervise_with<S, F>(
        &self,
        name: &'static str,
        stopping: impl Fn() -> bool + Send + 'static,
        fatal: tokio_util::sync::CancellationToken,
        start: S,
        backoff: Backoff,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        S: Fn() -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let health = self.clone();
        async move {
            let mut failures: std::collections::VecDeque<std::time::Instant> =
                std::collections::VecDeque::new();
            loop {
                let result = AssertUnwindSafe(start()).catch_unwind().await;
                if stopping() {
                    return;
                }
                let panicked = result.is_err();
                let now = std::time::Instant::now();
                failures.push_back(now);
                while failures
                    .front()
                    .is_some_and(|at| now.duration_since(*at) > RESTART_WINDOW)
                {
                    failures.pop_front();
                }
                crate::measure::loop_restarted(name);
                if failures.len() >= MAX_RESTARTS {
                    tracing::error!(
                        service = name,
                        panicked,
                        failures = failures.len(),
                        "a worker loop keeps failing; stopping agentd so that its supervisor restarts it"
                    );
                    health.lock_dead().push(name.to_string());
                    fatal.cancel();
                    return;
                }
                let delay = backoff.delay(failures.len() as u32);
                tracing::error!(
                    service = name,
                    panicked,
                    restart_in_ms = delay.as_millis() as u64,
                    "a worker loop ended unexpectedly; restarting it"
                );
                tokio::time::sleep(delay).await;
                if stopping() {
                    return;
                }
            }
        }
    }

    fn lock_dead(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.inner
            .dead
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The worker's loops are up.
    pub fn set_serving(&self, serving: bool) {
        self.inner.serving.store(serving, Ordering::SeqCst);
    }

    /// Whether the worker's loops are up.
    pub fn serving(&self) -> bool {
        self.inner.serving.load(Ordering::SeqCst)
    }

    /// Shutdown has begun.
    pub fn set_stopping(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    /// `Err` with the dead loops' names when one ended unexpectedly.
    pub fn liveness(&self) -> Result<(), String> {
        let dead = self.lock_dead();
        if dead.is_empty() {
            Ok(())
        } else {
            Err(format!("worker loop(s) stopped: {}", dead.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_loop_is_restarted_then_given_up_on() {
        let health = Health::new();
        let fatal = tokio_util::sync::CancellationToken::new();
        let starts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = starts.clone();
        let start = move || {
            let starts = counted.clone();
            async move {
                if starts.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                    panic!("hostile row");
                }
            }
        };
        let backoff = Backoff {
            first: std::time::Duration::from_millis(1),
            max: std::time::Duration::from_millis(1),
        };
        health
            .supervise_with("scheduler", || false, fatal.clone(), start, backoff)
            .await;
        assert_eq!(starts.load(Ordering::SeqCst), MAX_RESTARTS);
        assert!(fatal.is_cancelled());
        assert_eq!(
            health.liveness().unwrap_err(),
            "worker loop(s) stopped: scheduler"
        );
        // During shutdown, a loop that ends is not a failure.
        let health = Health::new();
        let fatal = tokio_util::sync::CancellationToken::new();
        health
            .supervise("reaper", || true, fatal.clone(), || async {})
            .await;
        assert!(!fatal.is_cancelled());
        assert!(health.liveness().is_ok());
    }
}
