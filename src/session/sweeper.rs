//! The background sweeper: removes expired records every `sweep_interval` until shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Clock;
use super::store::Store;

/// Runs until `stop` turns true; each pass reads only the expired part of the expiry index.
pub async fn run(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match store.sweep(clock.now()).await {
            Ok(s) if s.sessions + s.forwards > 0 => {
                tracing::info!(
                    sessions = s.sessions,
                    forwards = s.forwards,
                    "swept expired records"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "sweeping expired sessions failed"),
        }
    }
}
