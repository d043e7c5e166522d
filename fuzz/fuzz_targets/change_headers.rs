#![no_main]
//! Arbitrary response headers under the prefix: parsing never panics, and whatever parses
//! applies to a session without panicking.
use http::{HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use session_sidecar::headers::parse_changes;
use session_sidecar::session::changes;
use session_sidecar::session::{Data, Record};

const SUFFIXES: [&str; 11] = [
    "", "-set", "-delete", "-flush", "-cycle", "-expiry", "-subject", "-incr", "-append", "-revoke", "-x",
];

fuzz_target!(|data: &[u8]| {
    let mut pairs = Vec::new();
    for chunk in data.split(|b| *b == b'\n') {
        let Some((&selector, value)) = chunk.split_first() else { continue };
        let name = format!("x-session{}", SUFFIXES[usize::from(selector) % SUFFIXES.len()]);
        if let Ok(v) = HeaderValue::from_bytes(value) {
            pairs.push((HeaderName::from_bytes(name.as_bytes()).unwrap(), v));
        }
    }
    let mut snapshot = Data::new();
    snapshot.insert("a".into(), serde_json::json!(1));
    if let Ok((change, _)) = parse_changes(&pairs, "x-session", &snapshot) {
        let cfg = session_sidecar::Config::from_toml("").unwrap();
        let policy = cfg.expiry.policy(std::time::Duration::from_secs(30));
        let mut r = Record::new(0);
        r.data = snapshot;
        let _ = changes::apply(&mut r, &change, &policy, 1, 8192, false);
    }
});
