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
use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, Transactional, TransactionalTree,
};
use tokio::sync::{mpsc, oneshot};

use super::changes::{self, Change, TooLarge};
use super::store::{Liveness, Store, StoreError, Swept, UpdateError, Updated};
use super::{Millis, Policy, Record};
use crate::config::StoreConfig;

/// Forwards are followed at most this many times (a session cycled twice while a request was in
/// flight still lands).
const MAX_HOPS: usize = 4;
const KIND_SESSION: u8 = b's';
const KIND_FORWARD: u8 = b'f';

type Reply = oneshot::Sender<Result<(), String>>;

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

/// The group-commit thread and the way to reach it; dropping the sender ends the thread.
struct Committer {
    sender: mpsc::UnboundedSender<Reply>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Serialize, Deserialize)]
struct Forward {
    to: String,
    until: Millis,
}

enum Abort {
    TooLarge(TooLarge),
    Corrupt(String),
}

type TxResult<T> = Result<T, ConflictableTransactionError<Abort>>;

fn corrupt(e: impl std::fmt::Display) -> ConflictableTransactionError<Abort> {
    ConflictableTransactionError::Abort(Abort::Corrupt(e.to_string()))
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
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

fn index_key(deadline: Millis, kind: u8, key: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + key.len());
    v.extend_from_slice(&(deadline.max(0) as u64).to_be_bytes());
    v.push(kind);
    v.extend_from_slice(key.as_bytes());
    v
}

fn subject_key(subject: &str, key: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(subject.len() + 1 + key.len());
    v.extend_from_slice(subject.as_bytes());
    v.push(0);
    v.extend_from_slice(key.as_bytes());
    v
}

fn decode(bytes: &[u8]) -> Result<Record, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

fn encode(record: &Record) -> Vec<u8> {
    serde_json::to_vec(record).expect("a record always serializes")
}

/// The four trees as seen inside one transaction.
struct Tx<'a> {
    sessions: &'a TransactionalTree,
    forwards: &'a TransactionalTree,
    index: &'a TransactionalTree,
    subjects: &'a TransactionalTree,
}

impl Tx<'_> {
    fn get(&self, key: &str) -> TxResult<Option<Record>> {
        match self.sessions.get(key)? {
            Some(b) => decode(&b).map(Some).map_err(corrupt),
            None => Ok(None),
        }
    }

    /// Follows forwards from `key` to the live record, if any: (its key, it, whether forwarded).
    fn live(&self, key: &str, now: Millis) -> TxResult<Option<(String, Record, bool)>> {
        let mut current = key.to_string();
        for hop in 0..=MAX_HOPS {
            if let Some(r) = self.get(&current)? {
                if r.deadline > now {
                    return Ok(Some((current, r, hop > 0)));
                }
                return Ok(None);
            }
            match self.forwards.get(&current)? {
                Some(b) => {
                    let f: Forward = serde_json::from_slice(&b).map_err(corrupt)?;
                    if f.until <= now {
                        return Ok(None);
                    }
                    current = f.to;
                }
                None => return Ok(None),
            }
        }
        Ok(None)
    }

    fn put(&self, key: &str, old: Option<&Record>, new: &Record) -> TxResult<()> {
        if let Some(old) = old {
            self.unindex(key, old)?;
        }
        self.index
            .insert(index_key(new.deadline, KIND_SESSION, key), &[])?;
        if let Some(s) = &new.subject {
            self.subjects.insert(subject_key(s, key), &[])?;
        }
        self.sessions.insert(key, encode(new))?;
        Ok(())
    }

    fn delete(&self, key: &str, old: &Record) -> TxResult<()> {
        self.unindex(key, old)?;
        self.sessions.remove(key)?;
        Ok(())
    }

    fn unindex(&self, key: &str, old: &Record) -> TxResult<()> {
        self.index
            .remove(index_key(old.deadline, KIND_SESSION, key))?;
        if let Some(s) = &old.subject {
            self.subjects.remove(subject_key(s, key))?;
        }
        Ok(())
    }

    fn forward(&self, from: &str, to: &str, until: Millis) -> TxResult<()> {
        let f = Forward {
            to: to.to_string(),
            until,
        };
        self.forwards
            .insert(from, serde_json::to_vec(&f).expect("serializes"))?;
        self.index
            .insert(index_key(until, KIND_FORWARD, from), &[])?;
        Ok(())
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

/// The group-commit thread: one `flush` for everyone who asked since the last one began.
fn spawn_committer(db: sled::Db) -> Committer {
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let thread = std::thread::Builder::new()
        .name("sled-commit".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                for reply in batch {
                    let _ = reply.send(result.clone());
                }
            }
        })
        .expect("spawning the commit thread");
    Committer {
        sender: tx,
        thread: Some(thread),
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
