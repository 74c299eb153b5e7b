//! LISTEN/NOTIFY: wakes the scheduler when the application changes schedules, asks for a
//! run or writes a chat message, and stops runs whose owner cancelled them, without waiting for a poll.
//!
//! Notifications are a hint, never the only path: they are lost while the connection is
//! down, so after every reconnect the loops are woken to look again, and cancellations
//! also arrive with the next lease renewal. Any database role may send a NOTIFY, so none
//! is trusted: a cancellation only makes the lease keeper renew at once, and the run stops
//! when the database's answer says its owner asked (`cancel_requested`).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::retry::Retry;
use uuid::Uuid;

/// Channels the migrations notify on.
pub const CHANNELS: [&str; 5] = [
    "agentd_schedules",
    "agentd_requests",
    "agentd_messages",
    "agentd_cancel",
    "agentd_leases",
];

/// Shortest time between two looks that notifications asked for: a flood of NOTIFYs (any
/// database role may send them) costs at most one look per gap (for each claim loop).
pub const MIN_NOTIFIED_GAP: Duration = Duration::from_millis(5);

/// The listener service.
#[derive(Clone)]
pub struct Listener {
    pub pool: PgPool,
    /// Notified when schedules change (the schedule loop's cue).
    pub wake: Arc<Notify>,
    /// Notified when runs are requested (the request loop's cue).
    pub requests: Arc<Notify>,
    /// Notified when user messages arrive (the conversation loop's cue).
    pub messages: Arc<Notify>,
    /// Notified when a replica took leases (the reaper's cue).
    pub leases: Arc<Notify>,
    /// Notified when a run may have been cancelled (the lease keeper's cue to ask now).
    pub renew: Arc<Notify>,
    pub max_backoff: Duration,
}

impl Listener {
    /// Listens until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        let mut retry = Retry::up_to(self.max_backoff);
        while !stop.is_cancelled() {
            let listener = async {
                let mut listener = PgListener::connect_with(&self.pool).await?;
                listener.listen_all(CHANNELS).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = tokio::select! {
                result = listener => match result {
                    Ok(listener) => listener,
                    Err(error) => {
                        crate::measure::database_error("listen");
                        crate::store::failover::observe(&error);
                        let delay = retry.failed();
                        tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "cannot listen for notifications; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.cancelled() => return,
                        }
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            if retry.failures() > 0 {
                crate::measure::database_reconnected();
                tracing::info!("listening for notifications again");
            }
            retry.succeeded();
            // Whatever was notified while we were not listening: look again.
            self.wake.notify_one();
            self.requests.notify_one();
            self.messages.notify_one();
            self.leases.notify_one();
            self.renew.notify_one();
            // A failover seen on any connection makes this one stale too (it may be the old
            // primary's, which never notifies again): listen on a new one.
            let mut rebuilds = crate::store::failover::rebuilds();
            rebuilds.mark_unchanged();
            loop {
                let received = tokio::select! {
                    received = listener.try_recv() => received,
                    _ = rebuilds.changed() => {
                        tracing::info!("listening on a new connection after a failover");
                        break;
                    }
                    _ = stop.cancelled() => return,
                };
                match received {
                    Ok(Some(notification)) => {
                        self.dispatch(notification.channel(), notification.payload())
                    }
                    Ok(None) => {
                        tracing::warn!("notification connection lost; reconnecting");
                        self.wake.notify_one();
                        self.requests.notify_one();
                        self.messages.notify_one();
                    }
                    Err(error) => {
                        crate::store::failover::observe(&error);
                        tracing::warn!(error = %error, "notification connection failed");
                        break;
                    }
                }
            }
        }
    }

    fn dispatch(&self, channel: &str, payload: &str) {
        match channel {
            "agentd_leases" => self.leases.notify_one(),
            "agentd_requests" => self.requests.notify_one(),
            "agentd_messages" => self.messages.notify_one(),
            "agentd_cancel" => {
                if Uuid::from_str(payload).is_ok() {
                    self.renew.notify_one();
                }
            }
            _ => self.wake.notify_one(),
        }
    }
}
