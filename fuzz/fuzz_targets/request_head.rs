#![no_main]
//! The whole request-head path as one function (`scrub_request_head`: cookie extraction, header
//! scrubbing in every spelling, hop-by-hop, X-Forwarded-*), on arbitrary header lines. Whatever
//! the bytes: no panic, no header of ours survives, our cookie is not forwarded, the other
//! cookies' bytes pass unchanged, and every value left is one hyper would send.
use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderName, HeaderValue, header::COOKIE};
use libfuzzer_sys::fuzz_target;
use session_sidecar::cookie::SessionCookie;
use session_sidecar::headers::is_ours;
use session_sidecar::{Scrub, scrub_request_head};

fuzz_target!(|data: &[u8]| {
    let cfg = session_sidecar::Config::from_toml("").unwrap();
    let flags = data.first().copied().unwrap_or(0);
    let jar = SessionCookie::new(
        cfg.cookie,
        (flags & 1 == 1).then_some("a fuzzing secret of at least thirty-two bytes"),
        &[],
    );
    let mut h = HeaderMap::new();
    let mut foreign_cookies: Vec<Vec<u8>> = Vec::new();
    for line in data.get(1..).unwrap_or_default().split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        if name == COOKIE {
            for piece in value.as_bytes().split(|b| *b == b';').map(<[u8]>::trim_ascii) {
                let cookie_name = piece.split(|b| *b == b'=').next().unwrap().trim_ascii();
                if !piece.is_empty() && cookie_name != b"sessionid" {
                    foreign_cookies.push(piece.to_vec());
                }
            }
        }
        h.append(name, value);
    }
    let cookies: Vec<Vec<u8>> = h.get_all(COOKIE).iter().map(|v| v.as_bytes().to_vec()).collect();
    let untouched = cookies.len() == 1 && !jar.carried(&h);
    scrub_request_head(
        &mut h,
        None,
        &jar,
        &Scrub {
            prefix: "x-session",
            peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
            trust_forwarded: flags & 2 == 2,
            upgrade: flags & 4 == 4,
            identity: None,
        },
    );
    for (name, value) in &h {
        assert!(!is_ours(name.as_str(), "x-session"), "{name} survived");
        assert!(HeaderValue::from_bytes(value.as_bytes()).is_ok());
    }
    let forwarded: Vec<u8> = h
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().to_vec())
        .collect();
    assert!(h.get_all(COOKIE).iter().count() <= 1, "one Cookie header upstream");
    if untouched {
        // One Cookie header without ours passes exactly as it came.
        assert_eq!(forwarded, cookies[0]);
    } else if !foreign_cookies.is_empty() || !forwarded.is_empty() {
        assert_eq!(forwarded, foreign_cookies.join(&b"; "[..]));
    }
});
