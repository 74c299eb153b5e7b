//! The reaper: marks runs whose worker stopped renewing their lease as failed ("worker
//! lost") and ends those leases.
//!
//! It follows the earliest lease expiry of all replicas: it sleeps until then, reaps what
//! has expired, and looks up the next one, so a dead replica's runs are settled moments
//! after their leases expire. With no lease anywhere it sleeps until a replica takes one
//! (the `agentd_leases` notification), so an idle fleet costs nothing. A lease taken while
//! it follows an expiry cannot expire before that one (every lease lasts at most `ttl`), so
//! notifications are ignored then.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::conversations::end_orphaned_turns;
use crate::store::workers::{next_lease_expiry, reap_expired_leases, return_expired_ahead};

/// Most leases reaped per statement; more are taken at once in further statements.
const REAP_BATCH: usize = 500;
/// Margin after a lease's expiry before looking, so the look finds it expired.
const EXPIRY_MARGIN: Duration = Duration::from_millis(50);
/// With no lease known, look anyway this often (a safety net for lost notifications).
const IDLE_LOOK: Duration = Duration::from_secs(600);

/// Shortest time between two looks that notifications asked for (any role may NOTIFY).
const MIN_NOTIFIED_GAP: Duration = Duration::from_millis(100);

/// The reaper service.
#[derive(Clone)]
pub struct Reaper {
    pub pool: PgPool,
    /// Wait before looking again after a failed look.
    pub retry: Duration,
    /// Notified when some replica took leases.
    pub leases: Arc<Notify>,
}

impl Reaper {
    /// Reaps until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        // Look once at start: a replica that died before this one started left leases.
        let mut next: Option<Duration> = Some(Duration::ZERO);
        loop {
            match next {
                Some(after) => tokio::select! {
                    _ = tokio::time::sleep(after) => {}
                    _ = stop.cancelled() => return,
                },
                None => tokio::select! {
                    _ = self.leases.notified() => tokio::time::sleep(MIN_NOTIFIED_GAP).await,
                    _ = tokio::time::sleep(IDLE_LOOK) => {}
                    _ = stop.cancelled() => return,
                },
            }
            // A failed look is retried soon even when no lease is left to follow: the
            // runs or turns it missed would otherwise wait for the next lease anywhere.
            let returned = self.return_ahead().await;
            let reaped = self.reap().await && returned;
            let looked = self.end_orphaned_turns().await && reaped;
            next = match next_lease_expiry(&self.pool).await {
                Ok(Some(until)) if looked => Some(until + EXPIRY_MARGIN),
                Ok(Some(until)) => Some((until + EXPIRY_MARGIN).min(self.retry)),
                Ok(None) if looked => None,
                Ok(None) => Some(self.retry),
                Err(error) => {
                    crate::measure::database_error("reap");
                    tracing::warn!(error = %error, "reading lease expiries failed");
                    Some(self.retry)
                }
            };
        }
    }

    /// Ends the conversation turns whose lease is gone without a final reply (their worker
    /// was lost, or failed to write it): each reply says so, and the conversation's next
    /// turn may start. False when a statement failed.
    async fn end_orphaned_turns(&self) -> bool {
        in_batches(
            "end_orphaned_turns",
            "ending orphaned turns failed",
            || async {
                let ended = end_orphaned_turns(&self.pool, REAP_BATCH).await?;
                if ended > 0 {
                    tracing::warn!(
                        turns = ended,
                        "turns ended without their worker; their replies say so"
                    );
                }
                Ok(ended as usize)
            },
        )
        .await
    }

    /// Gives back the slots claimed ahead whose lease expired before their instant's run
    /// was created; false when a statement failed.
    async fn return_ahead(&self) -> bool {
        in_batches("reap", "giving back slots claimed ahead failed", || async {
            let returned = return_expired_ahead(&self.pool, REAP_BATCH).await?;
            if returned > 0 {
                tracing::warn!(
                    slots = returned,
                    "slots claimed ahead by a lost worker given back; they fire late"
                );
            }
            Ok(returned as usize)
        })
        .await
    }

    /// Reaps every expired lease; false when a statement failed.
    async fn reap(&self) -> bool {
        in_batches("reap", "reaping expired leases failed", || async {
            let reaped = reap_expired_leases(&self.pool, REAP_BATCH).await?;
            crate::measure::leases_reaped(reaped.len());
            for run in &reaped {
                tracing::warn!(
                    run_id = %run.run_id,
                    lost_worker_id = %run.worker_id,
                    expired_at = %run.expired_at,
                    "run failed: its worker was lost"
                );
            }
            Ok(reaped.len())
        })
        .await
    }
}

/// Runs `batch` (one statement handling at most [`REAP_BATCH`] rows, returning how many it
/// handled) until a batch handles fewer; false when one failed (counted under `what` and
/// logged as `failed`).
async fn in_batches<F, Fut>(what: &'static str, failed: &'static str, mut batch: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize, crate::store::StoreError>>,
{
    loop {
        match batch().await {
            Ok(handled) if handled < REAP_BATCH => return true,
            Ok(_) => {}
            Err(error) => {
                crate::measure::database_error(what);
                tracing::warn!(error = %error, "{failed}");
                return false;
            }
        }
    }
}
