//! What a store keeps under a session key, byte for byte: an [`Entry`] — a live session, or the
//! forward a cycle left behind (in the same place, so that a cycle turns the old record into
//! its forward with one compare-and-swap). Bytes: a tag, the deadline (8 bytes, big-endian),
//! then JSON; the fixed head lets a reader tell an expired or ended entry without parsing it.

use serde::{Deserialize, Serialize};

use crate::session::{Millis, Record};

/// Forwards are followed at most this many times (a session cycled twice while a request was in
/// flight still lands).
pub const MAX_HOPS: usize = 4;

const TAG_SESSION: u8 = b'S';
const TAG_MOVED: u8 = b'M';

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Moved {
    pub to: String,
    pub until: Millis,
}

#[derive(Debug, Clone)]
pub enum Entry {
    Session(Record),
    Moved(Moved),
}

/// What the fixed head of an entry says, without parsing the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    Session { deadline: Millis },
    Moved { until: Millis },
}

impl Head {
    pub fn read(bytes: &[u8]) -> Result<Head, String> {
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
    pub fn decode(bytes: &[u8]) -> Result<Entry, String> {
        let body = bytes.get(9..).ok_or("truncated entry")?;
        match Head::read(bytes)? {
            Head::Session { .. } => serde_json::from_slice(body).map(Entry::Session),
            Head::Moved { .. } => serde_json::from_slice(body).map(Entry::Moved),
        }
        .map_err(|e| e.to_string())
    }

    pub fn encode(&self) -> Vec<u8> {
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
    pub fn deadline(&self) -> Millis {
        match self {
            Entry::Session(r) => r.deadline,
            Entry::Moved(m) => m.until,
        }
    }
}
