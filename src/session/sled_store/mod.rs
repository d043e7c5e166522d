//! The embedded store: sled, one process per directory.
//!
//! Every change is one compare-and-swap on the session's entry in the `records` tree, retried
//! against the latest value when another request got there first — the per-key merge of
//! CONTRACT §4. (sled's multi-tree transactions take a process-wide write lock and, once used,
//! put every other operation behind a read lock; single-key CAS keeps reads and writes
//! concurrent.) A cycle writes the new record first and then turns the old one into a forward
//! with one CAS, so no moment exists where neither key reaches the session.
//!
//! The `expiry` and `subjects` indexes are written before the CAS that needs them and cleaned
//! after it, so a crash can leave an extra index entry (the sweeper and the subject lookup check
//! the record and drop it) but not a missing one.
//!
//! Durability: [`Store::sync`] hands the caller to a committer thread that runs one `flush`
//! (write + fsync) for every caller queued meanwhile — group commit.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::oneshot;

mod commit;
mod entry;

use commit::{Committer, spawn_committer};
pub use entry::BUCKET_MS;
use entry::{Entry, Head, MAX_HOPS, Moved, index_end, index_key, subject_key};

use super::changes::{self, Change};
use super::store::{Liveness, Store, StoreError, Swept, UpdateError, Updated};
use super::{Millis, Policy, Record};
use crate::config::StoreConfig;

pub struct SledStore {
    db: sled::Db,
    records: sled::Tree,
    index: sled::Tree,
    subjects: sled::Tree,
    policy: Arc<Policy>,
    max_bytes: usize,
    committer: Option<Committer>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// An entry as read, with the bytes a CAS must find unchanged.
struct Current {
    key: String,
    raw: sled::IVec,
    record: Record,
    forwarded: bool,
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
            records: tree("records")?,
            index: tree("expiry")?,
            subjects: tree("subjects")?,
            db,
            policy,
            max_bytes,
            committer,
        })
    }

    fn get(&self, key: &str) -> Result<Option<(sled::IVec, Entry)>, StoreError> {
        match self.records.get(key).map_err(backend)? {
            Some(raw) => {
                let entry = Entry::decode(&raw).map_err(StoreError::Corrupt)?;
                Ok(Some((raw, entry)))
            }
            None => Ok(None),
        }
    }

    /// Follows forwards from `key` to the live session, if any.
    fn resolve(&self, key: &str, now: Millis) -> Result<Option<Current>, StoreError> {
        let mut current = key.to_string();
        for hop in 0..=MAX_HOPS {
            match self.get(&current)? {
                Some((raw, Entry::Session(record))) if record.deadline > now => {
                    return Ok(Some(Current {
                        key: current,
                        raw,
                        record,
                        forwarded: hop > 0,
                    }));
                }
                Some((_, Entry::Moved(m))) if m.until > now => current = m.to,
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Replaces `expected` under `key` with `new` (`None` deletes); `false` if someone else
    /// changed it first.
    fn cas(
        &self,
        key: &str,
        expected: Option<&sled::IVec>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        Ok(self
            .records
            .compare_and_swap(key, expected, new)
            .map_err(backend)?
            .is_ok())
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

    /// Installs `new` under `key` if the entry is still `cur`; cleans the indexes either way.
    fn replace(
        &self,
        key: &str,
        raw: &sled::IVec,
        old: &Entry,
        new: Option<&Entry>,
    ) -> Result<bool, StoreError> {
        if let Some(n) = new {
            self.index_new(key, Some(old), n)?;
        }
        if !self.cas(key, Some(raw), new.map(Entry::encode))? {
            return Ok(false);
        }
        self.unindex_old(key, old, new)?;
        Ok(true)
    }

    /// Number of entries (sessions and forwards, live or not yet swept).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[async_trait]
impl Store for SledStore {
    async fn load(&self, key: &str, now: Millis) -> Result<Option<Record>, StoreError> {
        let Some(raw) = self.records.get(key).map_err(backend)? else {
            return Ok(None);
        };
        // Expired sessions and forwards are told from the head, without parsing.
        match Head::read(&raw).map_err(StoreError::Corrupt)? {
            Head::Session { deadline } if deadline > now => {}
            _ => return Ok(None),
        }
        match Entry::decode(&raw).map_err(StoreError::Corrupt)? {
            Entry::Session(r) => Ok(Some(r)),
            Entry::Moved(_) => Ok(None),
        }
    }

    async fn create(&self, key: &str, record: &Record) -> Result<bool, StoreError> {
        let entry = Entry::Session(record.clone());
        self.index_new(key, None, &entry)?;
        self.cas(key, None, Some(entry.encode()))
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
        loop {
            let Some(cur) = self.resolve(key, now)? else {
                return Ok(Updated::Ended);
            };
            let forwarded = cur.forwarded;
            let old = Entry::Session(cur.record.clone());
            let mut record = cur.record;
            let effect =
                changes::apply(&mut record, change, policy, now, self.max_bytes, force_save)?;
            if effect.empty || (effect.save && record.deadline <= now) {
                if self.replace(&cur.key, &cur.raw, &old, None)? {
                    return Ok(Updated::Removed { forwarded });
                }
                continue;
            }
            if !effect.save {
                return Ok(Updated::Unchanged { forwarded });
            }
            let new = Entry::Session(record.clone());
            let Some(next) = new_key else {
                if self.replace(&cur.key, &cur.raw, &old, Some(&new))? {
                    return Ok(Updated::Saved {
                        key: cur.key,
                        record,
                        forwarded,
                    });
                }
                continue;
            };
            // Cycle: the new record first, then the old one becomes its forward in one CAS.
            self.index_new(next, None, &new)?;
            if !self.cas(next, None, Some(new.encode()))? {
                return Err(
                    StoreError::Backend("a fresh session key was already taken".into()).into(),
                );
            }
            let forward = Entry::Moved(Moved {
                to: next.to_string(),
                until: now + policy.forward_ttl.as_millis() as Millis,
            });
            if self.replace(&cur.key, &cur.raw, &old, Some(&forward))? {
                return Ok(Updated::Saved {
                    key: next.to_string(),
                    record,
                    forwarded,
                });
            }
            // Someone changed the old record meanwhile: undo and start over with their change.
            if let Some((raw, e)) = self.get(next)? {
                self.replace(next, &raw, &e, None)?;
            }
        }
    }

    async fn liveness(&self, key: &str, now: Millis) -> Result<Liveness, StoreError> {
        // Read on every read-only request: the head answers the common case, no parsing.
        let mut current = key.to_string();
        for hop in 0..=MAX_HOPS {
            let Some(raw) = self.records.get(&current).map_err(backend)? else {
                return Ok(Liveness::Ended);
            };
            match Head::read(&raw).map_err(StoreError::Corrupt)? {
                Head::Session { deadline } if deadline > now => {
                    return Ok(if hop == 0 {
                        Liveness::Live
                    } else {
                        Liveness::Forwarded
                    });
                }
                Head::Moved { until } if until > now => {
                    let Entry::Moved(m) = Entry::decode(&raw).map_err(StoreError::Corrupt)? else {
                        return Err(StoreError::Corrupt("head and body disagree".into()));
                    };
                    current = m.to;
                }
                _ => return Ok(Liveness::Ended),
            }
        }
        Ok(Liveness::Ended)
    }

    async fn touch(&self, key: &str, now: Millis) -> Result<(), StoreError> {
        loop {
            let Some((raw, old @ Entry::Session(_))) = self.get(key)? else {
                return Ok(());
            };
            let Entry::Session(r) = &old else {
                unreachable!()
            };
            if r.deadline <= now || !self.policy.touch_due(r, now) {
                return Ok(());
            }
            let mut record = r.clone();
            record.accessed = now;
            record.deadline = self.policy.deadline(&record);
            if self.replace(key, &raw, &old, Some(&Entry::Session(record)))? {
                return Ok(());
            }
        }
    }

    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        loop {
            // Follow a cycle's forward so a logout in flight during a login ends the new session.
            let Some(cur) = self.resolve(key, Millis::MIN)? else {
                return Ok(false);
            };
            let old = Entry::Session(cur.record);
            if self.replace(&cur.key, &cur.raw, &old, None)? {
                return Ok(true);
            }
        }
    }

    async fn subject_keys(&self, subject: &str, now: Millis) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        for item in self.subjects.scan_prefix(subject_key(subject, "")) {
            let (k, _) = item.map_err(backend)?;
            let key = String::from_utf8_lossy(&k[subject.len() + 1..]).into_owned();
            match self.load(&key, now).await? {
                Some(r) if r.subject.as_deref() == Some(subject) => keys.push(key),
                _ => {}
            }
        }
        Ok(keys)
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
                let key = String::from_utf8_lossy(&entry_key[8..]).into_owned();
                let keep = match self.get(&key)? {
                    Some((raw, e)) if e.deadline() <= now => {
                        let removed = self.replace(&key, &raw, &e, None)?;
                        match e {
                            Entry::Session(_) if removed => swept.sessions += 1,
                            Entry::Moved(_) if removed => swept.forwards += 1,
                            _ => {}
                        }
                        false
                    }
                    Some((_, e)) => {
                        // Not expired yet: keep the entry if it is the record's current one,
                        // otherwise it is stale (the record moved on) and the current one
                        // must exist instead.
                        let current = index_key(e.deadline(), &key);
                        if current[..] != entry_key[..] {
                            self.index.insert(current, &[]).map_err(backend)?;
                            false
                        } else {
                            true
                        }
                    }
                    None => false,
                };
                if !keep {
                    self.index.remove(&entry_key).map_err(backend)?;
                }
                start = entry_key.to_vec();
                start.push(0);
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
        self.records.get(b"\0ping").map(|_| ()).map_err(backend)
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
