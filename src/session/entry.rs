//! What a store keeps under a session key, byte for byte: an [`Entry`] — a live session, or the
//! forward a cycle left behind (in the same place, so that a cycle turns the old record into
//! its forward with one compare-and-swap). Bytes: a tag, the deadline (8 bytes, big-endian),
//! the format version (one byte), then JSON; the fixed head lets a reader tell an expired or
//! ended entry without parsing it.
//!
//! Format versions (a release reads every one written before it):
//! - 1: no version byte; the JSON follows the deadline (it starts with `{`, which no version
//!   byte ever equals).
//! - 2: the version byte `2`. Fields added to the record later take their defaults when an older
//!   record lacks them, and fields a newer release added are ignored.

use serde::{Deserialize, Serialize};

use crate::session::{Millis, Record};

/// Forwards are followed at most this many times (a session cycled twice while a request was in
/// flight still lands).
pub const MAX_HOPS: usize = 4;

const TAG_SESSION: u8 = b'S';
const TAG_MOVED: u8 = b'M';
/// The format this release writes.
pub const FORMAT_VERSION: u8 = 2;

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
        let body = match bytes.get(9..).ok_or("truncated entry")? {
            v1 @ [b'{', ..] => v1,
            [FORMAT_VERSION, rest @ ..] => rest,
            [v, ..] => {
                return Err(format!(
                    "record format version {v} is newer than this release reads ({FORMAT_VERSION})"
                ));
            }
            [] => return Err("truncated entry".into()),
        };
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
        out.push(FORMAT_VERSION);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A session as release 0.1 (format 1, no version byte) wrote it, byte for byte.
    fn v1_session() -> Vec<u8> {
        let mut raw = vec![b'S'];
        raw.extend_from_slice(&5_000i64.to_be_bytes());
        raw.extend_from_slice(
            br#"{"data":{"n":1},"created":1,"saved":2,"accessed":3,"expiry":"Default","subject":"u1","deadline":5000}"#,
        );
        raw
    }

    #[test]
    fn format_1_records_still_read() {
        let Entry::Session(r) = Entry::decode(&v1_session()).unwrap() else {
            panic!("a session")
        };
        assert_eq!(r.data["n"], 1);
        assert_eq!(r.subject.as_deref(), Some("u1"));
        assert_eq!(r.deadline, 5000);
        let mut moved = vec![b'M'];
        moved.extend_from_slice(&9i64.to_be_bytes());
        moved.extend_from_slice(br#"{"to":"abc","until":9}"#);
        assert!(matches!(Entry::decode(&moved).unwrap(), Entry::Moved(m) if m.to == "abc"));
    }

    #[test]
    fn written_records_carry_the_version_and_round_trip() {
        let mut r = Record::new(7);
        r.data.insert("k".into(), serde_json::json!("v"));
        let raw = Entry::Session(r.clone()).encode();
        assert_eq!(raw[9], FORMAT_VERSION);
        let Entry::Session(back) = Entry::decode(&raw).unwrap() else {
            panic!("a session")
        };
        assert_eq!(back, r);
    }

    #[test]
    fn fields_added_or_missing_do_not_make_a_record_corrupt() {
        let mut raw = vec![b'S'];
        raw.extend_from_slice(&5_000i64.to_be_bytes());
        raw.push(FORMAT_VERSION);
        raw.extend_from_slice(br#"{"data":{"n":1},"deadline":5000,"a_future_field":[1,2]}"#);
        let Entry::Session(r) = Entry::decode(&raw).unwrap() else {
            panic!("a session")
        };
        assert_eq!(r.data["n"], 1);
        assert_eq!(r.subject, None);
    }

    #[test]
    fn a_newer_format_is_named_not_misread() {
        let mut raw = Entry::Session(Record::new(0)).encode();
        raw[9] = FORMAT_VERSION + 1;
        assert!(Entry::decode(&raw).unwrap_err().contains("newer"));
    }
}
