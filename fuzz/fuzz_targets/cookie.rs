#![no_main]
//! Arbitrary Cookie header bytes: taking our cookie never panics and never forwards it.
use http::{HeaderMap, HeaderValue, header::COOKIE};
use libfuzzer_sys::fuzz_target;
use session_sidecar::cookie::SessionCookie;

fuzz_target!(|data: &[u8]| {
    let cfg = session_sidecar::Config::from_toml("").unwrap();
    let signed = data.first().is_some_and(|b| b & 1 == 1);
    let jar = SessionCookie::new(cfg.cookie, signed.then_some("fuzz secret"), &[]);
    let mut h = HeaderMap::new();
    for part in data.split(|b| *b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(part) {
            h.append(COOKIE, v);
        }
    }
    let presented = jar.take(&mut h);
    if presented.carried {
        for v in h.get_all(COOKIE) {
            let s = v.to_str().unwrap();
            assert!(!s.split(';').any(|p| p.split('=').next().unwrap().trim() == "sessionid"));
        }
    }
});
