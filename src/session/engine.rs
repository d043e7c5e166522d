//! The store logic every backend shares, written once over compare-and-swap cells.
//!
//! A backend only has to offer a cell per session key that can be read and replaced atomically
//! if it still holds what was read ([`Cells`]): sled's `compare_and_swap`, or a Lua script on
//! Redis. On top of that, [`Engine`] implements the contract: the per-key merge retried against
//! the latest value (docs/HEADERS.md §4), no resurrection (a missing or expired cell is an ended
//! session, never re-created by an update), and the cycle that writes the new record first and
//! then turns the old one into a forward with one swap, so no moment exists where neither key
//! reaches the session.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;

use super::changes::{self, Change};
use super::entry::{Codec, DecodeError, Entry, Head, MAX_HOPS, Moved};
use super::store::{Liveness, Lookup, Mark, Seen, Store, StoreError, Swept, UpdateError, Updated};
use super::{Millis, Policy, Record};

#[async_trait]
pub trait Cells: Send + Sync + 'static {
    /// How this backend's entries are written and read (sealed when a secret is configured);
    /// a reload swaps it.
    fn codec(&self) -> &ArcSwap<Codec>;

    /// Session keys indexed under `subject` (may include stale ones; the engine checks each).
    async fn subject_members(&self, subject: &str) -> Result<Vec<String>, StoreError>;

    /// Drops a stale member from a subject's index.
    async fn forget_member(&self, subject: &str, key: &str) -> Result<(), StoreError>;

    /// The first stored key for which `wanted` holds (admin look-ups by handle; may scan).
    async fn find_key(
        &self,
        wanted: &(dyn for<'k> Fn(&'k str) -> bool + Sync),
    ) -> Result<Option<String>, StoreError>;

    /// Removes expired entries, if the backend does not expire them by itself.
    async fn sweep(&self, now: Millis) -> Result<Swept, StoreError>;

    /// Returns once every change acknowledged so far is durable.
    async fn sync(&self) -> Result<(), StoreError>;

    /// Whether the backend answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Where this backend's end notices stand, if it has them (see [`Store::mark`]).
    fn mark(&self) -> Option<Mark> {
        None
    }

    /// Whether no end notice for `key` arrived since `mark` (and none could have been missed).
    /// `false` sends the liveness check to the store.
    fn unchanged_since(&self, _key: &str, _mark: Mark) -> bool {
        false
    }

    /// The raw entry under `key`.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Puts `new` (or nothing) under `key` if it still holds `expected` (`None`: absent), and
    /// keeps the backend's indexes right; `old` is `expected` decoded. `false` if someone else
    /// changed the cell first.
    async fn swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        old: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<bool, StoreError>;
}

/// A live session as read, with the bytes a swap must find unchanged.
struct Current {
    key: String,
    raw: Vec<u8>,
    record: Record,
    forwarded: bool,
}

pub struct Engine<C> {
    pub cells: C,
    /// Swapped by a reload; an operation reads it once and keeps what it read.
    pub policy: ArcSwap<Policy>,
    pub max_bytes: usize,
}

fn corrupt(e: String) -> StoreError {
    StoreError::Corrupt(e)
}

impl<C: Cells> Engine<C> {
    /// The entry stored as `raw` under `key`. A sealed record no configured key opens reads as
    /// no record, as Django reads session data whose signature fails: the visitor is new, and
    /// the log says why. A damaged record is an error.
    fn decode(&self, key: &str, raw: &[u8]) -> Result<Option<Entry>, StoreError> {
        match self.cells.codec().load().decode(key, raw) {
            Ok(entry) => Ok(Some(entry)),
            Err(DecodeError::Unopened(why)) => {
                tracing::warn!(handle = %super::id::handle(key), "session record ignored: {why}");
                Ok(None)
            }
            Err(DecodeError::Corrupt(e)) => Err(corrupt(e)),
        }
    }

    async fn entry(&self, key: &str) -> Result<Option<(Vec<u8>, Entry)>, StoreError> {
        let Some(raw) = self.cells.get(key).await? else {
            return Ok(None);
        };
        Ok(self.decode(key, &raw)?.map(|entry| (raw, entry)))
    }

    /// Follows forwards from `key` to the live session, if any.
    async fn resolve(&self, key: &str, now: Millis) -> Result<Option<Current>, StoreError> {
        let mut current = key.to_string();
        for hop in 0..=MAX_HOPS {
            match self.entry(&current).await? {
                Some((raw, Entry::Session(record))) if record.deadline > now => {
                    return Ok(Some(Current {
                        key: current,
                        raw,
                        record,
                        forwarded: hop > 0,
                    }));
                }
                Some((_, Entry::Moved(m))) => match m.successor(now) {
                    Some(next) => current = next.to_string(),
                    None => return Ok(None),
                },
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    pub async fn load(&self, key: &str, now: Millis) -> Result<Option<Record>, StoreError> {
        Ok(match self.lookup(key, now).await? {
            Lookup::Live(r, _) => Some(r),
            Lookup::Retired | Lookup::Absent => None,
        })
    }

    pub async fn lookup(&self, key: &str, now: Millis) -> Result<Lookup, StoreError> {
        let Some(raw) = self.cells.get(key).await? else {
            return Ok(Lookup::Absent);
        };
        // Expired sessions and forwards are told from the head, without parsing.
        match Head::read(&raw).map_err(corrupt)? {
            Head::Session { deadline } | Head::Moved { until: deadline } if deadline > now => {}
            _ => return Ok(Lookup::Absent),
        }
        Ok(match self.decode(key, &raw)? {
            Some(Entry::Session(r)) => Lookup::Live(r, raw),
            Some(Entry::Moved(m)) if m.retired > now => Lookup::Retired,
            Some(Entry::Moved(_)) | None => Lookup::Absent,
        })
    }

    pub async fn create(&self, key: &str, record: &Record) -> Result<bool, StoreError> {
        let entry = Entry::Session(record.clone());
        self.cells.swap(key, None, None, Some(&entry)).await
    }

    pub async fn update(
        &self,
        key: &str,
        seen: Option<(&Record, &[u8])>,
        change: &Change,
        new_key: Option<&str>,
        now: Millis,
        force_save: bool,
    ) -> Result<Updated, UpdateError> {
        let policy = self.policy.load();
        let policy = &**policy;
        // First try: what the request loaded, if it is still live (the swap checks it is still
        // there); after that, the latest value.
        let mut hint = seen
            .filter(|(r, _)| r.deadline > now)
            .map(|(record, raw)| Current {
                key: key.to_string(),
                raw: raw.to_vec(),
                record: record.clone(),
                forwarded: false,
            });
        loop {
            let cur = match hint.take() {
                Some(cur) => cur,
                None => match self.resolve(key, now).await? {
                    Some(cur) => cur,
                    None => return Ok(Updated::Ended),
                },
            };
            let forwarded = cur.forwarded;
            let old = Entry::Session(cur.record.clone());
            let mut record = cur.record;
            let effect =
                changes::apply(&mut record, change, policy, now, self.max_bytes, force_save)?;
            let swap = |new: Option<Entry>| {
                let (key, raw, old) = (&cur.key, &cur.raw, &old);
                async move {
                    self.cells
                        .swap(key, Some(raw), Some(old), new.as_ref())
                        .await
                }
            };
            if effect.empty || (effect.save && record.deadline <= now) {
                if swap(None).await? {
                    return Ok(Updated::Removed { forwarded });
                }
                continue;
            }
            if !effect.save {
                // A change that changes nothing is still activity (idle timeout).
                if !policy.touch_due(&record, now) {
                    return Ok(Updated::Unchanged { forwarded });
                }
                record.accessed = now;
                record.deadline = policy.deadline(&record);
                if swap(Some(Entry::Session(record))).await? {
                    return Ok(Updated::Unchanged { forwarded });
                }
                continue;
            }
            let new = Entry::Session(record.clone());
            // A session a concurrent cycle already renamed (a double-clicked login) is not renamed
            // again: this change lands in it like any in-flight request's.
            let Some(next) = new_key.filter(|_| !forwarded) else {
                if swap(Some(new)).await? {
                    return Ok(Updated::Saved {
                        key: cur.key,
                        record,
                        forwarded,
                    });
                }
                continue;
            };
            // Cycle: the new record first, then the old one becomes its forward in one swap.
            if !self.cells.swap(next, None, None, Some(&new)).await? {
                return Err(
                    StoreError::Backend("a fresh session key was already taken".into()).into(),
                );
            }
            let forward = Entry::Moved(Moved {
                to: next.to_string(),
                until: now + policy.forward_ttl.as_millis() as Millis,
                retired: policy.retired_until(now),
            });
            if swap(Some(forward)).await? {
                return Ok(Updated::Saved {
                    key: next.to_string(),
                    record,
                    forwarded,
                });
            }
            // Someone changed the old record meanwhile: undo and start over with their change.
            if let Some((raw, e)) = self.entry(next).await? {
                self.cells.swap(next, Some(&raw), Some(&e), None).await?;
            }
        }
    }

    pub async fn liveness(
        &self,
        key: &str,
        now: Millis,
        seen: Option<Seen>,
    ) -> Result<Liveness, StoreError> {
        // A backend with end notices heard of every flush, cycle and shortened expiry of `key`
        // since the load; the load's deadline answers for plain expiry.
        if let Some(seen) = seen
            && seen.deadline > now
            && self.cells.unchanged_since(key, seen.mark)
        {
            return Ok(Liveness::Live);
        }
        // Read on every read-only request: the head answers the common case, no parsing.
        let mut current = key.to_string();
        for hop in 0..=MAX_HOPS {
            let Some(raw) = self.cells.get(&current).await? else {
                return Ok(Liveness::Ended);
            };
            match Head::read(&raw).map_err(corrupt)? {
                Head::Session { deadline } if deadline > now => {
                    return Ok(if hop == 0 {
                        Liveness::Live
                    } else {
                        Liveness::Forwarded
                    });
                }
                Head::Moved { until } if until > now => match self.decode(&current, &raw)? {
                    Some(Entry::Moved(m)) => match m.successor(now) {
                        Some(next) => current = next.to_string(),
                        None => return Ok(Liveness::Ended),
                    },
                    Some(Entry::Session(_)) => {
                        return Err(corrupt("head and body disagree".into()));
                    }
                    None => return Ok(Liveness::Ended),
                },
                _ => return Ok(Liveness::Ended),
            }
        }
        Ok(Liveness::Ended)
    }

    pub async fn touch(&self, key: &str, now: Millis) -> Result<(), StoreError> {
        loop {
            let Some((raw, old)) = self.entry(key).await? else {
                return Ok(());
            };
            let Entry::Session(r) = &old else {
                return Ok(());
            };
            let policy = self.policy.load();
            if r.deadline <= now || !policy.touch_due(r, now) {
                return Ok(());
            }
            let mut record = r.clone();
            record.accessed = now;
            record.deadline = policy.deadline(&record);
            let new = Entry::Session(record);
            if self
                .cells
                .swap(key, Some(&raw), Some(&old), Some(&new))
                .await?
            {
                return Ok(());
            }
        }
    }

    pub async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.end(key, Millis::MIN, None).await
    }

    /// Ends the session; with `retired`, its key stays known as retired until then.
    async fn end(
        &self,
        key: &str,
        now: Millis,
        retired: Option<Millis>,
    ) -> Result<bool, StoreError> {
        let tombstone = retired.map(|retired| {
            Entry::Moved(Moved {
                to: String::new(),
                until: 0,
                retired,
            })
        });
        loop {
            // Follow a cycle's forward so a logout in flight during a login ends the new session.
            let Some(cur) = self.resolve(key, now).await? else {
                return Ok(false);
            };
            let old = Entry::Session(cur.record);
            if self
                .cells
                .swap(&cur.key, Some(&cur.raw), Some(&old), tombstone.as_ref())
                .await?
            {
                return Ok(true);
            }
        }
    }

    pub async fn retire(&self, key: &str, now: Millis) -> Result<bool, StoreError> {
        let until = self.policy.load().retired_until(now);
        self.end(key, now, (until > now).then_some(until)).await
    }
}

#[async_trait]
impl<C: Cells> Store for Engine<C> {
    fn reconfigure(&self, policy: Arc<Policy>, codec: Codec) {
        self.cells.codec().store(Arc::new(codec));
        self.policy.store(policy);
    }

    async fn load(&self, key: &str, now: Millis) -> Result<Option<Record>, StoreError> {
        Engine::load(self, key, now).await
    }

    async fn lookup(&self, key: &str, now: Millis) -> Result<Lookup, StoreError> {
        Engine::lookup(self, key, now).await
    }

    async fn create(&self, key: &str, record: &Record) -> Result<bool, StoreError> {
        Engine::create(self, key, record).await
    }

    async fn update(
        &self,
        key: &str,
        seen: Option<(&Record, &[u8])>,
        change: &Change,
        new_key: Option<&str>,
        now: Millis,
        force_save: bool,
    ) -> Result<Updated, UpdateError> {
        Engine::update(self, key, seen, change, new_key, now, force_save).await
    }

    fn mark(&self) -> Option<Mark> {
        self.cells.mark()
    }

    async fn liveness(
        &self,
        key: &str,
        now: Millis,
        seen: Option<Seen>,
    ) -> Result<Liveness, StoreError> {
        Engine::liveness(self, key, now, seen).await
    }

    async fn touch(&self, key: &str, now: Millis) -> Result<(), StoreError> {
        Engine::touch(self, key, now).await
    }

    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        Engine::remove(self, key).await
    }

    async fn retire(&self, key: &str, now: Millis) -> Result<bool, StoreError> {
        Engine::retire(self, key, now).await
    }

    async fn subject_keys(&self, subject: &str, now: Millis) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        for key in self.cells.subject_members(subject).await? {
            match Engine::load(self, &key, now).await? {
                Some(r) if r.subject.as_deref() == Some(subject) => keys.push(key),
                Some(_) => {}
                None => self.cells.forget_member(subject, &key).await?,
            }
        }
        Ok(keys)
    }

    async fn find_handle(&self, handle: &str) -> Result<Option<String>, StoreError> {
        self.cells
            .find_key(&|key| super::id::handle(key) == handle)
            .await
    }

    async fn sweep(&self, now: Millis) -> Result<Swept, StoreError> {
        self.cells.sweep(now).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.cells.sync().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.cells.ping().await
    }
}
