//! The opened session store as the rest of the sidecar holds it ([`Storage`]), and the one
//! place its operations can be watched ([`Watch`]: the metrics count and time them).
//!
//! Outside `session`, a [`Storage`] offers only [`Upkeep`]: the admin listener's look-ups and
//! removals, the sweep, the reload's reconfigure, the shutdown flush, readiness. What a request
//! does to its session goes through the [`Sessions`](super::Sessions) built on it; the
//! [`Store`] trait that does it is private to `session`.

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::entry::Codec;
use super::redis_store::{RedisSettings, RedisStore};
use super::sled_store::{SledSettings, SledStore};
use super::store::{
    Cell, Liveness, Lookup, Mark, Seen, Store, StoreError, Swept, Update, UpdateError, Updated,
    Upkeep,
};
use super::{Millis, Policy, Record};

/// Which store to open, and how.
pub enum Backend<'a> {
    Sled(SledSettings),
    Redis(&'a RedisSettings),
}

/// The opened store. Cloning shares it.
#[derive(Clone)]
pub struct Storage(Arc<dyn Store>);

impl Storage {
    /// Opens `backend` with the expiry policy and record codec the configuration gives;
    /// `max_bytes` caps a session's stored data.
    pub async fn open(
        backend: Backend<'_>,
        policy: Arc<Policy>,
        codec: Codec,
        max_bytes: usize,
    ) -> Result<Storage, StoreError> {
        let store: Arc<dyn Store> = match backend {
            Backend::Sled(settings) => {
                Arc::new(SledStore::open(&settings, policy, max_bytes)?.sealed(codec))
            }
            Backend::Redis(settings) => Arc::new(
                RedisStore::connect(settings, policy, max_bytes)
                    .await?
                    .sealed(codec),
            ),
        };
        Ok(Storage(store))
    }

    /// The same store, every operation of which `watch` sees.
    pub fn watched(&self, watch: Arc<dyn Watch>) -> Storage {
        Storage(Arc::new(Watched {
            inner: self.0.clone(),
            watch,
        }))
    }

    pub(super) fn store(&self) -> &Arc<dyn Store> {
        &self.0
    }

    #[cfg(any(test, feature = "testing"))]
    pub(super) fn from_store(store: Arc<dyn Store>) -> Storage {
        Storage(store)
    }
}

impl Deref for Storage {
    type Target = dyn Upkeep;

    fn deref(&self) -> &(dyn Upkeep + 'static) {
        &*self.0
    }
}

/// Sees every store operation. `op` names it as the metrics label it: `load`, `create`,
/// `update`, `liveness`, `touch`, `remove`, `subject_keys`, `find_handle`, `sweep`, `sync`,
/// `ping`.
pub trait Watch: Send + Sync + 'static {
    /// Before `op` reaches the store; an error fails it without reaching the store (the tests
    /// make a store fail on demand with it).
    fn before(&self, _op: &'static str) -> Result<(), StoreError> {
        Ok(())
    }

    /// After `op` returned, `took` long.
    fn after(&self, _op: &'static str, _took: Duration, _ok: bool) {}

    /// A sweep removed these.
    fn swept(&self, _swept: &Swept) {}
}

/// A store whose every operation a [`Watch`] sees.
struct Watched {
    inner: Arc<dyn Store>,
    watch: Arc<dyn Watch>,
}

impl Watched {
    async fn watch<T, E: From<StoreError>>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        self.watch.before(op)?;
        let started = Instant::now();
        let result = call.await;
        self.watch.after(op, started.elapsed(), result.is_ok());
        result
    }
}

#[async_trait]
impl Upkeep for Watched {
    fn reconfigure(&self, policy: Arc<Policy>, codec: Codec) {
        self.inner.reconfigure(policy, codec)
    }
    async fn load(&self, key: &str, now: Millis) -> Result<Option<Record>, StoreError> {
        self.watch("load", self.inner.load(key, now)).await
    }
    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.watch("remove", self.inner.remove(key)).await
    }
    async fn subject_sessions(
        &self,
        subject: &str,
        now: Millis,
    ) -> Result<Vec<(Cell, Record)>, StoreError> {
        let call = self.inner.subject_sessions(subject, now);
        self.watch("subject_keys", call).await
    }
    async fn find_handle(&self, handle: &str) -> Result<Option<Cell>, StoreError> {
        self.watch("find_handle", self.inner.find_handle(handle))
            .await
    }
    async fn load_stored(
        &self,
        cell: &Cell,
        now: Millis,
    ) -> Result<Option<(Record, bool)>, StoreError> {
        self.watch("load", self.inner.load_stored(cell, now)).await
    }
    async fn remove_stored(&self, cell: &Cell) -> Result<bool, StoreError> {
        self.watch("remove", self.inner.remove_stored(cell)).await
    }
    async fn sweep(&self, now: Millis) -> Result<Swept, StoreError> {
        let swept = self.watch("sweep", self.inner.sweep(now)).await;
        if let Ok(s) = &swept {
            self.watch.swept(s);
        }
        swept
    }
    async fn sync(&self) -> Result<(), StoreError> {
        self.watch("sync", self.inner.sync()).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.watch("ping", self.inner.ping()).await
    }
}

#[async_trait]
impl Store for Watched {
    async fn lookup(&self, key: &str, now: Millis) -> Result<Lookup, StoreError> {
        self.watch("load", self.inner.lookup(key, now)).await
    }
    async fn create(&self, key: &str, record: &Record) -> Result<bool, StoreError> {
        self.watch("create", self.inner.create(key, record)).await
    }
    async fn update(&self, update: Update<'_>) -> Result<Updated, UpdateError> {
        self.watch("update", self.inner.update(update)).await
    }
    fn mark(&self) -> Option<Mark> {
        self.inner.mark()
    }
    async fn liveness(
        &self,
        key: &str,
        now: Millis,
        seen: Option<Seen>,
    ) -> Result<Liveness, StoreError> {
        self.watch("liveness", self.inner.liveness(key, now, seen))
            .await
    }
    async fn touch(&self, key: &str, now: Millis) -> Result<(), StoreError> {
        self.watch("touch", self.inner.touch(key, now)).await
    }
    async fn retire(&self, key: &str, now: Millis) -> Result<bool, StoreError> {
        self.watch("remove", self.inner.retire(key, now)).await
    }
}
