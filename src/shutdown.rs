//! Shutdown as a value: a `CancellationToken` fired by the first SIGTERM or SIGINT.
//!
//! Every loop holds a clone of the token and stops when it fires; nothing polls a global.
//! A second signal means "now": the process exits at once (leases then expire normally).

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit status after a second signal, as shells report a death by SIGINT.
const EXIT_ON_SECOND_SIGNAL: i32 = 130;

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
        tracing::warn!(signal = name, "second signal: exiting now");
        std::process::exit(EXIT_ON_SECOND_SIGNAL);
    });
    Ok(token)
}
