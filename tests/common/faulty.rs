//! A store that fails on demand, and a look at a subject's sessions through the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use session_sidecar::session::changes::Change;
use session_sidecar::session::store::{
    Cell, Liveness, Lookup, Mark, Seen as Loaded, Store, StoreError, Swept, UpdateError, Updated,
};
use session_sidecar::session::{Millis, Record};

/// A store that fails on demand, wrapping the real sled store: fault injection for fail-closed.
pub struct Faulty {
    pub inner: Arc<dyn Store>,
    pub failing: AtomicBool,
}

impl Faulty {
    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError::Backend("injected failure".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl Store for Faulty {
    fn reconfigure(
        &self,
        policy: Arc<session_sidecar::session::Policy>,
        codec: session_sidecar::session::entry::Codec,
    ) {
        self.inner.reconfigure(policy, codec)
    }
    async fn load(&self, key: &str, now: Millis) -> Result<Option<Record>, StoreError> {
        self.check()?;
        self.inner.load(key, now).await
    }
    async fn create(&self, key: &str, record: &Record) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.create(key, record).await
    }
    async fn lookup(&self, key: &str, now: Millis) -> Result<Lookup, StoreError> {
        self.check()?;
        self.inner.lookup(key, now).await
    }
    async fn update(
        &self,
        key: &str,
        seen: Option<(&Record, &[u8])>,
        change: &Change,
        new_key: Option<&str>,
        now: Millis,
        force: bool,
    ) -> Result<Updated, UpdateError> {
        self.check()?;
        self.inner
            .update(key, seen, change, new_key, now, force)
            .await
    }
    fn mark(&self) -> Option<Mark> {
        self.inner.mark()
    }
    async fn liveness(
        &self,
        key: &str,
        now: Millis,
        seen: Option<Loaded>,
    ) -> Result<Liveness, StoreError> {
        self.check()?;
        self.inner.liveness(key, now, seen).await
    }
    async fn touch(&self, key: &str, now: Millis) -> Result<(), StoreError> {
        self.check()?;
        self.inner.touch(key, now).await
    }
    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.remove(key).await
    }
    async fn retire(&self, key: &str, now: Millis) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.retire(key, now).await
    }
    async fn subject_sessions(
        &self,
        subject: &str,
        now: Millis,
    ) -> Result<Vec<(Cell, Record)>, StoreError> {
        self.check()?;
        self.inner.subject_sessions(subject, now).await
    }
    async fn find_handle(&self, handle: &str) -> Result<Option<Cell>, StoreError> {
        self.check()?;
        self.inner.find_handle(handle).await
    }
    async fn load_stored(
        &self,
        cell: &Cell,
        now: Millis,
    ) -> Result<Option<(Record, bool)>, StoreError> {
        self.check()?;
        self.inner.load_stored(cell, now).await
    }
    async fn remove_stored(&self, cell: &Cell) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.remove_stored(cell).await
    }
    async fn sweep(&self, now: Millis) -> Result<Swept, StoreError> {
        self.check()?;
        self.inner.sweep(now).await
    }
    async fn sync(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.sync().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.ping().await
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
