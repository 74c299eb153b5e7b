//! Shutdown as a value: a `CancellationToken` fired by the first SIGTERM or SIGINT.
//!
//! Every loop holds a clone of the token and stops when it fires; nothing polls a global.
//! A second signal means "now": agentd kills the processes of its running runs and stops the
//! embedded PostgreSQL it started (immediate shutdown), waiting at most
//! [`FORCED_EXIT_LIMIT`] for both, and exits; the runs' rows are not written, their leases
//! expire and a reaper fails them ("worker lost").

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit status after a second signal, as shells report a death by SIGINT.
const EXIT_ON_SECOND_SIGNAL: i32 = 130;

/// How long a second signal waits for the runs' processes and the embedded server to end.
pub const FORCED_EXIT_LIMIT: Duration = Duration::from_secs(2);

/// Blocks for good once a second signal has begun ending the process (its task exits with
/// [`EXIT_ON_SECOND_SIGNAL`]), so that a command finishing meanwhile does not exit first
/// with a status of its own.
pub fn wait_if_exiting_at_once() {
    while crate::process::forced_exit_begun() {
        std::thread::park();
    }
}

/// Starts listening for SIGTERM and SIGINT and returns the token the first one cancels.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let first = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutdown requested; a second signal exits at once"
        );
        first.cancel();
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::warn!(
            signal = name,
            "second signal: killing the runs' programs and stopping an embedded PostgreSQL started here, then exiting"
        );
        let left = tokio::task::spawn_blocking(|| {
            crate::process::end_before_forced_exit(FORCED_EXIT_LIMIT)
        })
        .await
        .unwrap_or(0);
        if left > 0 {
            tracing::error!(
                left,
                limit_ms = FORCED_EXIT_LIMIT.as_millis() as u64,
                "exiting before every program or server was seen to end"
            );
        }
        std::process::exit(EXIT_ON_SECOND_SIGNAL);
    });
    Ok(token)
}
