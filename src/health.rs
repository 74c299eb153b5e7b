//! Liveness and readiness as the process knows them: which long-running loops ended when
//! they should not have, and whether the process is shutting down. The HTTP endpoints read
//! this; the worker writes it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;

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

    /// Runs one of the worker's loops, recording it as dead if it panics or returns
    /// before shutdown began. `stopping` tells whether shutdown began.
    pub fn watch<F>(
        &self,
        name: &'static str,
        stopping: impl Fn() -> bool + Send + 'static,
        service: F,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let health = self.clone();
        async move {
            let result = AssertUnwindSafe(service).catch_unwind().await;
            let panicked = result.is_err();
            if panicked || !stopping() {
                tracing::error!(
                    service = name,
                    panicked,
                    "a worker loop ended unexpectedly; /healthz now fails"
                );
                health.lock_dead().push(name.to_string());
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
    async fn a_loop_that_ends_or_panics_before_shutdown_makes_the_process_dead() {
        let health = Health::new();
        health.watch("quiet", || true, async {}).await;
        assert!(health.liveness().is_ok(), "ended during shutdown: fine");
        health.watch("scheduler", || false, async {}).await;
        assert_eq!(
            health.liveness().unwrap_err(),
            "worker loop(s) stopped: scheduler"
        );
        let health = Health::new();
        health
            .watch("reaper", || true, async { panic!("boom") })
            .await;
        assert_eq!(
            health.liveness().unwrap_err(),
            "worker loop(s) stopped: reaper"
        );
    }
}
