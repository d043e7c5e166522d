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
//! - 4 (this release): as 2, but written under the digest of the session key, never the key: the
//!   subject is kept as its digest (`subject_tag`) and, encrypted under a key derived from the
//!   session key, as `subject_sealed`; a forward names its successor by digest (`to`) and keeps
//!   the successor's key encrypted the same way (`next`), for the requests in flight with the
//!   old key. A forward's `retired` is until when its key is a retired one.
//! - 5 (this release): 4, sealed as 3; the authenticated name is the key's digest, so whoever
//!   holds the secret but not the key (the operator's look-ups by handle) can open it.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::session::{Millis, Record};

/// Forwards are followed at most this many times (a session cycled twice while a request was in
/// flight still lands).
pub const MAX_HOPS: usize = 4;

const TAG_SESSION: u8 = b'S';
const TAG_MOVED: u8 = b'M';
/// The format the release before wrote without encryption (and this one in `legacy` mode).
pub const FORMAT_VERSION: u8 = 2;
/// The format of a sealed (encrypted) record, as the release before wrote it.
pub const FORMAT_SEALED: u8 = 3;
/// The format this release writes without encryption: stored under the key's digest, the
/// subject as a digest and sealed for the key's holder, a forward's successor by digest.
pub const FORMAT_NAMED: u8 = 4;
/// Format 4, sealed with the secret's record key; the name authenticated is the key's digest.
pub const FORMAT_NAMED_SEALED: u8 = 5;
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
    /// Reads an unsealed record of the release before (formats 1 and 2); see
    /// [`Codec::decode`] for every format.
    pub fn decode(bytes: &[u8]) -> Result<Entry, String> {
        Codec::plain().decode("", bytes).map_err(|e| e.to_string())
    }

    /// Writes the unsealed format of the release before.
    pub fn encode(&self) -> Vec<u8> {
        Codec::plain().with_legacy_names(true).encode("", self)
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

/// Whether `raw` is in a format this release writes under a key's digest (4 or 5), rather than
/// one the release before wrote under the key in clear.
pub fn is_named(raw: &[u8]) -> bool {
    matches!(raw.get(9), Some(&(FORMAT_NAMED | FORMAT_NAMED_SEALED)))
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

/// Whom a record is read for: the holder of its session key (everything opens), or someone who
/// knows only its digest (the sweeper, the operator's look-ups by handle: data and metadata
/// where the record is not sealed against them, never the subject nor a successor's key).
#[derive(Debug, Clone, Copy)]
pub enum Reader<'a> {
    Key(&'a str),
    Digest(&'a str),
}

impl Reader<'_> {
    fn digest(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Reader::Key(k) => super::id::digest(k).into(),
            Reader::Digest(d) => (*d).into(),
        }
    }
}

/// A decoded entry and the digest of its subject, when it has one (a subject index's name).
#[derive(Debug, Clone)]
pub struct Decoded {
    pub entry: Entry,
    pub tag: Option<String>,
}

type Mac = hmac::Hmac<sha2::Sha256>;

/// How entries become bytes and back: plain JSON, or sealed with keys derived from the
/// operator's secret (newest first; the older ones, from `secret_key_fallbacks`, only open).
///
/// Whatever the sealing, nothing written names a visitor (formats 4 and 5): a subject is kept
/// as its digest (keyed by the secret when one is set, [`Codec::tag`]) and, for whoever has the
/// session key, encrypted under a key derived from that session key; a cycle's forward names its
/// successor by digest, and the successor's key is encrypted the same way for the requests in
/// flight with the old key. `legacy` writes the formats of the release before (clear names,
/// clear subjects), for a fleet that still runs it against the same Redis.
#[derive(Clone, Default)]
pub struct Codec {
    keys: Vec<XChaCha20Poly1305>,
    tags: Vec<Mac>,
    legacy: bool,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Codec {{ sealed with {} key(s), subjects keyed by {} secret(s), legacy: {} }}",
            self.keys.len(),
            self.tags.len(),
            self.legacy
        )
    }
}

/// 32 bytes from an operator's secret (HKDF-SHA256 with a salt and a label of their own: keys
/// derived from the same secret for other uses are unrelated to it).
fn derive(secret: &[u8], salt: &[u8], label: &[u8]) -> [u8; 32] {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), secret);
    let mut okm = [0u8; 32];
    hk.expand(label, &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

/// A 256-bit record key from an operator's secret of any length.
fn record_key(secret: &str) -> XChaCha20Poly1305 {
    let okm = derive(
        secret.as_bytes(),
        b"session-sidecar records",
        b"XChaCha20-Poly1305 v1",
    );
    XChaCha20Poly1305::new(&okm.into())
}

fn subject_mac(secret: &str) -> Mac {
    let okm = derive(
        secret.as_bytes(),
        b"session-sidecar subjects",
        b"HMAC-SHA256 v1",
    );
    <Mac as hmac::Mac>::new_from_slice(&okm).expect("HMAC takes a key of any length")
}

/// The cipher only a session key's holder has: what a record keeps for them alone.
fn key_cipher(key: &str) -> XChaCha20Poly1305 {
    let okm = derive(
        key.as_bytes(),
        b"session-sidecar session key",
        b"XChaCha20-Poly1305 v1",
    );
    XChaCha20Poly1305::new(&okm.into())
}

fn seal_for_key(key: &str, label: &[u8], text: &str) -> String {
    let nonce: [u8; NONCE_LEN] = rand::random();
    let sealed = key_cipher(key)
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: text.as_bytes(),
                aad: label,
            },
        )
        .expect("XChaCha20-Poly1305 seals any length");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    super::id::hex(&out)
}

fn open_for_key(key: &str, label: &[u8], hex: &str) -> Result<String, DecodeError> {
    let bad = || DecodeError::Corrupt("a sealed field does not open with the session key".into());
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    let (nonce, sealed) = bytes.split_at_checked(NONCE_LEN).ok_or_else(bad)?;
    let opened = key_cipher(key)
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: sealed,
                aad: label,
            },
        )
        .map_err(|_| bad())?;
    String::from_utf8(opened).map_err(|_| bad())
}

/// A session as formats 4 and 5 keep it: no subject in clear.
#[derive(Serialize)]
struct SessionOut<'a> {
    data: &'a super::Data,
    created: Millis,
    saved: Millis,
    accessed: Millis,
    expiry: &'a super::ExpiryMode,
    deadline: Millis,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_tag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_sealed: Option<String>,
}

#[derive(Deserialize)]
#[serde(default)]
#[derive(Default)]
struct SessionIn {
    #[serde(deserialize_with = "super::json::deserialize_data")]
    data: super::Data,
    created: Millis,
    saved: Millis,
    accessed: Millis,
    expiry: super::ExpiryMode,
    deadline: Millis,
    subject_tag: Option<String>,
    subject_sealed: Option<String>,
}

/// A forward as formats 4 and 5 keep it: the successor by digest, its key sealed for the
/// holders of the old key.
#[derive(Serialize, Deserialize)]
struct MovedStored {
    to: String,
    #[serde(default)]
    next: String,
    until: Millis,
    #[serde(default)]
    retired: Millis,
}

const SUBJECT_LABEL: &[u8] = b"subject";
const SUCCESSOR_LABEL: &[u8] = b"successor";

impl Codec {
    /// Records as JSON, unencrypted (formats 1, 2 and 4 read; sealed records do not open).
    pub fn plain() -> Codec {
        Codec::default()
    }

    /// Records sealed with `secret`; records sealed with a fallback, and unsealed ones, still
    /// read. Subjects are digested with the secret.
    pub fn sealed(secret: &str, fallbacks: &[String]) -> Codec {
        Codec {
            keys: std::iter::once(secret)
                .chain(fallbacks.iter().map(String::as_str))
                .map(record_key)
                .collect(),
            ..Codec::unsealed(Some(secret), fallbacks)
        }
    }

    /// Records unencrypted; subjects digested with `secret` (and read under its fallbacks) when
    /// one is set.
    pub fn unsealed(secret: Option<&str>, fallbacks: &[String]) -> Codec {
        Codec {
            keys: Vec::new(),
            tags: secret
                .into_iter()
                .chain(fallbacks.iter().map(String::as_str))
                .map(subject_mac)
                .collect(),
            legacy: false,
        }
    }

    /// Writes what the previous release wrote (see [`Codec`]).
    pub fn with_legacy_names(mut self, legacy: bool) -> Codec {
        self.legacy = legacy;
        self
    }

    pub fn is_sealed(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether records are written under their keys in clear, as the previous release did.
    pub fn writes_legacy(&self) -> bool {
        self.legacy
    }

    /// The digest a subject is indexed under now.
    pub fn tag(&self, subject: &str) -> String {
        self.tag_with(self.tags.first(), subject)
    }

    /// Every digest a subject may be indexed under: the secret's, its fallbacks', and the
    /// unkeyed one (written while no secret was set).
    pub fn tags(&self, subject: &str) -> Vec<String> {
        let mut all: Vec<String> = self
            .tags
            .iter()
            .map(|m| self.tag_with(Some(m), subject))
            .collect();
        all.push(self.tag_with(None, subject));
        all.dedup();
        all
    }

    fn tag_with(&self, mac: Option<&Mac>, subject: &str) -> String {
        use hmac::Mac as _;
        match mac {
            Some(mac) => {
                let mut mac = mac.clone();
                mac.update(subject.as_bytes());
                super::id::hex(&mac.finalize().into_bytes())
            }
            None => {
                use sha2::Digest;
                let mut h = sha2::Sha256::new();
                h.update(b"session-sidecar subject\0");
                h.update(subject.as_bytes());
                super::id::hex(&h.finalize())
            }
        }
    }

    /// The bytes stored for `entry`, the session under `key`.
    pub fn encode(&self, key: &str, entry: &Entry) -> Vec<u8> {
        if self.legacy {
            return self.encode_legacy(key, entry);
        }
        let mut json = Vec::with_capacity(256);
        match entry {
            Entry::Session(r) => serde_json::to_writer(
                &mut json,
                &SessionOut {
                    data: &r.data,
                    created: r.created,
                    saved: r.saved,
                    accessed: r.accessed,
                    expiry: &r.expiry,
                    deadline: r.deadline,
                    subject_tag: r.subject.as_deref().map(|s| self.tag(s)),
                    subject_sealed: r
                        .subject
                        .as_deref()
                        .map(|s| seal_for_key(key, SUBJECT_LABEL, s)),
                },
            ),
            Entry::Moved(m) => serde_json::to_writer(
                &mut json,
                &MovedStored {
                    to: if m.to.is_empty() {
                        String::new()
                    } else {
                        super::id::digest(&m.to)
                    },
                    next: if m.to.is_empty() {
                        String::new()
                    } else {
                        seal_for_key(key, SUCCESSOR_LABEL, &m.to)
                    },
                    until: m.until,
                    retired: m.retired,
                },
            ),
        }
        .expect("entries always serialize");
        let Some(cipher) = self.keys.first() else {
            let mut out = entry.head(FORMAT_NAMED);
            out.extend_from_slice(&json);
            return out;
        };
        let mut out = entry.head(FORMAT_NAMED_SEALED);
        self.seal_into(cipher, &mut out, &json, super::id::digest(key).as_bytes());
        out
    }

    /// Formats 2 and 3, as the release before wrote them.
    fn encode_legacy(&self, key: &str, entry: &Entry) -> Vec<u8> {
        let Some(cipher) = self.keys.first() else {
            let mut out = entry.head(FORMAT_VERSION);
            entry.write_json(&mut out);
            return out;
        };
        let mut out = entry.head(FORMAT_SEALED);
        let mut json = Vec::with_capacity(256);
        entry.write_json(&mut json);
        self.seal_into(cipher, &mut out, &json, key.as_bytes());
        out
    }

    /// Appends a random nonce and `json` sealed, authenticating the head already in `out` and
    /// the name the record is stored under.
    fn seal_into(&self, cipher: &XChaCha20Poly1305, out: &mut Vec<u8>, json: &[u8], name: &[u8]) {
        let nonce: [u8; NONCE_LEN] = rand::random();
        out.extend_from_slice(&nonce);
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: json,
                    aad: &aad(&out[..9], name),
                },
            )
            .expect("XChaCha20-Poly1305 seals any length a record can have");
        out.extend_from_slice(&sealed);
    }

    /// The entry stored under `key` as `bytes`.
    pub fn decode(&self, key: &str, bytes: &[u8]) -> Result<Entry, DecodeError> {
        self.read(Reader::Key(key), bytes).map(|d| d.entry)
    }

    /// The entry in `bytes`, as far as `reader` can open it, and its subject's digest.
    pub fn read(&self, reader: Reader<'_>, bytes: &[u8]) -> Result<Decoded, DecodeError> {
        let corrupt = |e: &str| DecodeError::Corrupt(e.to_string());
        let head = Head::read(bytes).map_err(DecodeError::Corrupt)?;
        let opened;
        let (named, body) = match bytes.get(9..).ok_or_else(|| corrupt("truncated entry"))? {
            v1 @ [b'{', ..] => (false, v1),
            [FORMAT_VERSION, rest @ ..] => (false, rest),
            [FORMAT_NAMED, rest @ ..] => (true, rest),
            [version @ (FORMAT_SEALED | FORMAT_NAMED_SEALED), rest @ ..] => {
                let named = *version == FORMAT_NAMED_SEALED;
                let name = match (named, reader) {
                    (true, r) => r.digest().into_owned(),
                    (false, Reader::Key(k)) => k.to_string(),
                    (false, Reader::Digest(_)) => {
                        return Err(corrupt("a record under a clear key read by digest"));
                    }
                };
                opened = self.open(&bytes[..9], rest, name.as_bytes())?;
                (named, &opened[..])
            }
            [v, ..] => {
                return Err(DecodeError::Corrupt(format!(
                    "record format version {v} is newer than this release reads ({FORMAT_NAMED_SEALED})"
                )));
            }
            [] => return Err(corrupt("truncated entry")),
        };
        let json = |e: serde_json::Error| DecodeError::Corrupt(e.to_string());
        if !named {
            let entry = match head {
                Head::Session { .. } => serde_json::from_slice(body).map(Entry::Session),
                Head::Moved { .. } => serde_json::from_slice(body).map(Entry::Moved),
            }
            .map_err(json)?;
            let tag = match &entry {
                Entry::Session(r) => r.subject.clone(),
                Entry::Moved(_) => None,
            };
            return Ok(Decoded { entry, tag });
        }
        let key = match reader {
            Reader::Key(k) => Some(k),
            Reader::Digest(_) => None,
        };
        match head {
            Head::Session { .. } => {
                let s: SessionIn = serde_json::from_slice(body).map_err(json)?;
                let subject = match (key, &s.subject_sealed) {
                    (Some(k), Some(sealed)) => Some(open_for_key(k, SUBJECT_LABEL, sealed)?),
                    _ => None,
                };
                Ok(Decoded {
                    entry: Entry::Session(Record {
                        data: s.data,
                        created: s.created,
                        saved: s.saved,
                        accessed: s.accessed,
                        expiry: s.expiry,
                        subject,
                        deadline: s.deadline,
                    }),
                    tag: s.subject_tag,
                })
            }
            Head::Moved { .. } => {
                let m: MovedStored = serde_json::from_slice(body).map_err(json)?;
                let to = match key {
                    Some(k) if !m.next.is_empty() => open_for_key(k, SUCCESSOR_LABEL, &m.next)?,
                    _ => String::new(),
                };
                Ok(Decoded {
                    entry: Entry::Moved(Moved {
                        to,
                        until: m.until,
                        retired: m.retired,
                    }),
                    tag: None,
                })
            }
        }
    }

    fn open(&self, head: &[u8], rest: &[u8], name: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let (nonce, sealed) = rest
            .split_at_checked(NONCE_LEN)
            .ok_or_else(|| DecodeError::Corrupt("truncated sealed entry".into()))?;
        if self.keys.is_empty() {
            return Err(DecodeError::Unopened(
                "the record is encrypted and no secret_key is configured",
            ));
        }
        let aad = aad(head, name);
        self.keys
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
            ))
    }
}

/// What a sealed record's encryption authenticates besides its data: its head and the name it
/// is stored under.
fn aad(head: &[u8], name: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(head.len() + name.len());
    aad.extend_from_slice(head);
    aad.extend_from_slice(name);
    aad
}

#[cfg(test)]
#[path = "entry_tests.rs"]
mod tests;
