//! LISTEN/NOTIFY: wakes the scheduler when the application changes schedules or asks for a
//! run, and stops runs whose owner cancelled them, without waiting for a poll.
//!
//! Notifications are a hint, never the only path: they are lost while the connection is
//! down, so after every reconnect the scheduler is woken to look again, and cancellations
//! also arrive with the next lease renewal.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::runner::{Runner, StopReason};

/// Channels the migrations notify on.
pub const CHANNELS: [&str; 4] = [
    "agentd_schedules",
    "agentd_requests",
    "agentd_cancel",
    "agentd_leases",
];

/// The listener service.
pub struct Listener {
    pub pool: PgPool,
    pub runner: Runner,
    pub wake: Arc<Notify>,
    /// Notified when a replica took leases (the reaper's cue).
    pub leases: Arc<Notify>,
    pub max_backoff: Duration,
}

impl Listener {
    /// Listens until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        let mut failures: u32 = 0;
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
                        failures += 1;
                        crate::measure::database_error("listen");
                        let delay = crate::store::backoff_delay(failures, self.max_backoff);
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
            if failures > 0 {
                crate::measure::database_reconnected();
                tracing::info!("listening for notifications again");
            }
            failures = 0;
            // Whatever was notified while we were not listening: look again.
            self.wake.notify_one();
            self.leases.notify_one();
            loop {
                let received = tokio::select! {
                    received = listener.try_recv() => received,
                    _ = stop.cancelled() => return,
                };
                match received {
                    Ok(Some(notification)) => {
                        self.dispatch(notification.channel(), notification.payload())
                    }
                    Ok(None) => {
                        tracing::warn!("notification connection lost; reconnecting");
                        self.wake.notify_one();
                    }
                    Err(error) => {
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
            "agentd_cancel" => {
                if let Ok(run_id) = Uuid::from_str(payload)
                    && self.runner.stop(run_id, StopReason::Cancelled)
                {
                    tracing::info!(run_id = %run_id, "cancellation requested");
                }
            }
            _ => self.wake.notify_one(),
        }
    }
}
