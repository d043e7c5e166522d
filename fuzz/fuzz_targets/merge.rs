#![no_main]
//! Two JSON objects from the input: applying the diff of a to b to a gives b.
use libfuzzer_sys::fuzz_target;
use session_sidecar::session::changes::{self, Change, diff};
use session_sidecar::session::{Data, Record};

fuzz_target!(|data: &[u8]| {
    let Some(split) = data.iter().position(|b| *b == 0) else { return };
    let (Ok(a), Ok(b)) = (
        serde_json::from_slice::<Data>(&data[..split]),
        serde_json::from_slice::<Data>(&data[split + 1..]),
    ) else {
        return;
    };
    let cfg = session_sidecar::Config::from_toml("").unwrap();
    let policy = cfg.expiry.policy(std::time::Duration::from_secs(30));
    let mut r = Record::new(0);
    r.data = a.clone();
    let change = Change { ops: diff(&a, &b), ..Change::default() };
    changes::apply(&mut r, &change, &policy, 1, usize::MAX, false).unwrap();
    assert_eq!(r.data, b);
});
