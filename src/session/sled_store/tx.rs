//! The four sled trees as one transaction sees them, and the byte layouts of their keys.

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use crate::session::changes::TooLarge;
use crate::session::store::StoreError;
use crate::session::{Millis, Record};

/// Forwards are followed at most this many times (a session cycled twice while a request was in
/// flight still lands).
pub(super) const MAX_HOPS: usize = 4;
pub(super) const KIND_SESSION: u8 = b's';
pub(super) const KIND_FORWARD: u8 = b'f';

#[derive(Serialize, Deserialize)]
pub(super) struct Forward {
    pub(super) to: String,
    pub(super) until: Millis,
}

pub(super) enum Abort {
    TooLarge(TooLarge),
    Corrupt(String),
}

pub(super) type TxResult<T> = Result<T, ConflictableTransactionError<Abort>>;

pub(super) fn corrupt(e: impl std::fmt::Display) -> ConflictableTransactionError<Abort> {
    ConflictableTransactionError::Abort(Abort::Corrupt(e.to_string()))
}

pub(super) fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

pub(super) fn index_key(deadline: Millis, kind: u8, key: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + key.len());
    v.extend_from_slice(&(deadline.max(0) as u64).to_be_bytes());
    v.push(kind);
    v.extend_from_slice(key.as_bytes());
    v
}

pub(super) fn subject_key(subject: &str, key: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(subject.len() + 1 + key.len());
    v.extend_from_slice(subject.as_bytes());
    v.push(0);
    v.extend_from_slice(key.as_bytes());
    v
}

pub(super) fn decode(bytes: &[u8]) -> Result<Record, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

pub(super) fn encode(record: &Record) -> Vec<u8> {
    serde_json::to_vec(record).expect("a record always serializes")
}

/// The four trees as seen inside one transaction.
pub(super) struct Tx<'a> {
    pub(super) sessions: &'a TransactionalTree,
    pub(super) forwards: &'a TransactionalTree,
    pub(super) index: &'a TransactionalTree,
    pub(super) subjects: &'a TransactionalTree,
}

impl Tx<'_> {
    pub(super) fn get(&self, key: &str) -> TxResult<Option<Record>> {
        match self.sessions.get(key)? {
            Some(b) => decode(&b).map(Some).map_err(corrupt),
            None => Ok(None),
        }
    }

    /// Follows forwards from `key` to the live record, if any: (its key, it, whether forwarded).
    pub(super) fn live(&self, key: &str, now: Millis) -> TxResult<Option<(String, Record, bool)>> {
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

    pub(super) fn put(&self, key: &str, old: Option<&Record>, new: &Record) -> TxResult<()> {
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

    pub(super) fn delete(&self, key: &str, old: &Record) -> TxResult<()> {
        self.unindex(key, old)?;
        self.sessions.remove(key)?;
        Ok(())
    }

    pub(super) fn unindex(&self, key: &str, old: &Record) -> TxResult<()> {
        self.index
            .remove(index_key(old.deadline, KIND_SESSION, key))?;
        if let Some(s) = &old.subject {
            self.subjects.remove(subject_key(s, key))?;
        }
        Ok(())
    }

    pub(super) fn forward(&self, from: &str, to: &str, until: Millis) -> TxResult<()> {
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
