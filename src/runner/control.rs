//! The control of one running run: how it is stopped, why, and until when its lease is
//! certainly valid by this process's clock. Shared by the runner, the run's log pipe and
//! artifact store, and the lease keeper.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::slots::Source;

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
    /// Where the run came from: its slot is given back to that source.
    source: Source,
    /// The slot was given back (once, when the executor ended).
    slot_freed: AtomicBool,
    /// When the run took its slot.
    occupied_at: Instant,
}

impl RunControl {
    /// A run from `source` whose lease is valid until `lease_deadline` by this process's
    /// clock.
    pub fn new(lease_deadline: Instant, source: Source) -> RunControl {
        RunControl {
            inner: Arc::new(ControlInner {
                cancel: CancellationToken::new(),
                reason: OnceLock::new(),
                lease_deadline: Mutex::new(lease_deadline),
                lost: AtomicBool::new(false),
                executed: AtomicBool::new(false),
                source,
                slot_freed: AtomicBool::new(false),
                occupied_at: Instant::now(),
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

    /// Resolves when the run is stopped.
    pub async fn stopped(&self) {
        self.inner.cancel.cancelled().await;
    }

    /// Where the run came from.
    pub fn source(&self) -> Source {
        self.inner.source
    }

    /// Marks the lease lost and stops the run.
    pub fn lose_lease(&self) {
        self.inner.lost.store(true, Ordering::SeqCst);
        self.stop(StopReason::LeaseLost);
    }

    /// The executor has ended: from now on the lease is not renewed.
    pub fn end_execution(&self) {
        self.inner.executed.store(true, Ordering::SeqCst);
    }

    /// How long since the run took its slot (when it was started).
    pub fn in_slot_for(&self) -> std::time::Duration {
        self.inner.occupied_at.elapsed()
    }

    /// True the first time only: the caller gives the run's slot back.
    pub fn free_slot_once(&self) -> bool {
        !self.inner.slot_freed.swap(true, Ordering::SeqCst)
    }

    /// Whether the executor is still executing (its lease is renewed).
    pub fn executing(&self) -> bool {
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

    /// A renewal succeeded: the lease is valid until `until`.
    pub fn extend_lease(&self, until: Instant) {
        let mut deadline = self.deadline();
        if until > *deadline {
            *deadline = until;
        }
    }

    /// Why the run was stopped, if it was.
    pub fn reason(&self) -> Option<StopReason> {
        self.inner.reason.get().copied()
    }
}
