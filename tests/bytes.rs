//! What the field sends, byte for byte: header values with every byte a client may send, header
//! names in every spelling, JSON strings with every code point. Each property asserts what HTTP
//! itself requires (a header value hyper accepts, a Cookie forwarded unchanged), first on the
//! functions, then over real HTTP against a running sidecar. `PROPTEST_CASES=N` runs more.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use session_sidecar::Config;
use session_sidecar::cookie::SessionCookie;
use session_sidecar::headers::{is_ours, parse_changes};
use session_sidecar::session::{Data, id, json};
use session_sidecar::{Scrub, scrub_request_head};

/// A byte a client may put in a header value (RFC 9110 §5.5: field-vchar, obs-text, SP, HTAB).
fn value_byte() -> impl Strategy<Value = u8> {
    prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff]
}

/// A piece of a Cookie header that is not ours: any value bytes but `;`, trimmed, not empty.
fn foreign_piece() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(value_byte().prop_filter("no ;", |b| *b != b';'), 1..24)
        .prop_map(|v| v.trim_ascii().to_vec())
        .prop_filter("not empty, not ours", |v| {
            !v.is_empty() && v.split(|b| *b == b'=').next().unwrap().trim_ascii() != b"sessionid"
        })
}

/// A header name in some spelling of the sidecar's prefix, or a foreign one.
fn header_name() -> impl Strategy<Value = String> {
    let ours = (
        prop::sample::select(vec![
            "x-session",
            "X_Session",
            "x_SESSION",
            "X-SESSION",
            "x-webauth",
            "X_WEBAUTH",
        ]),
        prop::sample::select(vec![
            "",
            "-set",
            "_set",
            "-Status",
            "_expiry-age",
            "_id",
            "-foo",
            "-user",
            "_USER",
        ]),
    )
        .prop_map(|(p, s)| format!("{p}{s}"));
    prop_oneof![ours, "[a-zA-Z0-9_-]{1,16}", "x[-_]sess[a-z_-]{0,8}"]
}

fn jar() -> SessionCookie {
    let cfg = Config::from_toml("").unwrap();
    SessionCookie::new(cfg.cookie, None, &[])
}

fn scrub(h: &mut HeaderMap, jar: &SessionCookie) -> session_sidecar::cookie::Presented {
    scrub_request_head(
        h,
        None,
        jar,
        &Scrub {
            prefix: "x-session",
            peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
            trust_forwarded: false,
            upgrade: false,
            identity: Some(&IDENTITY),
        },
    )
}

/// The `[identity]` header the scrub is given: an app's own user header (Grafana's).
static IDENTITY: HeaderName = HeaderName::from_static("x-webauth-user");

proptest! {
    #[test]
    fn our_cookie_is_found_among_any_bytes_and_the_rest_pass_unchanged(
        before in prop::collection::vec(foreign_piece(), 0..4),
        after in prop::collection::vec(foreign_piece(), 0..4),
        split in any::<bool>(),
    ) {
        let key = id::generate();
        let ours = format!("sessionid={key}").into_bytes();
        let mut h = HeaderMap::new();
        let join = |pieces: &[Vec<u8>]| pieces.join(&b"; "[..]);
        if split {
            // A browser over HTTP/2 may send one Cookie header per cookie.
            for p in before.iter().chain([&ours]).chain(after.iter()) {
                h.append(http::header::COOKIE, HeaderValue::from_bytes(p).unwrap());
            }
        } else {
            let all: Vec<Vec<u8>> = before.iter().cloned().chain([ours]).chain(after.iter().cloned()).collect();
            h.append(http::header::COOKIE, HeaderValue::from_bytes(&join(&all)).unwrap());
        }
        let presented = scrub(&mut h, &jar());
        prop_assert_eq!(presented.keys, vec![key]);
        let others: Vec<Vec<u8>> = before.into_iter().chain(after).collect();
        let forwarded: Vec<&[u8]> = h.get_all(http::header::COOKIE).iter().map(|v| v.as_bytes()).collect();
        if others.is_empty() {
            prop_assert!(forwarded.is_empty());
        } else {
            let expected = join(&others);
            prop_assert_eq!(forwarded, vec![&expected[..]]);
        }
    }

    #[test]
    fn no_header_of_ours_survives_the_scrub_in_any_spelling(
        headers in prop::collection::vec((header_name(), prop::collection::vec(value_byte(), 0..40)), 0..12),
    ) {
        let mut h = HeaderMap::new();
        let mut foreign = Vec::new();
        for (name, value) in &headers {
            let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) else {
                continue;
            };
            let cgi = n.as_str().replace('_', "-");
            if !(cgi == "x-session" || cgi.starts_with("x-session-") || cgi == "x-webauth-user"
                 || is_hop_or_forwarding(n.as_str())) {
                foreign.push((n.clone(), v.clone()));
            }
            h.append(n, v);
        }
        scrub(&mut h, &jar());
        for name in h.keys() {
            prop_assert!(!is_ours(name.as_str(), "x-session"), "{} survived", name);
            prop_assert!(name.as_str().replace('_', "-") != "x-webauth-user", "{} survived", name);
        }
        for (n, v) in foreign {
            prop_assert!(h.get_all(&n).iter().any(|x| x == v), "{} was lost", n);
        }
    }

    #[test]
    fn every_json_string_round_trips_as_a_header_value_hyper_accepts(
        strings in prop::collection::vec(prop::collection::vec(any::<char>(), 0..24), 1..6),
        controls in prop::collection::vec(prop_oneof![0u32..0x20, Just(0x7f), 0x80u32..0xa0], 0..8),
    ) {
        let mut d = Data::new();
        for (i, chars) in strings.into_iter().enumerate() {
            let mut s: String = chars.into_iter().collect();
            s.extend(controls.iter().filter_map(|&c| char::from_u32(c)));
            d.insert(s.clone(), Value::String(s + &i.to_string()));
        }
        let wire = json::encode_ascii(&d);
        prop_assert!(HeaderValue::from_str(&wire).is_ok(), "hyper refuses {}", wire);
        let back: Data = serde_json::from_str(&wire).unwrap();
        prop_assert_eq!(back, d);
    }

    #[test]
    fn whatever_the_app_sends_the_next_request_header_is_valid(
        values in prop::collection::vec(
            (prop::sample::select(vec!["x-session", "x-session-set", "x-session-delete",
                                       "x-session-incr", "x-session-append"]),
             prop::collection::vec(value_byte(), 0..80)),
            1..4),
        wrapped in prop::collection::vec(any::<char>(), 0..16),
    ) {
        let text: String = wrapped.into_iter().collect();
        let mut pairs: Vec<(HeaderName, HeaderValue)> = values
            .into_iter()
            .filter_map(|(n, v)| Some((HeaderName::from_static(n), HeaderValue::from_bytes(&v).ok()?)))
            .collect();
        // A well-formed change whose string holds any code point, sent as raw UTF-8.
        let raw = json!({ "k": text }).to_string();
        if let Ok(v) = HeaderValue::from_bytes(raw.as_bytes()) {
            pairs.push((HeaderName::from_static("x-session-set"), v));
        }
        if let Ok((change, _)) = parse_changes(&pairs, "x-session", &Data::new()) {
            let mut r = session_sidecar::session::Record::new(0);
            let c = Config::from_toml("").unwrap();
            let policy = c.expiry.policy(std::time::Duration::from_secs(1));
            if session_sidecar::session::changes::apply(&mut r, &change, &policy, 1, 8192, false).is_ok() {
                prop_assert!(HeaderValue::from_str(&json::encode_ascii(&r.data)).is_ok());
            }
        }
    }
}

fn is_hop_or_forwarding(name: &str) -> bool {
    session_sidecar::headers::HOP_BY_HOP
        .iter()
        .any(|h| h == name)
        || session_sidecar::headers::UNTRUSTED_FORWARDING
            .iter()
            .any(|h| h == name)
        || matches!(
            name,
            "upgrade"
                | "x-forwarded-for"
                | "x-forwarded-proto"
                | "x-forwarded-host"
                | "host"
                | "cookie"
        )
}

/// Random Cookie headers and spelled headers over real HTTP, against a running sidecar: the
/// session is found whatever the other bytes are, the other cookies reach the app unchanged,
/// and no spelling of ours does.
#[tokio::test]
async fn random_bytes_over_real_http_never_lose_the_session() {
    let recorded = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Vec<u8>, Vec<String>)>::new()));
    let log = recorded.clone();
    let app = start_app(move |req: hyper::Request<hyper::body::Incoming>| {
        let log = log.clone();
        async move {
            let cookie = req
                .headers()
                .get("cookie")
                .map_or(Vec::new(), |v| v.as_bytes().to_vec());
            let names = req
                .headers()
                .keys()
                .map(|n| n.as_str().to_string())
                .collect();
            log.lock().unwrap().push((cookie, names));
            echo(req).await
        }
    })
    .await;
    let s = sidecar_for(app, "").await;
    let r = s
        .get(&plain(), "/")
        .reply(&[("X-Session-Set", r#"{"n":1}"#)])
        .send()
        .await;
    let value = cookie_value(&set_cookies(&r)[0]);
    let seed: u64 = std::env::var("BYTES_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let byte = |rng: &mut rand::rngs::StdRng| loop {
        let b: u8 = rng.r#gen();
        if (b == b'\t' || b >= 0x20) && b != 0x7f && b != b';' {
            return b;
        }
    };
    for round in 0..150 {
        let mut others: Vec<Vec<u8>> = Vec::new();
        for i in 0..rng.gen_range(0..4) {
            let mut piece = format!("c{round}x{i}=").into_bytes();
            for _ in 0..rng.gen_range(0..12) {
                piece.push(byte(&mut rng));
            }
            others.push(piece.trim_ascii().to_vec());
        }
        let at = rng.gen_range(0..=others.len());
        let mut pieces = others.clone();
        pieces.insert(at, format!("sessionid={value}").into_bytes());
        let spelling = [
            "X_Session",
            "x_session_set",
            "X-Session_Status",
            "x-session",
            "X_SESSION_ID",
        ][round % 5];
        let mut request = format!("GET /r{round} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n{spelling}: {{\"user\":\"admin\"}}\r\nCookie: ").into_bytes();
        request.extend_from_slice(&pieces.join(&b"; "[..]));
        request.extend_from_slice(b"\r\n\r\n");
        let answer = raw_exchange(s.addr, &request).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "round {round}: {answer}"
        );
        assert!(
            answer.contains(r#""x-session-status":["existing"]"#),
            "round {round}: {answer}"
        );
        let (cookie, names) = recorded.lock().unwrap().last().unwrap().clone();
        assert_eq!(cookie, others.join(&b"; "[..]), "round {round}");
        for n in names {
            let cgi = n.replace('_', "-");
            assert!(
                !cgi.starts_with("x-session")
                    || ["x-session", "x-session-status", "x-session-expiry-age"]
                        .contains(&n.as_str()),
                "round {round}: {n} reached the app"
            );
        }
    }
}

/// A JSON number token as an app may write one: any size of integer, fractions with trailing
/// zeros, exponents in either case, with or without a sign.
fn number_token(rng: &mut rand::rngs::StdRng) -> String {
    let digits = |rng: &mut rand::rngs::StdRng, n: usize| -> String {
        (0..n)
            .map(|_| char::from(b'0' + rng.gen_range(0..10u8)))
            .collect()
    };
    let mut t = String::new();
    if rng.gen_bool(0.3) {
        t.push('-');
    }
    if rng.gen_bool(0.2) {
        t.push('0');
    } else {
        t.push(char::from(b'1' + rng.gen_range(0..9u8)));
        let n = rng.gen_range(0..40);
        t += &digits(rng, n);
    }
    if rng.gen_bool(0.4) {
        t.push('.');
        let n = rng.gen_range(1..20);
        t += &digits(rng, n);
    }
    if rng.gen_bool(0.3) {
        t.push(if rng.gen_bool(0.5) { 'e' } else { 'E' });
        match rng.gen_range(0..3) {
            0 => t.push('+'),
            1 => t.push('-'),
            _ => {}
        }
        let n = rng.gen_range(1..5);
        t += &digits(rng, n);
    }
    t
}

/// docs/HEADERS.md §1: every number the app writes reaches it again textually identical —
/// a 23-digit integer is not a float, `1.10` keeps its zero, `1E3` its spelling — through
/// `X-Session-Set`, the full `X-Session` and the store, over real HTTP.
#[tokio::test]
async fn every_number_an_app_writes_comes_back_as_written() {
    let s = sidecar("").await;
    let b = browser();
    let seed: u64 = std::env::var("BYTES_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut expected = String::from("{}");
    for round in 0..120 {
        let (a, c) = (number_token(&mut rng), number_token(&mut rng));
        let list: Vec<String> = (0..rng.gen_range(0..4))
            .map(|_| number_token(&mut rng))
            .collect();
        let (name, value) = if round % 2 == 0 {
            (
                "X-Session-Set",
                format!(r#"{{"a":{a}, "b":[{}]}}"#, list.join(" , ")),
            )
        } else {
            (
                "X-Session",
                format!(
                    r#"{{ "a" : {a}, "b": [{}] , "c":{{"d":{c}}}}}"#,
                    list.join(",")
                ),
            )
        };
        expected = if round % 2 == 0 && expected.contains(r#""c":"#) {
            let c_part = &expected[expected.find(r#","c":"#).unwrap()..];
            format!(r#"{{"a":{a},"b":[{}]{c_part}"#, list.join(","))
        } else if round % 2 == 0 {
            format!(r#"{{"a":{a},"b":[{}]}}"#, list.join(","))
        } else {
            format!(r#"{{"a":{a},"b":[{}],"c":{{"d":{c}}}}}"#, list.join(","))
        };
        let r = s.get(&b, "/").reply(&[(name, &value)]).send().await;
        assert_eq!(r.status(), 200, "round {round}: {value}");
        let seen = s.get(&b, "/").seen().await;
        assert_eq!(
            seen.header("x-session"),
            Some(expected.as_str()),
            "round {round}: the app wrote {value}"
        );
    }
}
