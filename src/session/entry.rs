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
//! - 3: sealed: the version byte `3`, a 24-byte random nonce, then the JSON encrypted with
//!   XChaCha20-Poly1305 under a key derived from `secret_key` ([`Codec`]). The tag and deadline
//!   stay readable (the sweeper and the liveness check need them, and they say nothing about
//!   the visitor); they and the session key are the authenticated data, so a record moved to
//!   another key or given another deadline does not open.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::session::{Millis, Record};

/// Forwards are followed at most this many times (a session cycled twice while a request was in
/// flight still lands).
pub const MAX_HOPS: usize = 4;

const TAG_SESSION: u8 = b'S';
const TAG_MOVED: u8 = b'M';
/// The format this release writes without encryption.
pub const FORMAT_VERSION: u8 = 2;
/// The format of a sealed (encrypted) record.
pub const FORMAT_SEALED: u8 = 3;
const NONCE_LEN: usize = 24;

/// What a cycle or a flush leaves under the key it retired: where a request already in flight
/// with that key follows to (a cycle's successor, until `until`), and until when a request that
/// starts with it is told apart from a stranger's (`retired`, the grace of
/// docs/HEADERS.md "Retired keys"). A flush leaves no successor (`to` is empty).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Moved {
    pub to: String,
    pub until: Millis,
    #[serde(default)]
    pub retired: Millis,
}

impl Moved {
    /// The successor a request in flight follows to at `now`, if any.
    pub fn successor(&self, now: Millis) -> Option<&str> {
        (self.until > now && !self.to.is_empty()).then_some(self.to.as_str())
    }
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
    /// Reads an unsealed record (formats 1 and 2); see [`Codec::decode`] for every format.
    pub fn decode(bytes: &[u8]) -> Result<Entry, String> {
        Codec::plain().decode("", bytes).map_err(|e| e.to_string())
    }

    /// Writes the unsealed format.
    pub fn encode(&self) -> Vec<u8> {
        Codec::plain().encode("", self)
    }

    fn head(&self, version: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(match self {
            Entry::Session(_) => TAG_SESSION,
            Entry::Moved(_) => TAG_MOVED,
        });
        out.extend_from_slice(&self.deadline().to_be_bytes());
        out.push(version);
        out
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Entry::Session(r) => serde_json::to_writer(out, r),
            Entry::Moved(m) => serde_json::to_writer(out, m),
        }
        .expect("entries always serialize");
    }

    /// When the entry stops mattering: a session's deadline, a forward's end.
    pub fn deadline(&self) -> Millis {
        match self {
            Entry::Session(r) => r.deadline,
            Entry::Moved(m) => m.until.max(m.retired),
        }
    }
}

/// Why stored bytes did not give an entry.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are damaged, or written by a newer release.
    #[error("{0}")]
    Corrupt(String),
    /// A sealed record that none of the configured keys opens (the secret changed without a
    /// fallback, no secret is configured any more, or the bytes were altered).
    #[error("{0}")]
    Unopened(&'static str),
}

/// How entries become bytes and back: plain JSON, or sealed with keys derived from the
/// operator's secret (newest first; the older ones, from `secret_key_fallbacks`, only open).
#[derive(Clone, Default)]
pub struct Codec {
    keys: Vec<XChaCha20Poly1305>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Codec {{ sealed with {} key(s) }}", self.keys.len())
    }
}

/// A 256-bit record key from an operator's secret of any length (HKDF-SHA256, a salt of its
/// own: the cookie-signing key derived from the same secret is unrelated to it).
fn record_key(secret: &str) -> XChaCha20Poly1305 {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"session-sidecar records"), secret.as_bytes());
    let mut okm = [0u8; 32];
    hk.expand(b"XChaCha20-Poly1305 v1", &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    XChaCha20Poly1305::new(&okm.into())
}

impl Codec {
    /// Records as JSON, unencrypted (formats 1 and 2 read; sealed records do not open).
    pub fn plain() -> Codec {
        Codec::default()
    }

    /// Records sealed with `secret`; records sealed with a fallback, and unsealed ones, still
    /// read.
    pub fn sealed(secret: &str, fallbacks: &[String]) -> Codec {
        Codec {
            keys: std::iter::once(secret)
                .chain(fallbacks.iter().map(String::as_str))
                .map(record_key)
                .collect(),
        }
    }

    pub fn is_sealed(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The bytes stored under `key` for `entry`.
    pub fn encode(&self, key: &str, entry: &Entry) -> Vec<u8> {
        let Some(cipher) = self.keys.first() else {
            let mut out = entry.head(FORMAT_VERSION);
            entry.write_json(&mut out);
            return out;
        };
        let mut out = entry.head(FORMAT_SEALED);
        let nonce: [u8; NONCE_LEN] = rand::random();
        out.extend_from_slice(&nonce);
        let mut json = Vec::with_capacity(256);
        entry.write_json(&mut json);
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &json,
                    aad: &aad(&out[..9], key),
                },
            )
            .expect("XChaCha20-Poly1305 seals any length a record can have");
        out.extend_from_slice(&sealed);
        out
    }

    /// The entry stored under `key` as `bytes`.
    pub fn decode(&self, key: &str, bytes: &[u8]) -> Result<Entry, DecodeError> {
        let corrupt = |e: &str| DecodeError::Corrupt(e.to_string());
        let head = Head::read(bytes).map_err(DecodeError::Corrupt)?;
        let opened;
        let body = match bytes.get(9..).ok_or_else(|| corrupt("truncated entry"))? {
            v1 @ [b'{', ..] => v1,
            [FORMAT_VERSION, rest @ ..] => rest,
            [FORMAT_SEALED, rest @ ..] => {
                let (nonce, sealed) = rest
                    .split_at_checked(NONCE_LEN)
                    .ok_or_else(|| corrupt("truncated sealed entry"))?;
                if self.keys.is_empty() {
                    return Err(DecodeError::Unopened(
                        "the record is encrypted and no secret_key is configured",
                    ));
                }
                let aad = aad(&bytes[..9], key);
                opened = self
                    .keys
                    .iter()
                    .find_map(|cipher| {
                        cipher
                            .decrypt(
                                XNonce::from_slice(nonce),
                                Payload {
                                    msg: sealed,
                                    aad: &aad,
                                },
                            )
                            .ok()
                    })
                    .ok_or(DecodeError::Unopened(
                        "the record opens with neither secret_key nor a fallback (or was altered)",
                    ))?;
                &opened[..]
            }
            [v, ..] => {
                return Err(DecodeError::Corrupt(format!(
                    "record format version {v} is newer than this release reads ({FORMAT_SEALED})"
                )));
            }
            [] => return Err(corrupt("truncated entry")),
        };
        match head {
            Head::Session { .. } => serde_json::from_slice(body).map(Entry::Session),
            Head::Moved { .. } => serde_json::from_slice(body).map(Entry::Moved),
        }
        .map_err(|e| DecodeError::Corrupt(e.to_string()))
    }
}

/// What a sealed record's encryption authenticates besides its data: its head and its key.
fn aad(head: &[u8], key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(head.len() + key.len());
    aad.extend_from_slice(head);
    aad.extend_from_slice(key.as_bytes());
    aad
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
        raw[9] = FORMAT_SEALED + 1;
        assert!(Entry::decode(&raw).unwrap_err().contains("newer"));
    }

    fn visitor() -> Entry {
        let mut r = Record::new(7);
        r.data
            .insert("cart".into(), serde_json::json!(["red shoes", 2]));
        r.subject = Some("alice".into());
        r.deadline = 99_000;
        Entry::Session(r)
    }

    fn session(e: Entry) -> Record {
        let Entry::Session(r) = e else {
            panic!("a session")
        };
        r
    }

    #[test]
    fn a_sealed_record_shows_no_data_and_opens_only_under_its_key_and_head() {
        let codec = Codec::sealed("a secret of the operator's, 32 bytes or more", &[]);
        let raw = codec.encode("k1", &visitor());
        assert_eq!(raw[9], FORMAT_SEALED);
        for word in ["red shoes", "cart", "alice"] {
            assert!(
                !raw.windows(word.len()).any(|w| w == word.as_bytes()),
                "{word} readable"
            );
        }
        // The head stays readable for the sweeper and the liveness check.
        assert_eq!(Head::read(&raw), Ok(Head::Session { deadline: 99_000 }));
        assert_eq!(
            session(codec.decode("k1", &raw).unwrap()),
            session(visitor())
        );
        // Copied under another key, or given a later deadline, it does not open.
        assert!(matches!(
            codec.decode("k2", &raw),
            Err(DecodeError::Unopened(_))
        ));
        let mut later = raw.clone();
        later[1..9].copy_from_slice(&999_000i64.to_be_bytes());
        assert!(matches!(
            codec.decode("k1", &later),
            Err(DecodeError::Unopened(_))
        ));
        // Every byte after the head is authenticated.
        for i in 10..raw.len() {
            let mut bent = raw.clone();
            bent[i] ^= 0x01;
            assert!(codec.decode("k1", &bent).is_err(), "byte {i} altered");
        }
        // Two seals of the same record differ (random nonce).
        assert_ne!(codec.encode("k1", &visitor()), raw);
    }

    #[test]
    fn rotation_plain_records_and_a_lost_secret() {
        let old = Codec::sealed("the old secret, long enough to be a real one", &[]);
        let raw_old = old.encode("k", &visitor());
        let rotated = Codec::sealed(
            "the new secret, long enough to be a real one",
            &["the old secret, long enough to be a real one".into()],
        );
        assert_eq!(
            session(rotated.decode("k", &raw_old).unwrap()),
            session(visitor())
        );
        let raw_new = rotated.encode("k", &visitor());
        assert!(matches!(
            old.decode("k", &raw_new),
            Err(DecodeError::Unopened(_))
        ));
        // Written before encryption was turned on: still read, sealed at the next write.
        let plain = Entry::encode(&visitor());
        assert_eq!(
            session(rotated.decode("k", &plain).unwrap()),
            session(visitor())
        );
        // Encryption turned off again: sealed records are named, not misread.
        assert!(matches!(
            Codec::plain().decode("k", &raw_new),
            Err(DecodeError::Unopened(m)) if m.contains("no secret_key")
        ));
        let moved = Entry::Moved(Moved {
            to: "next".into(),
            until: 5,
            retired: 0,
        });
        assert!(matches!(
            rotated.decode("k", &rotated.encode("k", &moved)).unwrap(),
            Entry::Moved(m) if m.to == "next"
        ));
    }
}
