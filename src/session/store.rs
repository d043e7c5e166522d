//! The storage traits. Each method is one atomic step on the backing store, so that every clause
//! of the contract (per-key merge, no resurrection, cycle forwarding) holds whatever the backend.
//!
//! [`Upkeep`] is what the parts outside `session` may ask of the store (the admin listener, the
//! sweeper, a reload, the shutdown flush); [`Store`] adds what a request does to its session, and
//! this module is private to `session`: only [`Sessions`](super::Sessions) calls those.

use async_trait::async_trait;

use std::sync::Arc;

use super::changes::{Change, Unfit};
use super::entry::{Codec, Reader};
use super::id;
use super::{Millis, Policy, Record};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error and each of its sources, joined with ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // An error whose message already ends with its source's (thiserror's `"…: {0}"` with
        // `#[from]`) would say it twice.
        let said = s.to_string();
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = s.source();
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the session store at {path} is in use by another process (a running sidecar?); its sweeper clears expired sessions meanwhile"
    )]
    Locked { path: String },
    #[error("cannot open the session store at {path}: {reason}")]
    Open { path: String, reason: String },
    /// The backend (`"sled"`, `"redis"`) failed; the cause is the source.
    #[error("the {0} session store failed")]
    Backend(&'static str, #[source] BoxError),
    #[error("a stored session record is corrupt")]
    Corrupt(#[source] BoxError),
    /// A random key collided with a stored one (2^-128 odds, or a broken random source).
    #[error("a fresh session key was already taken")]
    KeyTaken,
}

/// Why an update did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Unfit(#[from] Unfit),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One request's change to its stored session: what [`Store::update`] applies.
#[derive(Debug, Clone, Copy)]
pub struct Update<'a> {
    /// The key the request presented.
    pub key: &'a str,
    /// What the request's load returned (the record and its stored bytes), tried first; a
    /// stale one only costs a re-read.
    pub seen: Option<(&'a Record, &'a [u8])>,
    /// Data, expiry and subject; `change.flush` is not the store's business (see
    /// [`Store::retire`]).
    pub change: &'a Change,
    /// A cycle: the key the session moves to.
    pub new_key: Option<&'a str>,
    pub now: Millis,
    /// Save even if nothing changed (`save_every_request`).
    pub force_save: bool,
}

impl<'a> Update<'a> {
    pub fn new(key: &'a str, change: &'a Change, now: Millis) -> Update<'a> {
        Update {
            key,
            seen: None,
            change,
            new_key: None,
            now,
            force_save: false,
        }
    }

    /// Moves the session to `new_key` (a cycle).
    #[cfg(feature = "testing")]
    pub fn cycle_to(self, new_key: &'a str) -> Update<'a> {
        Update {
            new_key: Some(new_key),
            ..self
        }
    }
}

/// What [`Store::update`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Updated {
    /// The session ended (flushed, expired) after the request loaded it: nothing was written.
    Ended,
    /// Nothing needed writing; the session lives under `key` (a renamed one when forwarded).
    Unchanged { key: String, forwarded: bool },
    /// The data became empty: the record was removed.
    Removed { forwarded: bool },
    /// The record was written under `key` (a new one after a cycle).
    Saved {
        key: String,
        record: Record,
        forwarded: bool,
    },
}

/// Where one entry is stored: under the digest of its session key, or (`legacy`) under the key
/// itself, as the release before stored it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cell {
    pub name: String,
    pub legacy: bool,
}

impl Cell {
    /// The cell of `key`'s session.
    pub fn of(key: &str) -> Cell {
        Cell {
            name: id::digest(key),
            legacy: false,
        }
    }

    /// Where the release before kept `key`'s session.
    pub fn legacy(key: &str) -> Cell {
        Cell {
            name: key.to_string(),
            legacy: true,
        }
    }

    /// The session's handle (the admin's one-way name): the start of its digest.
    pub fn handle(&self) -> String {
        if self.legacy {
            id::handle(&self.name)
        } else {
            self.name[..id::HANDLE_LEN.min(self.name.len())].to_string()
        }
    }

    /// How a reader without the key opens it (legacy cells are named by the key).
    pub(crate) fn reader(&self) -> Reader<'_> {
        if self.legacy {
            Reader::Key(&self.name)
        } else {
            Reader::Digest(&self.name)
        }
    }
}

/// What a key a request presents reaches.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// A live session, with the stored bytes (handed back to `update`, they let the common
    /// case write without reading again).
    Live(Record, Vec<u8>),
    /// No session: a cycle or a flush retired the key within the retired grace.
    Retired,
    /// No session.
    Absent,
}

/// Whether a key still reaches a live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Live,
    /// The key was cycled; its successor is live.
    Forwarded,
    Ended,
}

/// Where a store's stream of end notices stood when a request loaded its session: a later
/// [`Store::liveness`] that finds no notice for the key since then, and the deadline the load
/// read still ahead, needs no read of its own (docs/HEADERS.md §9, "Round trips").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// Which unbroken run of the notice stream the mark belongs to.
    pub epoch: u64,
    /// How many notices that run had delivered.
    pub seq: u64,
}

/// What a request saw when it loaded its session: the notice mark taken before the load and
/// the deadline the load read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub mark: Mark,
    pub deadline: Millis,
}

/// How many records a sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub sessions: usize,
    pub forwards: usize,
    /// Sessions moved from a name in clear (the release before's) to their digest's.
    pub renamed: usize,
}

/// What the parts outside `session` may ask of the store: the operator's look-ups and
/// removals (the admin listener), and the upkeep (reconfigure, sweep, sync, ping).
#[async_trait]
pub trait Upkeep: Send + Sync + 'static {
    /// Takes a reloaded configuration's expiry policy and record keys: operations that start
    /// from now on use them. Records sealed with a key the new codec still holds (the secret or
    /// one of its fallbacks) keep opening.
    fn reconfigure(&self, policy: Arc<Policy>, codec: Codec);

    /// The live record under `key`, or `None` when there is none or it has expired.
    async fn load(&self, key: &str, now: Millis) -> Result<Option<Record>, StoreError>;

    /// Ends the session (an operator's delete, a limit); `false` if there was none.
    async fn remove(&self, key: &str) -> Result<bool, StoreError>;

    /// The live sessions tagged with `subject`, as a reader without their keys sees them (their
    /// `subject` is not shown: the caller named it).
    async fn subject_sessions(
        &self,
        subject: &str,
        now: Millis,
    ) -> Result<Vec<(Cell, Record)>, StoreError>;

    /// The stored session whose [`handle`](super::id::handle) is `handle`, if any.
    async fn find_handle(&self, handle: &str) -> Result<Option<Cell>, StoreError>;

    /// The live session in `cell` as a reader without its key sees it (no subject), and
    /// whether it is tagged with one.
    async fn load_stored(
        &self,
        cell: &Cell,
        now: Millis,
    ) -> Result<Option<(Record, bool)>, StoreError>;

    /// Ends the session in `cell` (an operator's revoke); `false` if there was none.
    async fn remove_stored(&self, cell: &Cell) -> Result<bool, StoreError>;

    /// Removes records whose deadline has passed.
    async fn sweep(&self, now: Millis) -> Result<Swept, StoreError>;

    /// Returns once every change acknowledged so far is durable (group-committed).
    async fn sync(&self) -> Result<(), StoreError>;

    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
}

/// What a request does to its session, on top of [`Upkeep`]; reached only through
/// [`Sessions`](super::Sessions).
#[async_trait]
pub trait Store: Upkeep {
    /// What `key` reaches: as `load`, with the stored bytes, and telling a retired key apart.
    async fn lookup(&self, key: &str, now: Millis) -> Result<Lookup, StoreError>;

    /// Stores a brand-new session; `false` if the key is taken (then nothing is written).
    async fn create(&self, key: &str, record: &Record) -> Result<bool, StoreError>;

    /// Applies the change (data, expiry, subject, and a cycle to `new_key`) to the latest live
    /// record under the key, following the forward a cycle left behind.
    async fn update(&self, update: Update<'_>) -> Result<Updated, UpdateError>;

    /// Where the store's end notices stand, taken before a load; `None` when the store has
    /// none (sled: its reads are local) or is not receiving them right now.
    fn mark(&self) -> Option<Mark>;

    /// Whether `key` (or its successor after a cycle) is still live; read-only. With `seen`
    /// (what the request's load saw), a store with end notices answers without a read when
    /// nothing about `key` arrived since.
    async fn liveness(
        &self,
        key: &str,
        now: Millis,
        seen: Option<Seen>,
    ) -> Result<Liveness, StoreError>;

    /// Records activity for the idle timeout, if the policy says it is due.
    async fn touch(&self, key: &str, now: Millis) -> Result<(), StoreError>;

    /// Ends the session and keeps its key known as retired for the policy's `retired_grace`
    /// (a flush); `false` if there was none.
    async fn retire(&self, key: &str, now: Millis) -> Result<bool, StoreError>;
}
