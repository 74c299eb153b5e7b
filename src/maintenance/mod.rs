//! Periodic services that keep the shared state healthy, one per file, each shaped as
//! `async fn run(self, stop: CancellationToken)`. Any replica may run them; row locks (the
//! reaper) or a hold recorded in `agentd.maintenance` (retention) make their work happen
//! once.

pub mod reaper;
pub mod retention;
