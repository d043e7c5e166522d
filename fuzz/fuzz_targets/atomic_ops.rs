#![no_main]
//! `X-Session-Incr` and `X-Session-Append` on arbitrary bytes, against an arbitrary stored
//! session: parsing never panics, and a change that applies adds exactly (the sum of the stored
//! integer and the header's, at any size) and appends exactly (the stored list, then the
//! header's items in order); one that is refused leaves nothing half-done in the copy it
//! refused.
use http::{HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use session_sidecar::headers::parse_changes;
use session_sidecar::session::changes::{self, Op, integer};
use num_bigint::BigInt;
use serde_json::{Number, Value};
use session_sidecar::session::{Data, Record, json};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let (Some(stored), Some(incr), Some(append)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let Ok(Some(stored)) = json::parse_object(stored) else { return };
    let mut pairs = Vec::new();
    for (name, value) in [("x-session-incr", incr), ("x-session-append", append)] {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            pairs.push((HeaderName::from_static(name), v));
        }
    }
    let Ok((change, _)) = parse_changes(&pairs, "x-session", &stored) else { return };
    let cfg = session_sidecar::Config::from_toml("").unwrap();
    let policy = cfg.expiry.policy(std::time::Duration::from_secs(30));
    let mut r = Record::new(0);
    r.data = stored.clone();
    if changes::apply(&mut r, &change, &policy, 1, usize::MAX, false).is_err() {
        return;
    }
    // Replay the operations by hand on the stored data and compare.
    let mut expected: Data = stored;
    for op in &change.ops {
        match op {
            Op::Set(k, v) => {
                expected.insert(k.clone(), v.clone());
            }
            Op::Delete(k) => {
                expected.remove(k);
            }
            Op::Incr(k, by) => {
                let held = match expected.get(k) {
                    None => BigInt::ZERO,
                    Some(Value::Number(n)) => integer(n).expect("applied, so an integer"),
                    Some(_) => panic!("applied, so an integer or missing"),
                };
                if *by != BigInt::ZERO || !expected.contains_key(k) {
                    let sum = Number::from_string_unchecked((held + by).to_string());
                    expected.insert(k.clone(), Value::Number(sum));
                }
            }
            Op::Append(k, items) => {
                let mut list = match expected.get(k) {
                    Some(Value::Array(l)) => l.clone(),
                    None => Vec::new(),
                    Some(_) => panic!("applied, so a list or missing"),
                };
                list.extend(items.iter().cloned());
                expected.insert(k.clone(), Value::Array(list));
            }
        }
    }
    assert_eq!(json::encode_ascii(&r.data), json::encode_ascii(&expected));
});
