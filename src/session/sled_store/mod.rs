//! The embedded store: sled, one process per directory.
//!
//! Four trees: `sessions` (key → record), `forwards` (old key → successor after a cycle),
//! `expiry` (deadline ‖ kind ‖ key, so the sweeper reads only what has expired) and `subjects`
//! (subject ‖ 0 ‖ key). Every change is one sled transaction over the four trees.
//!
//! Durability: [`Store::sync`] hands the caller to a committer thread that runs one `flush`
//! (write + fsync) for every caller queued meanwhile — group commit — so concurrent changes
//! share an fsync instead of each paying for one.

use std::sync::Arc;

use async_trait::async_trait;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use tokio::sync::oneshot;

mod commit;
mod tx;

use commit::{Committer, spawn_committer};
use tx::*;

use super::changes::{self, Change};
use super::store::{Liveness, Store, StoreError, Swept, UpdateError, Updated};
use super::{Millis, Policy, Record};
use crate::config::StoreConfig;

pub struct SledStore {
    db: sled::Db,
    sessions: sled::Tree,
    forwards: sled::Tree,
    index: sled::Tree,
    subjects: sled::Tree,
    policy: Arc<Policy>,
    max_bytes: usize,
    committer: Option<Committer>,
}

fn from_tx(e: TransactionError<Abort>) -> UpdateError {
    match e {
        TransactionError::Abort(Abort::TooLarge(t)) => UpdateError::TooLarge(t),
        TransactionError::Abort(Abort::Corrupt(c)) => UpdateError::Store(StoreError::Corrupt(c)),
        TransactionError::Storage(s) => UpdateError::Store(backend(s)),
    }
}

fn store_err(e: UpdateError) -> StoreError {
    match e {
        UpdateError::Store(s) => s,
        UpdateError::TooLarge(t) => StoreError::Backend(t.to_string()),
    }
}

impl SledStore {
    pub fn open(
        cfg: &StoreConfig,
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
        let committer = cfg.durable.then(|| spawn_committer(db.clone()));
        Ok(SledStore {
            sessions: tree("sessions")?,
            forwards: tree("forwards")?,
            index: tree("expiry")?,
            subjects: tree("subjects")?,
            db,
            policy,
            max_bytes,
            committer,
        })
    }

    fn transaction<T>(&self, f: impl Fn(&Tx) -> TxResult<T>) -> Result<T, UpdateError> {
        (&self.sessions, &self.forwards, &self.index, &self.subjects)
            .transaction(|(sessions, forwards, index, subjects)| {
                f(&Tx {
                    sessions,
                    forwards,
                    index,
                    subjects,
                })
            })
            .map_err(from_tx)
    }

    /// Number of session records, live or not yet swept (for tests and the admin view).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[async_trait]
impl Store for SledStore {
    async fn load(&self, key: &str, now: Millis) -> Result<Option<Record>, StoreError> {
        match self.sessions.get(key).map_err(backend)? {
            Some(bytes) => {
                let r = decode(&bytes).map_err(StoreError::Corrupt)?;
                Ok((r.deadline > now).then_some(r))
            }
            None => Ok(None),
        }
    }

    async fn create(&self, key: &str, record: &Record) -> Result<bool, StoreError> {
        self.transaction(|tx| {
            if tx.sessions.get(key)?.is_some() {
                return Ok(false);
            }
            tx.put(key, None, record)?;
            Ok(true)
        })
        .map_err(store_err)
    }

    async fn update(
        &self,
        key: &str,
        change: &Change,
        new_key: Option<&str>,
        now: Millis,
        force_save: bool,
    ) -> Result<Updated, UpdateError> {
        let policy = &*self.policy;
        self.transaction(|tx| {
            let Some((current, old, forwarded)) = tx.live(key, now)? else {
                return Ok(Updated::Ended);
            };
            let mut record = old.clone();
            let effect =
                changes::apply(&mut record, change, policy, now, self.max_bytes, force_save)
                    .map_err(|t| ConflictableTransactionError::Abort(Abort::TooLarge(t)))?;
            if effect.empty || (effect.save && record.deadline <= now) {
                tx.delete(&current, &old)?;
                return Ok(Updated::Removed { forwarded });
            }
            if !effect.save {
                return Ok(Updated::Unchanged { forwarded });
            }
            let key = match new_key {
                Some(next) => {
                    tx.delete(&current, &old)?;
                    tx.put(next, None, &record)?;
                    tx.forward(
                        &current,
                        next,
                        now + policy.forward_ttl.as_millis() as Millis,
                    )?;
                    next.to_string()
                }
                None => {
                    tx.put(&current, Some(&old), &record)?;
                    current
                }
            };
            Ok(Updated::Saved {
                key,
                record,
                forwarded,
            })
        })
    }

    async fn liveness(&self, key: &str, now: Millis) -> Result<Liveness, StoreError> {
        let mut current = key.to_string();
        for hop in 0..=MAX_HOPS {
            if self.load(&current, now).await?.is_some() {
                return Ok(if hop == 0 {
                    Liveness::Live
                } else {
                    Liveness::Forwarded
                });
            }
            if self.sessions.contains_key(&current).map_err(backend)? {
                return Ok(Liveness::Ended);
            }
            match self.forwards.get(&current).map_err(backend)? {
                Some(b) => {
                    let f: Forward = serde_json::from_slice(&b)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    if f.until <= now {
                        return Ok(Liveness::Ended);
                    }
                    current = f.to;
                }
                None => return Ok(Liveness::Ended),
            }
        }
        Ok(Liveness::Ended)
    }

    async fn touch(&self, key: &str, now: Millis) -> Result<(), StoreError> {
        let policy = &*self.policy;
        self.transaction(|tx| {
            if let Some(old) = tx.get(key)? {
                if old.deadline > now && policy.touch_due(&old, now) {
                    let mut record = old.clone();
                    record.accessed = now;
                    record.deadline = policy.deadline(&record);
                    tx.put(key, Some(&old), &record)?;
                }
            }
            Ok(())
        })
        .map_err(store_err)
    }

    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.transaction(|tx| {
            // Follow a cycle's forward so a logout in flight during a login ends the new session.
            let now = Millis::MIN;
            match tx.live(key, now)? {
                Some((current, old, _)) => {
                    tx.delete(&current, &old)?;
                    Ok(true)
                }
                None => Ok(false),
            }
        })
        .map_err(store_err)
    }

    async fn subject_keys(&self, subject: &str, now: Millis) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        for item in self.subjects.scan_prefix(subject_key(subject, "")) {
            let (k, _) = item.map_err(backend)?;
            let key = String::from_utf8_lossy(&k[subject.len() + 1..]).into_owned();
            if self.load(&key, now).await?.is_some() {
                keys.push(key);
            }
        }
        Ok(keys)
    }

    async fn sweep(&self, now: Millis) -> Result<Swept, StoreError> {
        let mut swept = Swept::default();
        let end = index_key(now, 0, "");
        loop {
            let batch: Vec<sled::IVec> = self
                .index
                .range(..end.as_slice())
                .keys()
                .take(256)
                .collect::<Result<_, _>>()
                .map_err(backend)?;
            if batch.is_empty() {
                return Ok(swept);
            }
            for entry in batch {
                let kind = entry[8];
                let key = String::from_utf8_lossy(&entry[9..]).into_owned();
                let removed = self
                    .transaction(|tx| {
                        tx.index.remove(&*entry)?;
                        if kind == KIND_FORWARD {
                            return Ok(tx.forwards.remove(key.as_str())?.is_some());
                        }
                        match tx.get(&key)? {
                            Some(r) if r.deadline <= now => {
                                tx.delete(&key, &r)?;
                                Ok(true)
                            }
                            _ => Ok(false),
                        }
                    })
                    .map_err(store_err)?;
                match (removed, kind) {
                    (true, KIND_FORWARD) => swept.forwards += 1,
                    (true, _) => swept.sessions += 1,
                    _ => {}
                }
            }
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

    async fn ping(&self) -> Result<(), StoreError> {
        self.sessions.get(b"\0ping").map(|_| ()).map_err(backend)
    }
}

impl Drop for SledStore {
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
