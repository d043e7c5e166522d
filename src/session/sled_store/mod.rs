//! The embedded store: sled, one process per directory.
//!
//! Sessions live in the `records` tree, one compare-and-swap cell per key; the shared
//! [`Engine`](super::engine::Engine) does the merge, cycle and no-resurrection logic on top.
//! (sled's multi-tree transactions take a process-wide write lock and, once used, put every
//! other operation behind a read lock; single-key CAS keeps reads and writes concurrent.)
//!
//! The `expiry` and `subjects` indexes are written before the swap that needs them and cleaned
//! after it, so a crash can leave an extra index entry (the sweeper and the subject lookup check
//! the record and drop it) but not a missing one. The three steps of one key's swap hold that
//! key's lock stripe: otherwise a swap's clean-up could remove the entry a later swap of the same
//! key had just written (untag racing a tag: a session "log out everywhere" would miss).
//!
//! Durability: [`Store::sync`] hands the caller to a committer thread that runs one flush for
//! every caller queued meanwhile (group commit): sled's flush, then `fdatasync` of its files,
//! which sled's own flush does not do (see `commit`).

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use tokio::sync::oneshot;

mod commit;
mod index;

use commit::{Committer, spawn_committer};
pub use index::BUCKET_MS;
use index::{index_end, index_key, subject_key};

use super::engine::{Cells, Engine};
use super::entry::{Codec, Entry, Head};
use super::store::{StoreError, Swept};
use super::{Millis, Policy};

/// What the embedded store needs to open.
#[derive(Debug, Clone)]
pub struct SledSettings {
    /// The sled directory (one process at a time).
    pub path: std::path::PathBuf,
    /// Sync (sled's flush and `fdatasync`) before a change is acknowledged.
    pub durable: bool,
    /// sled's page cache, in bytes.
    pub cache_capacity: u64,
}

/// The embedded store: the shared [`Engine`] over sled's cells.
pub type SledStore = Engine<SledCells>;

/// The database, its three trees (the cells are the `records` tree's entries) and the
/// group-commit thread.
pub struct SledCells {
    db: sled::Db,
    records: sled::Tree,
    index: sled::Tree,
    subjects: sled::Tree,
    committer: Option<Committer>,
    /// Lock stripes, by key hash: one key's index writes and swap happen as one step.
    stripes: Box<[std::sync::Mutex<()>]>,
    codec: ArcSwap<Codec>,
}

const STRIPES: usize = 64;

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl SledStore {
    pub fn open(
        cfg: &SledSettings,
        policy: Arc<Policy>,
        max_bytes: usize,
    ) -> Result<SledStore, StoreError> {
        let path = cfg.path.display().to_string();
        let db = sled::Config::new()
            .path(&cfg.path)
            .cache_capacity(cfg.cache_capacity)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| {
                let text = e.to_string();
                let locked = matches!(&e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock)
                    || text.contains("acquire lock");
                if locked {
                    StoreError::Locked { path: path.clone() }
                } else {
                    StoreError::Open {
                        path: path.clone(),
                        reason: text,
                    }
                }
            })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|e| StoreError::Open {
                path: path.clone(),
                reason: e.to_string(),
            })
        };
        let committer = cfg
            .durable
            .then(|| spawn_committer(db.clone(), &cfg.path))
            .transpose()
            .map_err(|e| StoreError::Open {
                path: path.clone(),
                reason: format!("preparing durable commits: {e}"),
            })?;
        let cells = SledCells {
            records: tree("records")?,
            index: tree("expiry")?,
            subjects: tree("subjects")?,
            db,
            committer,
            stripes: (0..STRIPES).map(|_| std::sync::Mutex::new(())).collect(),
            codec: ArcSwap::from_pointee(Codec::plain()),
        };
        Ok(Engine {
            cells,
            policy: ArcSwap::new(policy),
            max_bytes,
        })
    }

    /// Records written from now on are sealed with `codec` (unsealed ones still read).
    pub fn sealed(mut self, codec: Codec) -> SledStore {
        self.cells.codec = ArcSwap::from_pointee(codec);
        self
    }

    /// Number of entries (sessions and forwards, live or not yet swept).
    pub fn len(&self) -> usize {
        self.cells.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.records.is_empty()
    }
}

impl SledCells {
    fn stripe(&self, key: &str) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
        // A panic while holding a stripe leaves nothing half-done that the lock protects.
        self.stripes[h as usize % STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The swap of [`Cells::swap`], synchronously, under the key's stripe.
    fn swap_now(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        old: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<bool, StoreError> {
        let _stripe = self.stripe(key);
        if let Some(n) = new {
            self.index_new(key, old, n)?;
        }
        let swapped = self
            .records
            .compare_and_swap(key, expected, new.map(|n| self.codec.load().encode(key, n)))
            .map_err(backend)?
            .is_ok();
        if swapped && let Some(o) = old {
            self.unindex_old(key, o, new)?;
        }
        Ok(swapped)
    }

    /// Index entries the new state needs, written before the CAS that installs it.
    fn index_new(&self, key: &str, old: Option<&Entry>, new: &Entry) -> Result<(), StoreError> {
        if old.is_none_or(|o| index_key(o.deadline(), key) != index_key(new.deadline(), key)) {
            self.index
                .insert(index_key(new.deadline(), key), &[])
                .map_err(backend)?;
        }
        if let Entry::Session(r) = new {
            let old_subject = match old {
                Some(Entry::Session(o)) => o.subject.as_deref(),
                _ => None,
            };
            if let Some(s) = r.subject.as_deref().filter(|s| Some(*s) != old_subject) {
                self.subjects
                    .insert(subject_key(s, key), &[])
                    .map_err(backend)?;
            }
        }
        Ok(())
    }

    /// Index entries the old state no longer needs, removed after the CAS that replaced it.
    fn unindex_old(&self, key: &str, old: &Entry, new: Option<&Entry>) -> Result<(), StoreError> {
        let old_index = index_key(old.deadline(), key);
        if new.is_none_or(|n| index_key(n.deadline(), key) != old_index) {
            self.index.remove(old_index).map_err(backend)?;
        }
        if let Entry::Session(o) = old {
            let new_subject = match new {
                Some(Entry::Session(n)) => n.subject.as_deref(),
                _ => None,
            };
            if let Some(s) = o.subject.as_deref().filter(|s| Some(*s) != new_subject) {
                self.subjects.remove(subject_key(s, key)).map_err(backend)?;
            }
        }
        Ok(())
    }
}

impl SledCells {
    /// One expiry index entry: removes the record if it is due, fixes or drops a stale entry.
    /// A record that cannot be decoded is removed when its head says it is due, and otherwise
    /// skipped with an error in the log: one bad record must not stop the sweeper.
    fn sweep_one(
        &self,
        entry_key: &[u8],
        now: Millis,
        swept: &mut Swept,
    ) -> Result<(), StoreError> {
        let key = String::from_utf8_lossy(&entry_key[8..]).into_owned();
        let Some(raw) = self.records.get(&key).map_err(backend)? else {
            return self.index.remove(entry_key).map(|_| ()).map_err(backend);
        };
        let head = match Head::read(&raw) {
            Ok(head) => head,
            Err(e) => {
                tracing::error!(handle = %super::id::handle(&key), error = %e, "unreadable session record left in place; its index entry is dropped");
                return self.index.remove(entry_key).map(|_| ()).map_err(backend);
            }
        };
        let deadline = match head {
            Head::Session { deadline } => deadline,
            Head::Moved { until } => until,
        };
        if deadline <= now {
            let entry = self.codec.load().decode(&key, &raw);
            if let Err(e) = &entry {
                tracing::error!(handle = %super::id::handle(&key), error = %e, "removing an expired session record that cannot be decoded");
            }
            if self.swap_now(&key, Some(&raw), entry.as_ref().ok(), None)? {
                match head {
                    Head::Session { .. } => swept.sessions += 1,
                    Head::Moved { .. } => swept.forwards += 1,
                }
            }
            return self.index.remove(entry_key).map(|_| ()).map_err(backend);
        }
        // Not expired yet: keep the entry if it is the record's current one; otherwise it is
        // stale (the record moved on) and the current one must exist instead.
        let current = index_key(deadline, &key);
        if current[..] != entry_key[..] {
            self.index.insert(current, &[]).map_err(backend)?;
            self.index.remove(entry_key).map_err(backend)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Cells for SledCells {
    fn codec(&self) -> &ArcSwap<Codec> {
        &self.codec
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.records.get(key).map_err(backend)?.map(|v| v.to_vec()))
    }

    async fn swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        old: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<bool, StoreError> {
        self.swap_now(key, expected, old, new)
    }

    async fn subject_members(&self, subject: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        for item in self.subjects.scan_prefix(subject_key(subject, "")) {
            let (k, _) = item.map_err(backend)?;
            keys.push(String::from_utf8_lossy(&k[subject.len() + 1..]).into_owned());
        }
        Ok(keys)
    }

    async fn find_key(
        &self,
        wanted: &(dyn for<'k> Fn(&'k str) -> bool + Sync),
    ) -> Result<Option<String>, StoreError> {
        for (i, key) in self.records.iter().keys().enumerate() {
            let key = key.map_err(backend)?;
            if let Ok(key) = std::str::from_utf8(&key)
                && wanted(key)
            {
                return Ok(Some(key.to_string()));
            }
            if i % 1024 == 1023 {
                tokio::task::yield_now().await;
            }
        }
        Ok(None)
    }

    async fn forget_member(&self, subject: &str, key: &str) -> Result<(), StoreError> {
        self.subjects
            .remove(subject_key(subject, key))
            .map(|_| ())
            .map_err(backend)
    }

    async fn sweep(&self, now: Millis) -> Result<Swept, StoreError> {
        let mut swept = Swept::default();
        // Deadlines up to `now` sit in buckets up to one bucket past it; the exact deadline
        // decides. Entries kept (not yet expired) are stepped over, not read again.
        let end = index_end(now.saturating_add(BUCKET_MS));
        let mut start: Vec<u8> = Vec::new();
        loop {
            let batch: Vec<sled::IVec> = self
                .index
                .range(start.clone()..end.to_vec())
                .keys()
                .take(256)
                .collect::<Result<_, _>>()
                .map_err(backend)?;
            if batch.is_empty() {
                return Ok(swept);
            }
            for entry_key in batch {
                self.sweep_one(&entry_key, now, &mut swept)?;
                start = entry_key.to_vec();
                start.push(0);
            }
            // sled's calls block; a long sweep must leave the worker to the requests between
            // batches.
            tokio::task::yield_now().await;
        }
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let Some(committer) = &self.committer else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        committer
            .sender
            .send(tx)
            .map_err(|_| backend("the commit thread has stopped"))?;
        rx.await
            .map_err(|_| backend("the commit thread has stopped"))?
            .map_err(StoreError::Backend)
    }

    /// A read answers from sled's cache even when its disk is gone, so readiness is a real
    /// write of a probe (in the default tree, out of the sessions' way) that must reach the
    /// disk as an acknowledged change does: a full or failed volume makes the store unready.
    async fn ping(&self) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.db
            .insert(b"readiness-probe", &now.to_be_bytes())
            .map_err(backend)?;
        if self.committer.is_some() {
            self.sync().await
        } else {
            self.db.flush_async().await.map(|_| ()).map_err(backend)
        }
    }
}

impl Drop for SledCells {
    /// Flushes, and joins the commit thread so its handle on the database (and the directory
    /// lock) is gone when the store is.
    fn drop(&mut self) {
        let _ = self.db.flush();
        if let Some(mut c) = self.committer.take() {
            drop(c.sender);
            if let Some(t) = c.thread.take() {
                let _ = t.join();
            }
        }
    }
}
