//! What the sled trees hold, byte for byte.
//!
//! - `records`: session key → an [`Entry`]: a live session, or the forward a cycle left behind
//!   (one tree, so that a cycle turns the old record into its forward with one compare-and-swap).
//!   Bytes: a tag, the deadline (8 bytes, big-endian), then JSON; the fixed head lets a reader
//!   tell an expired or ended entry without parsing it;
//! - `expiry`: bucket ‖ key → (), where bucket is the entry's deadline rounded up to
//!   [`BUCKET_MS`]: the sweeper reads only the buckets that have passed;
//! - `subjects`: subject ‖ 0 ‖ key → ().

use serde::{Deserialize, Serialize};

use crate::session::{Millis, Record};

/// Granularity of the expiry index. A session's index entry moves only when its deadline
/// crosses into another bucket, so a busy session costs an index write at most this often; the
/// sweeper may remove a record up to this much after its deadline (it is never loaded after it).
pub const BUCKET_MS: Millis = 10_000;

/// Forwards are followed at most this many times (a session cycled twice while a request was in
/// flight still lands).
pub(super) const MAX_HOPS: usize = 4;

const TAG_SESSION: u8 = b'S';
const TAG_MOVED: u8 = b'M';

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Moved {
    pub(super) to: String,
    pub(super) until: Millis,
}

#[derive(Debug, Clone)]
pub(super) enum Entry {
    Session(Record),
    Moved(Moved),
}

/// What the fixed head of an entry says, without parsing the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Head {
    Session { deadline: Millis },
    Moved { until: Millis },
}

impl Head {
    pub(super) fn read(bytes: &[u8]) -> Result<Head, String> {
        let (tag, rest) = bytes.split_first().ok_or("empty entry")?;
        let deadline = rest
            .get(..8)
            .map(|b| Millis::from_be_bytes(b.try_into().expect("8 bytes")))
            .ok_or("truncated entry")?;
        match *tag {
            TAG_SESSION => Ok(Head::Session { deadline }),
            TAG_MOVED => Ok(Head::Moved { until: deadline }),
            _ => Err("unknown entry tag".into()),
        }
    }
}

impl Entry {
    pub(super) fn decode(bytes: &[u8]) -> Result<Entry, String> {
        let body = bytes.get(9..).ok_or("truncated entry")?;
        match Head::read(bytes)? {
            Head::Session { .. } => serde_json::from_slice(body).map(Entry::Session),
            Head::Moved { .. } => serde_json::from_slice(body).map(Entry::Moved),
        }
        .map_err(|e| e.to_string())
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(match self {
            Entry::Session(_) => TAG_SESSION,
            Entry::Moved(_) => TAG_MOVED,
        });
        out.extend_from_slice(&self.deadline().to_be_bytes());
        match self {
            Entry::Session(r) => serde_json::to_writer(&mut out, r),
            Entry::Moved(m) => serde_json::to_writer(&mut out, m),
        }
        .expect("entries always serialize");
        out
    }

    /// When the entry stops mattering: a session's deadline, a forward's end.
    pub(super) fn deadline(&self) -> Millis {
        match self {
            Entry::Session(r) => r.deadline,
            Entry::Moved(m) => m.until,
        }
    }
}

pub(super) fn bucket(deadline: Millis) -> Millis {
    let step = BUCKET_MS as u64;
    ((deadline.max(0) as u64).div_ceil(step) * step) as Millis
}

pub(super) fn index_key(deadline: Millis, key: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + key.len());
    v.extend_from_slice(&(bucket(deadline) as u64).to_be_bytes());
    v.extend_from_slice(key.as_bytes());
    v
}

/// The end of the index range the sweeper may read at `now`.
pub(super) fn index_end(now: Millis) -> [u8; 8] {
    // Buckets strictly after `now` are not due; `bucket(x) <= now` for every due entry.
    (now.max(0) as u64).saturating_add(1).to_be_bytes()
}

pub(super) fn subject_key(subject: &str, key: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(subject.len() + 1 + key.len());
    v.extend_from_slice(subject.as_bytes());
    v.push(0);
    v.extend_from_slice(key.as_bytes());
    v
}
