//! LISTEN/NOTIFY: wakes the scheduler when the application changes schedules, asks for a
//! run or writes a chat message, and stops runs whose owner cancelled them, without waiting for a poll.
//!
//! Notifications are a hint, never the only path: they are lost while the connection is
//! down, so after every reconnect the loops are woken to look again, and cancellations
//! also arrive with the next lease renewal. Any database role may send a NOTIFY, so none
//! is trusted: a cancellation only makes the lease keeper renew at once, and the run stops
//! when the database's answer says its owner asked (`cancel_requested`).
//!
//! The listener LISTENs on a connection of its own, to `database.listen_url` (or
//! `database.url`'s server), and checks after each connect that a NOTIFY sent through the
//! pool, as the application's triggers send them, arrives there within
//! [`CHECK_TIMEOUT`]. A transaction-mode pooler or a `listen_url` on another database
//! delivers nothing: then, as with `database.notify = "poll"`, the listener becomes a
//! poller for the rest of the process's life, and says so once.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{NotifyMode, Settings};
use crate::retry::Retry;
use crate::runner::Runner;
use crate::store::workers::{cancellations_waiting, send_notification};
use uuid::Uuid;

/// Channels the migrations notify on.
pub const CHANNELS: [&str; 5] = [
    "agentd_schedules",
    "agentd_requests",
    "agentd_messages",
    "agentd_cancel",
    "agentd_leases",
];

/// The channel of the listener's own check (a fresh random payload each time, so another
/// replica's check or anyone's NOTIFY cannot pass for it).
pub const CHECK_CHANNEL: &str = "agentd_listen_check";

/// How long the check's NOTIFY may take to arrive before the listener falls back to polling.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a worker that does not listen looks for new work: schedules and requests and
/// messages waiting (the scheduler's look), and cancellations of its runs.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Shortest time between two looks that notifications asked for: a flood of NOTIFYs (any
/// database role may send them) costs at most one look per gap (for each claim loop).
pub const MIN_NOTIFIED_GAP: Duration = Duration::from_millis(5);

/// Whether the listener LISTENs or polls, decided once from the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenMode {
    /// LISTEN, checked after every connect (polling when the check fails).
    Listen,
    /// Poll: `database.notify = "poll"`.
    PollAsked,
    /// Poll: `database.url` goes through a transaction-mode pooler, which cannot LISTEN,
    /// and no `database.listen_url` bypasses it.
    PollThroughPooler,
}

/// Whether `database.listen_url` reaches the server other than through `database.url`'s
/// endpoint: set, and naming another host or port. LISTEN through a transaction-mode pooler
/// would not only miss notifications: the listening server connection goes back to the
/// pooler, which lends it to other clients, and they then receive its notifications in the
/// middle of their own statements.
fn bypasses_pooler(settings: &Settings) -> bool {
    let endpoint = |url: &str| {
        crate::store::parse_url(url).ok().map(|options| {
            (
                options.get_host().to_string(),
                options.get_port(),
                options.get_socket().cloned(),
            )
        })
    };
    match (&settings.database.listen_url, &settings.database.url) {
        (None, _) => false,
        (Some(listen), Some(url)) => endpoint(listen) != endpoint(url),
        (Some(_), None) => true,
    }
}

impl ListenMode {
    /// The mode of a worker with `settings`, connected through a transaction-mode pooler
    /// or not.
    pub fn of(settings: &Settings, transaction_pooler: bool) -> ListenMode {
        match settings.database.notify {
            NotifyMode::Poll => ListenMode::PollAsked,
            NotifyMode::Listen if transaction_pooler && !bypasses_pooler(settings) => {
                ListenMode::PollThroughPooler
            }
            NotifyMode::Listen => ListenMode::Listen,
        }
    }

    /// Whether a listen connection is ever open.
    pub fn listens(self) -> bool {
        match self {
            ListenMode::Listen => true,
            ListenMode::PollAsked | ListenMode::PollThroughPooler => false,
        }
    }
}

/// The listener service.
#[derive(Clone)]
pub struct Listener {
    /// The worker's pool: the check's NOTIFY and a poller's looks go through it.
    pub pool: PgPool,
    /// Where to LISTEN (`database.listen_url`, or the pool's server and database).
    pub listen_options: PgConnectOptions,
    pub mode: ListenMode,
    /// A poller asks about cancellations of this worker's runs while the runner has any.
    pub runner: Runner,
    pub worker_id: String,
    /// How often a poller wakes the reaper (`lease.ttl`): a lease taken by another replica
    /// is then followed within one ttl.
    pub lease_ttl: Duration,
    pub connect_timeout: Duration,
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

/// Why listening stopped.
enum Ended {
    /// Shutdown.
    Stopped,
    /// The connection was lost after it worked: connect again at once.
    Lost,
    /// Connecting or checking failed (the error, for the log): connect again after a backoff.
    Failed(String),
    /// Notifications sent through the pool do not arrive: poll instead.
    NotDelivered,
}

impl Listener {
    /// Listens (or polls) until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        match self.mode {
            ListenMode::Listen => {}
            ListenMode::PollAsked => {
                tracing::warn!(
                    poll_interval_ms = POLL_INTERVAL.as_millis() as u64,
                    "database.notify = \"poll\": not listening for notifications; new work is \
                     found by polling (set database.notify = \"listen\" with a database.listen_url \
                     that can LISTEN to start it at once)"
                );
                return self.poll(stop).await;
            }
            ListenMode::PollThroughPooler => {
                tracing::warn!(
                    poll_interval_ms = POLL_INTERVAL.as_millis() as u64,
                    "database.pooler is \"transaction\" and database.listen_url is empty or the pooler's own address: not \
                     listening through the pooler (it cannot LISTEN); new work is found by \
                     polling (set database.listen_url to the direct or session-mode URL of the \
                     same database to start it at once)"
                );
                return self.poll(stop).await;
            }
        }
        let mut retry = Retry::up_to(self.max_backoff);
        loop {
            match self.listen(&stop, &mut retry).await {
                Ended::Stopped => return,
                // Its replacement counts as a reconnect when it opens.
                Ended::Lost => crate::store::failover::connection_lost(),
                Ended::Failed(error) => {
                    crate::measure::database_error("listen");
                    let delay = retry.failed();
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "cannot listen for notifications; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return,
                    }
                }
                Ended::NotDelivered => {
                    tracing::warn!(
                        check_timeout_ms = CHECK_TIMEOUT.as_millis() as u64,
                        poll_interval_ms = POLL_INTERVAL.as_millis() as u64,
                        "a NOTIFY sent through database.url did not arrive on the listen \
                         connection: polling for new work instead; set database.listen_url to \
                         a direct or session-mode URL of the same database (a transaction-mode \
                         pooler cannot LISTEN), or database.notify = \"poll\" to poll without this check"
                    );
                    return self.poll(stop).await;
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }

    /// One connection's life: connect, check that notifications arrive, then dispatch
    /// them until the connection ends.
    async fn listen(&self, stop: &CancellationToken, retry: &mut Retry) -> Ended {
        // A pool of one connection, never recycled: its own, outside the worker's pool.
        let pool = crate::store::pool_options(&self.listen_options)
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(self.connect_timeout)
            .connect_lazy_with(self.listen_options.clone());
        let ended = tokio::select! {
            ended = self.listen_on(&pool, retry) => ended,
            _ = stop.cancelled() => Ended::Stopped,
        };
        pool.close().await;
        ended
    }

    async fn listen_on(&self, pool: &PgPool, retry: &mut Retry) -> Ended {
        let connected = async {
            let mut listener = PgListener::connect_with(pool).await?;
            listener.eager_reconnect(false);
            listener
                .listen_all(CHANNELS.into_iter().chain([CHECK_CHANNEL]))
                .await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        let mut listener = match connected {
            Ok(listener) => listener,
            Err(error) => {
                crate::store::failover::observe(&error);
                return Ended::Failed(error.to_string());
            }
        };
        // The check: a NOTIFY through the pool, as the triggers send them, must come back.
        let token = Uuid::new_v4().to_string();
        if let Err(error) = send_notification(&self.pool, CHECK_CHANNEL, &token).await {
            return Ended::Failed(format!("sending the check's NOTIFY: {error}"));
        }
        let deadline = Instant::now() + CHECK_TIMEOUT;
        loop {
            let received = tokio::select! {
                received = listener.try_recv() => received,
                _ = tokio::time::sleep_until(deadline) => return Ended::NotDelivered,
            };
            match received {
                Ok(Some(notification)) if notification.channel() == CHECK_CHANNEL => {
                    if notification.payload() == token {
                        break;
                    }
                }
                Ok(Some(notification)) => {
                    self.dispatch(notification.channel(), notification.payload())
                }
                Ok(None) => return Ended::Failed("connection lost during the check".into()),
                Err(error) => return Ended::Failed(error.to_string()),
            }
        }
        if retry.failures() > 0 {
            tracing::info!("listening for notifications again");
        }
        retry.succeeded();
        // Whatever was notified while we were not listening: look again.
        self.wake_all();
        // A failover seen on any connection makes this one stale too (it may be the old
        // primary's, which never notifies again): listen on a new one.
        let mut rebuilds = crate::store::failover::rebuilds();
        rebuilds.mark_unchanged();
        loop {
            let received = tokio::select! {
                received = listener.try_recv() => received,
                _ = rebuilds.changed() => {
                    tracing::info!("listening on a new connection after a failover");
                    self.wake_all();
                    return Ended::Lost;
                }
            };
            match received {
                Ok(Some(notification)) => {
                    self.dispatch(notification.channel(), notification.payload())
                }
                Ok(None) => {
                    tracing::warn!("notification connection lost; reconnecting");
                    self.wake_all();
                    return Ended::Lost;
                }
                Err(error) => {
                    crate::store::failover::observe(&error);
                    tracing::warn!(error = %error, "notification connection failed");
                    self.wake_all();
                    return Ended::Lost;
                }
            }
        }
    }

    /// Polls until `stop` fires: every [`POLL_INTERVAL`] the scheduler looks (its look
    /// says whether requests or messages wait, and wakes their loops), and, while this
    /// worker has runs, one read asks whether any was cancelled; every `lease_ttl` the
    /// reaper looks.
    async fn poll(&self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reaper_woken = Instant::now();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
            }
            self.wake.notify_one();
            if reaper_woken.elapsed() >= self.lease_ttl {
                reaper_woken = Instant::now();
                self.leases.notify_one();
            }
            if self.runner.in_flight() == 0 {
                continue;
            }
            match cancellations_waiting(&self.pool, &self.worker_id).await {
                Ok(true) => self.renew.notify_one(),
                Ok(false) => {}
                Err(error) => {
                    crate::measure::database_error("listen");
                    tracing::warn!(error = %error, "looking for cancellations failed");
                }
            }
        }
    }

    fn wake_all(&self) {
        self.wake.notify_one();
        self.requests.notify_one();
        self.messages.notify_one();
        self.leases.notify_one();
        self.renew.notify_one();
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
            CHECK_CHANNEL => {}
            _ => self.wake.notify_one(),
        }
    }
}
