//! A store that fails on demand, and a look at a subject's sessions through the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use session_sidecar::session::testing::Store;
use session_sidecar::session::{Millis, StoreError, Watch};

/// Makes the store fail on demand (fault injection for fail-closed): every operation is
/// refused before it reaches the real store while `failing` is set.
pub struct Faulty {
    pub failing: AtomicBool,
}

impl Watch for Faulty {
    fn before(&self, _op: &'static str) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError::Backend("test", "injected failure".into()))
        } else {
            Ok(())
        }
    }
}

/// The handles of `subject`'s live sessions, sorted (the store knows no keys to list).
pub async fn subject_handles(store: &Arc<dyn Store>, subject: &str, now: Millis) -> Vec<String> {
    let mut handles: Vec<String> = store
        .subject_sessions(subject, now)
        .await
        .unwrap()
        .iter()
        .map(|(cell, _)| cell.handle())
        .collect();
    handles.sort();
    handles
}
