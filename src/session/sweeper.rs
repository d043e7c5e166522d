//! The background sweeper: removes expired records every `sweep_interval` until shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::chain;
use super::{Clock, Storage};

/// Runs until `stop` turns true; each pass reads only the expired part of the expiry index.
/// A new interval (a reload) counts from when it arrives.
pub async fn sweep_every(
    store: Storage,
    clock: Arc<dyn Clock>,
    mut every: watch::Receiver<Duration>,
    mut stop: watch::Receiver<bool>,
) {
    let ticker = |every: Duration, start: tokio::time::Instant| {
        let mut ticks = tokio::time::interval_at(start, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    };
    let mut ticks = ticker(*every.borrow_and_update(), tokio::time::Instant::now());
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            Ok(()) = every.changed() => {
                let period = *every.borrow_and_update();
                ticks = ticker(period, tokio::time::Instant::now() + period);
                continue;
            }
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
            Err(e) => tracing::error!(error = %chain(&e), "sweeping expired sessions failed"),
        }
    }
}
