//! The drain on shutdown: what is still running (requests, connections, spliced upgrades), and
//! the wait for it under the grace period.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// What is still running: requests whose response is not fully sent, connections, and spliced
/// (upgraded) connections. The drain waits for all of them; when its grace runs out, the
/// splices are told to close.
pub struct Tracker {
    requests: AtomicUsize,
    connections: AtomicUsize,
    splices: AtomicUsize,
    changed: Notify,
    draining: Arc<AtomicBool>,
    drain: watch::Sender<bool>,
    cut: watch::Sender<bool>,
}

impl Tracker {
    /// `draining` is shared with whoever reports readiness (the admin listener).
    pub fn new(draining: Arc<AtomicBool>) -> Arc<Tracker> {
        Arc::new(Tracker {
            requests: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            splices: AtomicUsize::new(0),
            changed: Notify::new(),
            draining,
            drain: watch::channel(false).0,
            cut: watch::channel(false).0,
        })
    }

    fn all_done(&self) -> bool {
        self.requests.load(Ordering::SeqCst) == 0
            && self.connections.load(Ordering::SeqCst) == 0
            && self.splices.load(Ordering::SeqCst) == 0
    }

    async fn wait_all_done(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.all_done() {
                return;
            }
            notified.await;
        }
    }

    /// Resolves when the grace has run out: an upgraded connection should close then.
    pub async fn cut(&self) {
        let mut rx = self.cut.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Counts a spliced connection for as long as the guard lives.
    pub fn splice(self: &Arc<Tracker>) -> Guard {
        Guard::enter(self, |t| &t.splices)
    }

    /// Counts a request for as long as the guard lives (until its response is fully sent).
    pub fn request(self: &Arc<Tracker>) -> Guard {
        Guard::enter(self, |t| &t.requests)
    }

    /// Counts a connection for as long as the guard lives.
    pub fn connection(self: &Arc<Tracker>) -> Guard {
        Guard::enter(self, |t| &t.connections)
    }

    /// Turns true when the drain starts: connections should close once idle.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.drain.subscribe()
    }
}

/// Decrements one of the [`Tracker`]'s counts when dropped.
pub struct Guard {
    tracker: Arc<Tracker>,
    count: fn(&Tracker) -> &AtomicUsize,
}

impl Guard {
    fn enter(tracker: &Arc<Tracker>, count: fn(&Tracker) -> &AtomicUsize) -> Guard {
        count(tracker).fetch_add(1, Ordering::SeqCst);
        Guard {
            tracker: tracker.clone(),
            count,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        (self.count)(&self.tracker).fetch_sub(1, Ordering::SeqCst);
        // Only the drain waits; before it starts, its first check sees the count anyway.
        if self.tracker.draining.load(Ordering::SeqCst) {
            self.tracker.changed.notify_waiters();
        }
    }
}

/// Marks the sidecar as draining, asks every connection to close, and waits up to `grace` for
/// what is in flight. Returns the requests still in flight when the grace ran out.
pub async fn drain(tracker: &Arc<Tracker>, grace: Duration) -> usize {
    tracker.draining.store(true, Ordering::SeqCst);
    let _ = tracker.drain.send(true);
    tracing::info!(
        grace_s = grace.as_secs(),
        "shutting down: listener closed, draining requests"
    );
    let drained = tokio::time::timeout(grace, tracker.wait_all_done())
        .await
        .is_ok();
    if drained {
        return 0;
    }
    let splices = tracker.splices.load(Ordering::SeqCst);
    if splices > 0 {
        tracing::warn!(
            splices,
            "closing upgraded connections still open at the end of the grace"
        );
        let _ = tracker.cut.send(true);
    }
    tracker.requests.load(Ordering::SeqCst)
}
