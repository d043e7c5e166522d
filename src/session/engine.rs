//! The store logic every backend shares, written once over compare-and-swap cells.
//!
//! A backend only has to offer a cell per session key that can be read and replaced atomically
//! if it still holds what was read ([`Cells`]): sled's `compare_and_swap`, or a Lua script on
//! Redis. On top of that, [`Engine`] implements the contract: the per-key merge retried against
//! the latest value (docs/HEADERS.md §4), no resurrection (a missing or expired cell is an ended
//! session, never re-created by an update), and the cycle that writes the new record first and
//! then turns the old one into a forward with one swap, so no moment exists where neither key
//! reaches the session.

//!
//! The store never learns a session key: a cell is named by the key's digest ([`Cell::of`]),
//! and the engine, which has the key, encodes what only its holder may read ([`Codec`]). Cells
//! the release before named by the key in clear ([`Cell::legacy`]) are still read, and leave
//! that name at their next write or at the next [`Engine::migrate`].

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;

use super::changes;
use super::entry::{Codec, DecodeError, Decoded, Entry, Head, MAX_HOPS, Moved, Reader};
use super::id;
use super::store::{
    Cell, Liveness, Lookup, Mark, Seen, Store, StoreError, Swept, Update, UpdateError, Updated,
    Upkeep,
};
use super::{Millis, Policy, Record};

/// What a cell's indexes need to know of its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed {
    pub deadline: Millis,
    /// The subject set the session belongs to: its subject's digest (its subject in clear in a
    /// legacy cell).
    pub tag: Option<String>,
    pub session: bool,
}

#[async_trait]
pub trait Cells: Send + Sync + 'static {
    /// How this backend's entries are written and read (sealed when a secret is configured);
    /// a reload swaps it.
    fn codec(&self) -> &ArcSwap<Codec>;

    /// The cells indexed under the subject set `tag` (legacy: the clear subject's set; may
    /// include stale ones; the engine checks each).
    async fn subject_members(&self, tag: &str, legacy: bool) -> Result<Vec<Cell>, StoreError>;

    /// Drops a stale member from a subject set.
    async fn forget_member(&self, tag: &str, cell: &Cell) -> Result<(), StoreError>;

    /// The cell whose handle is `handle`, if any (admin look-ups).
    async fn find_handle(&self, handle: &str) -> Result<Option<Cell>, StoreError>;

    /// Up to a page of legacy cells from `cursor` on (`None`: the start), and where the next
    /// page starts (`None`: no more).
    async fn legacy_page(
        &self,
        cursor: Option<String>,
    ) -> Result<(Vec<Cell>, Option<String>), StoreError>;

    /// Removes expired entries, if the backend does not expire them by itself, and index
    /// entries no cell needs.
    async fn sweep(&self, now: Millis) -> Result<Swept, StoreError>;

    /// Returns once every change acknowledged so far is durable.
    async fn sync(&self) -> Result<(), StoreError>;

    /// Whether the backend answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Where this backend's end notices stand, if it has them (see [`Store::mark`]).
    fn mark(&self) -> Option<Mark> {
        None
    }

    /// Whether no end notice for the session `handle` names arrived since `mark` (and none
    /// could have been missed). `false` sends the liveness check to the store.
    fn unchanged_since(&self, _handle: &str, _mark: Mark) -> bool {
        false
    }

    /// The raw entry in `cell`.
    async fn get(&self, cell: &Cell) -> Result<Option<Vec<u8>>, StoreError>;

    /// Puts `new` (or nothing) in `cell` if it still holds `expected` (`None`: absent), and
    /// keeps the backend's indexes right: `old` indexes `expected`. `false` if someone else
    /// changed the cell first.
    async fn swap(
        &self,
        cell: &Cell,
        expected: Option<&[u8]>,
        old: Option<&Indexed>,
        new: Option<(&[u8], &Indexed)>,
    ) -> Result<bool, StoreError>;
}

/// A live session as read, with the bytes a swap must find unchanged.
struct Current {
    key: String,
    cell: Cell,
    raw: Vec<u8>,
    record: Record,
    forwarded: bool,
}

pub struct Engine<C> {
    pub cells: C,
    /// Swapped by a reload; an operation reads it once and keeps what it read.
    pub policy: ArcSwap<Policy>,
    pub max_bytes: usize,
    /// Cells of the release before that the last migration pass found beside their digest's
    /// cell, left for the next pass (see [`Engine::migrate`]).
    held: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl<C> Engine<C> {
    pub fn new(cells: C, policy: Arc<Policy>, max_bytes: usize) -> Engine<C> {
        Engine {
            cells,
            policy: ArcSwap::new(policy),
            max_bytes,
            held: Default::default(),
        }
    }

    /// Whether the legacy cell `name`, found beside its digest's cell, is held back this pass:
    /// the first time it is; the next time it may go.
    fn held_back(&self, name: &str) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.remove(name) {
            return false;
        }
        held.insert(name.to_string());
        true
    }
}

fn corrupt(e: String) -> StoreError {
    StoreError::Corrupt(e.into())
}

impl<C: Cells> Engine<C> {
    /// The entry stored as `raw`, as `reader` opens it. A sealed record no configured key opens
    /// reads as no record, as Django reads session data whose signature fails: the visitor is
    /// new, and the log says why. A damaged record is an error.
    fn decode(
        &self,
        cell: &Cell,
        reader: Reader<'_>,
        raw: &[u8],
    ) -> Result<Option<Decoded>, StoreError> {
        match self.cells.codec().load().read(reader, raw) {
            Ok(decoded) => Ok(Some(decoded)),
            Err(DecodeError::Unopened(why)) => {
                tracing::warn!(handle = %cell.handle(), "session record ignored: {why}");
                Ok(None)
            }
            Err(DecodeError::Corrupt(e)) => Err(corrupt(e)),
        }
    }

    /// What indexes `entry` needs in `cell`.
    fn indexed(&self, cell: &Cell, entry: &Entry) -> Indexed {
        let codec = self.cells.codec().load();
        Indexed {
            deadline: entry.deadline(),
            tag: match entry {
                Entry::Session(r) if cell.legacy => r.subject.clone(),
                Entry::Session(r) => r.subject.as_deref().map(|s| codec.tag(s)),
                Entry::Moved(_) => None,
            },
            session: matches!(entry, Entry::Session(_)),
        }
    }

    /// Where `key`'s entry is, its bytes and the entry: the digest-named cell, else the one the
    /// release before named by the key.
    async fn entry(&self, key: &str) -> Result<Option<(Cell, Vec<u8>, Entry)>, StoreError> {
        let Some((cell, raw)) = self.find(key).await? else {
            return Ok(None);
        };
        let entry = self.decode(&cell, Reader::Key(key), &raw)?;
        Ok(entry.map(|d| (cell, raw, d.entry)))
    }

    /// The cell holding `key`'s entry and its bytes: the digest-named cell, else the one the
    /// release before named by the key (read only when the first is missing). A cell that moves
    /// meanwhile is written to its digest's cell before it leaves the old one: when both reads
    /// miss, the digest's cell is read once more.
    async fn find(&self, key: &str) -> Result<Option<(Cell, Vec<u8>)>, StoreError> {
        for cell in [Cell::of(key), Cell::legacy(key), Cell::of(key)] {
            if let Some(raw) = self.cells.get(&cell).await? {
                return Ok(Some((cell, raw)));
            }
        }
        Ok(None)
    }

    /// The cell a new entry for `key` goes to: its digest's, or its own name while the fleet
    /// shares the store with the release before.
    fn cell_for(&self, key: &str) -> Cell {
        if self.cells.codec().load().writes_legacy() {
            Cell::legacy(key)
        } else {
            Cell::of(key)
        }
    }

    /// Replaces what `cur` read with `new` (or nothing). A legacy cell's entry moves to its
    /// digest's cell on the way (unless the fleet still writes legacy cells): the new cell is
    /// written first, then the legacy one removed if unchanged, else the new one taken back.
    async fn replace(&self, cur: &Current, new: Option<&Entry>) -> Result<bool, StoreError> {
        let old = self.indexed(&cur.cell, &Entry::Session(cur.record.clone()));
        self.replace_raw(&cur.key, &cur.cell, &cur.raw, &old, new)
            .await
    }

    async fn replace_raw(
        &self,
        key: &str,
        cell: &Cell,
        raw: &[u8],
        old: &Indexed,
        new: Option<&Entry>,
    ) -> Result<bool, StoreError> {
        let codec = self.cells.codec().load();
        let target = if cell.legacy {
            self.cell_for(key)
        } else {
            cell.clone()
        };
        let encoded = new.map(|n| (codec.encode(key, n), self.indexed(&target, n)));
        if target == *cell {
            let new = encoded.as_ref().map(|(b, i)| (&b[..], i));
            return self.cells.swap(cell, Some(raw), Some(old), new).await;
        }
        if let Some((bytes, index)) = &encoded
            && !self
                .cells
                .swap(&target, None, None, Some((bytes, index)))
                .await?
        {
            return Ok(false);
        }
        if self.cells.swap(cell, Some(raw), Some(old), None).await? {
            return Ok(true);
        }
        if let Some((bytes, index)) = &encoded {
            self.cells
                .swap(&target, Some(bytes), Some(index), None)
                .await?;
        }
        Ok(false)
    }

    /// Follows forwards from `key` to the live session, if any.
    async fn resolve(&self, key: &str, now: Millis) -> Result<Option<Current>, StoreError> {
        let mut current = key.to_string();
        for hop in 0..=MAX_HOPS {
            match self.entry(&current).await? {
                Some((cell, raw, Entry::Session(record))) if record.deadline > now => {
                    return Ok(Some(Current {
                        key: current,
                        cell,
                        raw,
                        record,
                        forwarded: hop > 0,
                    }));
                }
                Some((_, _, Entry::Moved(m))) => match m.successor(now) {
                    Some(next) => current = next.to_string(),
                    None => return Ok(None),
                },
                _ => return Ok(None),
            }
        }
        Ok(None)
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
            if self.replace(&cur, tombstone.as_ref()).await? {
                return Ok(true);
            }
        }
    }

    /// The session stored in `cell`, as a reader without its key sees it, and its subject's
    /// digest.
    async fn stored(
        &self,
        cell: &Cell,
        now: Millis,
    ) -> Result<Option<(Vec<u8>, Record, Option<String>)>, StoreError> {
        let Some(raw) = self.cells.get(cell).await? else {
            return Ok(None);
        };
        match self.decode(cell, cell.reader(), &raw)? {
            Some(Decoded {
                entry: Entry::Session(r),
                tag,
            }) if r.deadline > now => Ok(Some((raw, r, tag))),
            _ => Ok(None),
        }
    }

    /// Moves every legacy cell to its digest's cell (or removes it when expired or already
    /// moved), so that the store stops naming its visitors; the sweeper calls it. A cell that
    /// cannot be read is left, with an error in the log.
    pub async fn migrate(&self, now: Millis) -> Result<usize, StoreError> {
        if self.cells.codec().load().writes_legacy() {
            return Ok(0);
        }
        let mut moved = 0;
        let mut cursor = None;
        loop {
            let (page, next) = self.cells.legacy_page(cursor).await?;
            for cell in page {
                match self.migrate_one(&cell, now).await {
                    Ok(true) => moved += 1,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(handle = %cell.handle(), error = %super::chain(&e), "a session stored under its key in clear could not be moved to its digest");
                    }
                }
            }
            tokio::task::yield_now().await;
            match next {
                Some(n) => cursor = Some(n),
                None => return Ok(moved),
            }
        }
    }

    async fn migrate_one(&self, cell: &Cell, now: Millis) -> Result<bool, StoreError> {
        for _ in 0..8 {
            let Some(raw) = self.cells.get(cell).await? else {
                return Ok(false);
            };
            let entry = match self
                .cells
                .codec()
                .load()
                .read(Reader::Key(&cell.name), &raw)
            {
                Ok(d) => Some(d.entry),
                Err(DecodeError::Unopened(_)) => None,
                Err(DecodeError::Corrupt(e)) => return Err(corrupt(e)),
            };
            let keep = entry.filter(|e| e.deadline() > now);
            let old = match &keep {
                Some(e) => self.indexed(cell, e),
                None => Indexed {
                    deadline: Head::read(&raw).map_or(0, |h| match h {
                        Head::Session { deadline } => deadline,
                        Head::Moved { until } => until,
                    }),
                    tag: None,
                    session: true,
                },
            };
            // Already moved: the digest's cell wins. Both cells are there while a write moves
            // the session (the new cell first, then the old one removed, or the new one taken
            // back if the old one changed meanwhile): removing the old one under that write
            // would make it take back the only copy. So the old cell goes at the next pass if
            // both are still there then: what a crash between the two steps left.
            let keep = match self.cells.get(&Cell::of(&cell.name)).await? {
                Some(_) if self.held_back(&cell.name) => return Ok(false),
                Some(_) => None,
                None => keep,
            };
            if self
                .replace_raw(&cell.name, cell, &raw, &old, keep.as_ref())
                .await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[async_trait]
impl<C: Cells> Upkeep for Engine<C> {
    fn reconfigure(&self, policy: Arc<Policy>, codec: Codec) {
        self.cells.codec().store(Arc::new(codec));
        self.policy.store(policy);
    }

    async fn load(&self, key: &str, now: Millis) -> Result<Option<Record>, StoreError> {
        Ok(match self.lookup(key, now).await? {
            Lookup::Live(r, _) => Some(r),
            Lookup::Retired | Lookup::Absent => None,
        })
    }

    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.end(key, Millis::MIN, None).await
    }

    async fn subject_sessions(
        &self,
        subject: &str,
        now: Millis,
    ) -> Result<Vec<(Cell, Record)>, StoreError> {
        let codec = self.cells.codec().load_full();
        let tags = codec.tags(subject);
        let mut sets: Vec<(String, bool)> = tags.iter().map(|t| (t.clone(), false)).collect();
        sets.push((subject.to_string(), true));
        let mut found = Vec::new();
        for (set, legacy) in sets {
            for cell in self.cells.subject_members(&set, legacy).await? {
                match self.stored(&cell, now).await? {
                    Some((_, r, Some(tag))) if tag == set => found.push((cell, r)),
                    Some(_) => {}
                    None => self.cells.forget_member(&set, &cell).await?,
                }
            }
        }
        Ok(found)
    }

    async fn find_handle(&self, handle: &str) -> Result<Option<Cell>, StoreError> {
        self.cells.find_handle(handle).await
    }

    async fn load_stored(
        &self,
        cell: &Cell,
        now: Millis,
    ) -> Result<Option<(Record, bool)>, StoreError> {
        Ok(self
            .stored(cell, now)
            .await?
            .map(|(_, r, tag)| (r, tag.is_some())))
    }

    async fn remove_stored(&self, cell: &Cell) -> Result<bool, StoreError> {
        loop {
            let Some((raw, record, tag)) = self.stored(cell, Millis::MIN).await? else {
                return Ok(false);
            };
            let old = Indexed {
                deadline: record.deadline,
                tag,
                session: true,
            };
            if self.cells.swap(cell, Some(&raw), Some(&old), None).await? {
                return Ok(true);
            }
        }
    }

    async fn sweep(&self, now: Millis) -> Result<Swept, StoreError> {
        // Moved first: a cell of the release before that has expired is removed on the way,
        // with its subject index entry (in clear) gone with it.
        let renamed = self.migrate(now).await?;
        let mut swept = self.cells.sweep(now).await?;
        swept.renamed = renamed;
        Ok(swept)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.cells.sync().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.cells.ping().await
    }
}

#[async_trait]
impl<C: Cells> Store for Engine<C> {
    async fn lookup(&self, key: &str, now: Millis) -> Result<Lookup, StoreError> {
        let Some((cell, raw)) = self.find(key).await? else {
            return Ok(Lookup::Absent);
        };
        // Expired sessions and forwards are told from the head, without parsing.
        match Head::read(&raw).map_err(corrupt)? {
            Head::Session { deadline } | Head::Moved { until: deadline } if deadline > now => {}
            _ => return Ok(Lookup::Absent),
        }
        Ok(match self.decode(&cell, Reader::Key(key), &raw)? {
            Some(Decoded {
                entry: Entry::Session(r),
                ..
            }) => Lookup::Live(r, raw),
            Some(Decoded {
                entry: Entry::Moved(m),
                ..
            }) if m.retired > now => Lookup::Retired,
            _ => Lookup::Absent,
        })
    }

    async fn create(&self, key: &str, record: &Record) -> Result<bool, StoreError> {
        let entry = Entry::Session(record.clone());
        let cell = self.cell_for(key);
        let bytes = self.cells.codec().load().encode(key, &entry);
        let index = self.indexed(&cell, &entry);
        self.cells
            .swap(&cell, None, None, Some((&bytes, &index)))
            .await
    }

    async fn update(&self, update: Update<'_>) -> Result<Updated, UpdateError> {
        let Update {
            key,
            seen,
            change,
            new_key,
            now,
            force_save,
        } = update;
        let policy = self.policy.load();
        let policy = &**policy;
        // First try: what the request loaded, if it is still live (the swap checks it is still
        // there); after that, the latest value.
        let mut hint = seen
            .filter(|(r, _)| r.deadline > now)
            .map(|(record, raw)| Current {
                key: key.to_string(),
                cell: if super::entry::is_named(raw) {
                    Cell::of(key)
                } else {
                    Cell::legacy(key)
                },
                raw: raw.to_vec(),
                record: record.clone(),
                forwarded: false,
            });
        loop {
            let hinted = hint.is_some();
            let cur = match hint.take() {
                Some(cur) => cur,
                None => match self.resolve(key, now).await? {
                    Some(cur) => cur,
                    None => return Ok(Updated::Ended),
                },
            };
            let forwarded = cur.forwarded;
            let mut record = cur.record.clone();
            // Refused only against the latest state: what the request loaded may be stale (a
            // key another request has since made an integer, a list, or smaller).
            let effect = match changes::apply(
                &mut record,
                change,
                policy,
                now,
                self.max_bytes,
                force_save,
            ) {
                Ok(effect) => effect,
                Err(_) if hinted => continue,
                Err(unfit) => return Err(unfit.into()),
            };
            if effect.empty || (effect.save && record.deadline <= now) {
                if self.replace(&cur, None).await? {
                    return Ok(Updated::Removed { forwarded });
                }
                continue;
            }
            if !effect.save {
                // Nothing to write against what the request loaded; but someone may have
                // changed the session since (setting back a value another request changed, or
                // deleting a key another request added, is a change then): decide against the
                // latest state.
                if hinted {
                    continue;
                }
                // A change that changes nothing is still activity (idle timeout).
                if !policy.touch_due(&record, now) {
                    return Ok(Updated::Unchanged {
                        key: cur.key.clone(),
                        forwarded,
                    });
                }
                record.accessed = now;
                record.deadline = policy.deadline(&record);
                if self.replace(&cur, Some(&Entry::Session(record))).await? {
                    return Ok(Updated::Unchanged {
                        key: cur.key.clone(),
                        forwarded,
                    });
                }
                continue;
            }
            let new = Entry::Session(record.clone());
            // A session a concurrent cycle already renamed (a double-clicked login) is not renamed
            // again: this change lands in it like any in-flight request's.
            let Some(next) = new_key.filter(|_| !forwarded) else {
                if self.replace(&cur, Some(&new)).await? {
                    return Ok(Updated::Saved {
                        key: cur.key,
                        record,
                        forwarded,
                    });
                }
                continue;
            };
            // Cycle: the new record first, then the old one becomes its forward in one swap.
            if !self.create(next, &record).await? {
                return Err(StoreError::KeyTaken.into());
            }
            let forward = Entry::Moved(Moved {
                to: next.to_string(),
                until: now + policy.forward_ttl.as_millis() as Millis,
                retired: policy.retired_until(now),
            });
            if self.replace(&cur, Some(&forward)).await? {
                return Ok(Updated::Saved {
                    key: next.to_string(),
                    record,
                    forwarded,
                });
            }
            // Someone changed the old record meanwhile: undo and start over with their change.
            if let Some((cell, raw, e)) = self.entry(next).await? {
                let index = self.indexed(&cell, &e);
                self.cells
                    .swap(&cell, Some(&raw), Some(&index), None)
                    .await?;
            }
        }
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
        // A backend with end notices heard of every flush, cycle and shortened expiry of `key`
        // since the load; the load's deadline answers for plain expiry.
        if let Some(seen) = seen
            && seen.deadline > now
            && self.cells.unchanged_since(&id::handle(key), seen.mark)
        {
            return Ok(Liveness::Live);
        }
        // Read on every read-only request: the head answers the common case, no parsing.
        let mut current = key.to_string();
        for hop in 0..=MAX_HOPS {
            let Some((cell, raw)) = self.find(&current).await? else {
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
                Head::Moved { until } if until > now => {
                    match self.decode(&cell, Reader::Key(&current), &raw)? {
                        Some(Decoded {
                            entry: Entry::Moved(m),
                            ..
                        }) => match m.successor(now) {
                            Some(next) => current = next.to_string(),
                            None => return Ok(Liveness::Ended),
                        },
                        Some(_) => return Err(corrupt("head and body disagree".into())),
                        None => return Ok(Liveness::Ended),
                    }
                }
                _ => return Ok(Liveness::Ended),
            }
        }
        Ok(Liveness::Ended)
    }

    async fn touch(&self, key: &str, now: Millis) -> Result<(), StoreError> {
        loop {
            let Some((cell, raw, Entry::Session(r))) = self.entry(key).await? else {
                return Ok(());
            };
            let policy = self.policy.load();
            if r.deadline <= now || !policy.touch_due(&r, now) {
                return Ok(());
            }
            let mut record = r.clone();
            record.accessed = now;
            record.deadline = policy.deadline(&record);
            let cur = Current {
                key: key.to_string(),
                cell,
                raw,
                record: r,
                forwarded: false,
            };
            if self.replace(&cur, Some(&Entry::Session(record))).await? {
                return Ok(());
            }
        }
    }

    async fn retire(&self, key: &str, now: Millis) -> Result<bool, StoreError> {
        let until = self.policy.load().retired_until(now);
        self.end(key, now, (until > now).then_some(until)).await
    }
}
