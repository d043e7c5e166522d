//! Session keys: 256 bits from the operating system's CSPRNG, written as 64 lowercase hex digits.

use rand::RngCore;

/// Length of a key in characters.
pub const KEY_LEN: usize = 64;

/// A fresh random session key.
pub fn generate() -> String {
    let mut bytes = [0u8; KEY_LEN / 2];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex(&bytes)
}

/// `bytes` as lowercase hex digits.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out
}

/// Length of a handle in characters.
pub const HANDLE_LEN: usize = 16;

/// The name the store knows a session by: SHA-256 of its key, in hex. One-way: whoever reads the
/// store (or a backup of it) learns no key, so no working cookie. A key has 256 random bits, so
/// an unkeyed digest cannot be turned back by guessing (Rack stores its session ids the same way
/// since CVE-2019-16782).
pub fn digest(key: &str) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(key.as_bytes()))
}

/// The one-way name of a session that the admin interface shows instead of its key: the first
/// 16 hex digits of SHA-256 of the key, so the start of its [`digest`]. It names a session
/// without being able to open it.
pub fn handle(key: &str) -> String {
    let mut d = digest(key);
    d.truncate(HANDLE_LEN);
    d
}

/// Whether `text` has the shape of a handle.
pub fn is_handle(text: &str) -> bool {
    text.len() == HANDLE_LEN && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `text` has the shape of a key we issue; anything else is never looked up.
pub fn is_well_formed(text: &str) -> bool {
    text.len() == KEY_LEN && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_well_formed_and_distinct() {
        let a = generate();
        let b = generate();
        assert!(is_well_formed(&a) && is_well_formed(&b));
        assert_ne!(a, b);
    }

    #[test]
    fn malformed_keys_are_rejected() {
        assert!(!is_well_formed(""));
        assert!(!is_well_formed(&"g".repeat(KEY_LEN)));
        assert!(!is_well_formed(&"A".repeat(KEY_LEN)));
        assert!(!is_well_formed(&"a".repeat(KEY_LEN + 1)));
    }
}
