//! The sled store's indexes, byte for byte:
//! - `expiry`: bucket ‖ key → (), where bucket is the entry's deadline rounded up to
//!   [`BUCKET_MS`]: the sweeper reads only the buckets that have passed;
//! - `subjects`: subject ‖ 0 ‖ key → ().

use crate::session::Millis;

/// Granularity of the expiry index. A session's index entry moves only when its deadline
/// crosses into another bucket, so a busy session costs an index write at most this often.
pub const BUCKET_MS: Millis = 10_000;

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
