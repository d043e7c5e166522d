//! The embedded store: sled, one process per directory.
//!
//! Sessions live in the `sessions` tree, one compare-and-swap cell per key digest; the shared
//! [`Engine`] does the merge, cycle and no-resurrection logic on top.
//! Its indexes are `deadlines` (expiry) and `tagged` (subject digest → cells). The release
//! before kept sessions under their keys in clear in `records`, with `expiry` and `subjects`
//! (subjects in clear): those trees are still read, and emptied by the sweeper as their cells
//! move to their digests.
//! (sled's multi-tree transactions take a process-wide write lock and, once used, put every
//! other operation behind a read lock; single-key CAS keeps reads and writes concurrent.)
//!
//! The `expiry` and `subjects` indexes are written before the swap that needs them and cleaned
//! after it, so a crash can leave an extra index entry (the sweeper and the subject lookup check
//! the record and drop it) but not a missing one. The three steps of one key's swap hold that
//! key's lock stripe: otherwise a swap's clean-up could remove the entry a later swap of the same
//! key had just written (untag racing a tag: a session "log out everywhere" would miss).
//!
//! Durability: every change to the trees is also appended to a write-ahead log of operations
//! (`wal`), under the key's stripe; `Store::sync` hands the caller to a committer thread that
//! writes what every caller queued meanwhile logged and `fdatasync`s the log file: one device
//! flush per group (group commit). sled's own files are made durable at checkpoints (sled's
//! flush, then `fdatasync` of its files, see `commit`); at open, the log is replayed over them.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use tokio::sync::oneshot;

mod commit;
mod index;
mod wal;
mod writes;

use commit::{Ask, Committer, spawn_committer};
pub use index::BUCKET_MS;
use index::{index_end, index_key, subject_key};
use wal::Log;
use writes::Writes;

use super::engine::{Cells, Engine, Indexed};
use super::entry::{Codec, Head};
use super::store::{BoxError, Cell, Mark, StoreError, Swept};
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

/// The database, its trees and the group-commit thread.
pub struct SledCells {
    db: sled::Db,
    current: Trees,
    legacy: Trees,
    /// The operations not yet in the write-ahead log (durable stores only).
    log: Option<Arc<Log>>,
    committer: Option<Committer>,
    /// Lock stripes, by key hash: one key's index writes and swap happen as one step.
    stripes: Box<[std::sync::Mutex<()>]>,
    codec: ArcSwap<Codec>,
    /// Every write counted, for the liveness check of read-only requests (`writes`).
    writes: Writes,
}

/// A cell tree and its two indexes.
struct Trees {
    records: Logged,
    index: Logged,
    subjects: Logged,
}

/// A tree whose changes also go to the write-ahead log, when the store is durable. Its methods
/// that change the tree shadow sled's; reads go to the tree itself. A change is logged before
/// sled applies it, under the key's stripe (`SledCells::stripe`): one key's entries are in the
/// order sled applied them, and whoever sees a change logs after it (see `wal`).
struct Logged {
    tree: sled::Tree,
    /// The tree's number in the log (`wal::TREES`).
    id: u8,
    log: Option<Arc<Log>>,
}

impl std::ops::Deref for Logged {
    type Target = sled::Tree;
    fn deref(&self) -> &sled::Tree {
        &self.tree
    }
}

impl Logged {
    fn insert(&self, key: impl AsRef<[u8]>, value: &[u8]) -> sled::Result<()> {
        if let Some(log) = &self.log {
            log.insert(self.id, key.as_ref(), value);
        }
        self.tree.insert(key.as_ref(), value).map(|_| ())
    }

    fn remove(&self, key: impl AsRef<[u8]>) -> sled::Result<()> {
        if let Some(log) = &self.log {
            log.remove(self.id, key.as_ref());
        }
        self.tree.remove(key.as_ref()).map(|_| ())
    }

    /// sled's compare-and-swap of a record, `new` with what its indexes say of it.
    fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<(&[u8], &Indexed)>,
    ) -> sled::Result<Result<(), sled::CompareAndSwapError>> {
        let bytes = new.map(|(b, _)| b);
        let Some(log) = &self.log else {
            return self.tree.compare_and_swap(key, expected, bytes);
        };
        // Under the key's stripe nobody else changes it: whether the swap happens is known
        // before it does, and the log gets it first.
        let current = self.tree.get(key)?;
        if current.as_deref() != expected {
            return Ok(Err(sled::CompareAndSwapError {
                current,
                proposed: bytes.map(sled::IVec::from),
            }));
        }
        match new {
            Some((value, indexed)) => log.insert_record(
                self.id,
                key.as_bytes(),
                value,
                indexed.deadline,
                indexed.tag.as_deref(),
            ),
            None => log.remove(self.id, key.as_bytes()),
        }
        let swapped = self.tree.compare_and_swap(key, expected, bytes)?;
        if let Err(lost) = &swapped {
            // Not under a stripe after all: the log must still say what the tree holds.
            match &lost.current {
                Some(v) => log.insert(self.id, key.as_bytes(), v),
                None => log.remove(self.id, key.as_bytes()),
            }
        }
        Ok(swapped)
    }

    fn clear(&self) -> sled::Result<()> {
        if let Some(log) = &self.log {
            log.clear(self.id);
        }
        self.tree.clear()
    }
}

const STRIPES: usize = 64;

/// Which of `slots` slots `name` falls in (the lock stripes, the write count's slots).
fn slot(name: &str, slots: usize) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(name) as usize % slots
}

/// A sweep writes its part of the write-ahead log whenever this much is pending.
const SWEEP_LOG_BYTES: usize = 1 << 20;

fn backend(e: impl Into<BoxError>) -> StoreError {
    StoreError::Backend("sled", e.into())
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
        let open_error = |reason: String| StoreError::Open {
            path: path.clone(),
            reason,
        };
        // A crash leaves changes in the write-ahead log that sled's files may lack: they are
        // applied before anything reads the trees.
        let last = commit::recover(&db, &cfg.path)
            .map_err(|e| open_error(format!("replaying the write-ahead log: {e}")))?;
        let log = cfg.durable.then(|| Arc::new(Log::default()));
        let committer = match &log {
            Some(log) => Some(
                spawn_committer(db.clone(), &cfg.path, log.clone(), last)
                    .map_err(|e| open_error(format!("preparing durable commits: {e}")))?,
            ),
            None => {
                // `durable = false` after a durable run: the log is replayed and checkpointed.
                wal::remove_files(&cfg.path)
                    .map_err(|e| open_error(format!("removing the write-ahead log: {e}")))?;
                None
            }
        };
        let tree = |id: u8| {
            Ok(Logged {
                tree: db
                    .open_tree(wal::TREES[id as usize])
                    .map_err(|e| open_error(e.to_string()))?,
                id,
                log: log.clone(),
            })
        };
        let cells = SledCells {
            current: Trees {
                records: tree(1)?,
                index: tree(2)?,
                subjects: tree(3)?,
            },
            legacy: Trees {
                records: tree(4)?,
                index: tree(5)?,
                subjects: tree(6)?,
            },
            log,
            db,
            committer,
            stripes: (0..STRIPES).map(|_| std::sync::Mutex::new(())).collect(),
            codec: ArcSwap::from_pointee(Codec::plain()),
            writes: Writes::default(),
        };
        Ok(Engine::new(cells, policy, max_bytes))
    }

    /// Records written from now on are sealed with `codec` (unsealed ones still read).
    pub fn sealed(mut self, codec: Codec) -> SledStore {
        self.cells.codec = ArcSwap::from_pointee(codec);
        self
    }

    /// Number of entries (sessions and forwards, live or not yet swept).
    #[cfg(feature = "testing")]
    pub fn len(&self) -> usize {
        self.cells.current.records.len() + self.cells.legacy.records.len()
    }

    #[cfg(feature = "testing")]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SledCells {
    fn trees(&self, cell: &Cell) -> &Trees {
        if cell.legacy {
            &self.legacy
        } else {
            &self.current
        }
    }

    fn stripe(&self, name: &str) -> std::sync::MutexGuard<'_, ()> {
        // A panic while holding a stripe leaves nothing half-done that the lock protects.
        self.stripes[slot(name, STRIPES)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `ask` to the commit thread and waits for its answer.
    async fn ask(&self, ask: Ask) -> Result<(), StoreError> {
        let Some(committer) = &self.committer else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        committer
            .sender
            .send((ask, tx))
            .map_err(|_| backend("the commit thread has stopped"))?;
        rx.await
            .map_err(|_| backend("the commit thread has stopped"))?
            .map_err(backend)
    }

    /// An index change of `cell` outside its swap, under its stripe (see [`Logged`]).
    fn under_stripe<T>(
        &self,
        cell: &Cell,
        change: impl FnOnce() -> sled::Result<T>,
    ) -> Result<T, StoreError> {
        let _stripe = self.stripe(&cell.name);
        change().map_err(backend)
    }

    /// The swap of [`Cells::swap`], synchronously, under the cell's stripe.
    fn swap_now(
        &self,
        cell: &Cell,
        expected: Option<&[u8]>,
        old: Option<&Indexed>,
        new: Option<(&[u8], &Indexed)>,
    ) -> Result<bool, StoreError> {
        let _stripe = self.stripe(&cell.name);
        let trees = self.trees(cell);
        let key = cell.name.as_str();
        if let Some((_, n)) = new {
            trees.index_new(key, old, n)?;
        }
        let swapped = trees
            .records
            .compare_and_swap(key, expected, new)
            .map_err(backend)?
            .is_ok();
        if swapped {
            self.writes.wrote(cell);
            if let Some(o) = old {
                trees.unindex_old(key, o, new.map(|(_, n)| n))?;
            }
        }
        Ok(swapped)
    }
}

impl Trees {
    /// Index entries the new state needs, written before the CAS that installs it.
    fn index_new(&self, key: &str, old: Option<&Indexed>, new: &Indexed) -> Result<(), StoreError> {
        if old.is_none_or(|o| index_key(o.deadline, key) != index_key(new.deadline, key)) {
            self.index
                .insert(index_key(new.deadline, key), &[])
                .map_err(backend)?;
        }
        let old_tag = old.and_then(|o| o.tag.as_deref());
        if let Some(t) = new.tag.as_deref().filter(|t| Some(*t) != old_tag) {
            self.subjects
                .insert(subject_key(t, key), &[])
                .map_err(backend)?;
        }
        Ok(())
    }

    /// Index entries the old state no longer needs, removed after the CAS that replaced it.
    fn unindex_old(
        &self,
        key: &str,
        old: &Indexed,
        new: Option<&Indexed>,
    ) -> Result<(), StoreError> {
        let old_index = index_key(old.deadline, key);
        if new.is_none_or(|n| index_key(n.deadline, key) != old_index) {
            self.index.remove(old_index).map_err(backend)?;
        }
        let new_tag = new.and_then(|n| n.tag.as_deref());
        if let Some(t) = old.tag.as_deref().filter(|t| Some(*t) != new_tag) {
            self.subjects.remove(subject_key(t, key)).map_err(backend)?;
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
        legacy: bool,
        entry_key: &[u8],
        now: Millis,
        swept: &mut Swept,
    ) -> Result<(), StoreError> {
        let name = String::from_utf8_lossy(&entry_key[8..]).into_owned();
        let cell = Cell { name, legacy };
        let trees = self.trees(&cell);
        let drop_entry = || self.under_stripe(&cell, || trees.index.remove(entry_key));
        let Some(raw) = trees.records.get(&cell.name).map_err(backend)? else {
            return drop_entry();
        };
        let head = match Head::read(&raw) {
            Ok(head) => head,
            Err(e) => {
                tracing::error!(handle = %cell.handle(), error = %e, "unreadable session record left in place; its index entry is dropped");
                return drop_entry();
            }
        };
        let deadline = match head {
            Head::Session { deadline } => deadline,
            Head::Moved { until } => until,
        };
        if deadline <= now {
            let tag = match self.codec.load().read(cell.reader(), &raw) {
                Ok(d) => d.tag,
                Err(e) => {
                    tracing::error!(handle = %cell.handle(), error = %e, "removing an expired session record that cannot be decoded");
                    None
                }
            };
            let old = Indexed {
                deadline,
                tag,
                session: matches!(head, Head::Session { .. }),
            };
            if self.swap_now(&cell, Some(&raw), Some(&old), None)? {
                match head {
                    Head::Session { .. } => swept.sessions += 1,
                    Head::Moved { .. } => swept.forwards += 1,
                }
            }
            return drop_entry();
        }
        // Not expired yet: keep the entry if it is the record's current one; otherwise it is
        // stale (the record moved on) and the current one must exist instead.
        let current = index_key(deadline, &cell.name);
        if current[..] != entry_key[..] {
            self.under_stripe(&cell, || {
                trees.index.insert(current, &[])?;
                trees.index.remove(entry_key)
            })?;
        }
        Ok(())
    }

    /// Sweeps one expiry index (the current or the legacy one).
    async fn sweep_index(
        &self,
        legacy: bool,
        now: Millis,
        swept: &mut Swept,
    ) -> Result<(), StoreError> {
        let index = if legacy {
            &self.legacy.index
        } else {
            &self.current.index
        };
        // Deadlines up to `now` sit in buckets up to one bucket past it; the exact deadline
        // decides. Entries kept (not yet expired) are stepped over, not read again.
        let end = index_end(now.saturating_add(BUCKET_MS));
        let mut start: Vec<u8> = Vec::new();
        loop {
            let batch: Vec<sled::IVec> = index
                .range(start.clone()..end.to_vec())
                .keys()
                .take(256)
                .collect::<Result<_, _>>()
                .map_err(backend)?;
            if batch.is_empty() {
                return Ok(());
            }
            for entry_key in batch {
                self.sweep_one(legacy, &entry_key, now, swept)?;
                start = entry_key.to_vec();
                start.push(0);
            }
            // Nobody waits for a sweep's removals to be durable, but they must not pile up in
            // memory either: a large sweep writes its log as it goes.
            if self.log.as_ref().is_some_and(|l| l.len() > SWEEP_LOG_BYTES) {
                self.sync().await?;
            }
            // sled's calls block; a long sweep must leave the worker to the requests between
            // batches.
            tokio::task::yield_now().await;
        }
    }
}

#[async_trait]
impl Cells for SledCells {
    fn codec(&self) -> &ArcSwap<Codec> {
        &self.codec
    }

    fn mark(&self) -> Option<Mark> {
        Some(self.writes.mark())
    }

    fn unchanged_since(&self, handle: &str, mark: Mark) -> bool {
        self.writes.unchanged_since(handle, mark)
    }

    async fn get(&self, cell: &Cell) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .trees(cell)
            .records
            .get(&cell.name)
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    async fn swap(
        &self,
        cell: &Cell,
        expected: Option<&[u8]>,
        old: Option<&Indexed>,
        new: Option<(&[u8], &Indexed)>,
    ) -> Result<bool, StoreError> {
        self.swap_now(cell, expected, old, new)
    }

    async fn subject_members(&self, tag: &str, legacy: bool) -> Result<Vec<Cell>, StoreError> {
        let trees = if legacy { &self.legacy } else { &self.current };
        let mut cells = Vec::new();
        for item in trees.subjects.scan_prefix(subject_key(tag, "")) {
            let (k, _) = item.map_err(backend)?;
            cells.push(Cell {
                name: String::from_utf8_lossy(&k[tag.len() + 1..]).into_owned(),
                legacy,
            });
        }
        Ok(cells)
    }

    /// A direct seek: a handle is the start of the digest the cell is named by. The release
    /// before's cells are walked (the sweeper empties that tree).
    async fn find_handle(&self, handle: &str) -> Result<Option<Cell>, StoreError> {
        if let Some(item) = self.current.records.scan_prefix(handle).keys().next() {
            let name = item.map_err(backend)?;
            return Ok(Some(Cell {
                name: String::from_utf8_lossy(&name).into_owned(),
                legacy: false,
            }));
        }
        for (i, key) in self.legacy.records.iter().keys().enumerate() {
            let key = key.map_err(backend)?;
            if let Ok(key) = std::str::from_utf8(&key)
                && super::id::handle(key) == handle
            {
                return Ok(Some(Cell::legacy(key)));
            }
            if i % 1024 == 1023 {
                tokio::task::yield_now().await;
            }
        }
        Ok(None)
    }

    async fn legacy_page(
        &self,
        cursor: Option<String>,
    ) -> Result<(Vec<Cell>, Option<String>), StoreError> {
        let start = cursor.unwrap_or_default();
        let page: Vec<Cell> = self
            .legacy
            .records
            .range(start.as_bytes()..)
            .keys()
            .take(256)
            .map(|k| k.map(|k| Cell::legacy(&String::from_utf8_lossy(&k))))
            .collect::<Result<_, _>>()
            .map_err(backend)?;
        let next = (page.len() == 256).then(|| format!("{}\0", page[255].name));
        Ok((page, next))
    }

    async fn forget_member(&self, tag: &str, cell: &Cell) -> Result<(), StoreError> {
        self.under_stripe(cell, || {
            self.trees(cell)
                .subjects
                .remove(subject_key(tag, &cell.name))
        })
    }

    async fn sweep(&self, now: Millis) -> Result<Swept, StoreError> {
        let mut swept = Swept::default();
        self.sweep_index(false, now, &mut swept).await?;
        self.sweep_index(true, now, &mut swept).await?;
        // Every cell of the release before is gone: whatever its indexes still hold (entries a
        // crash left, subjects in clear) goes too.
        if self.legacy.records.is_empty()
            && !(self.legacy.index.is_empty() && self.legacy.subjects.is_empty())
        {
            self.legacy.index.clear().map_err(backend)?;
            self.legacy.subjects.clear().map_err(backend)?;
        }
        self.sync().await?;
        Ok(swept)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.ask(Ask::Commit).await
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
            // Not only the log: a checkpoint writes sled's own files too, so a volume that
            // cannot take them is found while the log still has room.
            self.ask(Ask::Checkpoint).await
        } else {
            self.db.flush_async().await.map(|_| ()).map_err(backend)
        }
    }
}

impl Drop for SledCells {
    /// Joins the commit thread (after its last checkpoint), so that its handle on the database
    /// (and the directory lock) is gone when the store is, and flushes.
    fn drop(&mut self) {
        // The commit thread's last act is a checkpoint: the next start has no log to replay.
        if let Some(mut c) = self.committer.take() {
            drop(c.sender);
            if let Some(t) = c.thread.take() {
                let _ = t.join();
            }
        }
        let _ = self.db.flush();
    }
}
