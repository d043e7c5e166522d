//! Property tests (proptest, on stable): the merge is correct, and no parser of outside input
//! panics, whatever bytes it is given. `PROPTEST_CASES=N` runs more cases (see docs/FUZZING.md).

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use serde_json::Value;
use session_sidecar::Config;
use session_sidecar::cookie::SessionCookie;
use session_sidecar::headers::parse_changes;
use session_sidecar::session::changes::{self, Change, diff};
use session_sidecar::session::{Data, Policy, Record, json};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn data() -> impl Strategy<Value = Data> {
    prop::collection::btree_map("[a-e]{1,2}|.{0,8}", json_value(), 0..8)
        .prop_map(|m| m.into_iter().collect())
}

fn policy() -> Policy {
    let c = Config::from_toml("").unwrap();
    c.expiry.policy(std::time::Duration::from_secs(30))
}

fn apply(base: &Data, change: &Change) -> Data {
    let mut r = Record::new(0);
    r.data = base.clone();
    changes::apply(&mut r, change, &policy(), 1, usize::MAX, false).unwrap();
    r.data
}

fn ops(from: &Data, to: &Data) -> Change {
    Change {
        ops: diff(from, to),
        ..Change::default()
    }
}

proptest! {
    #[test]
    fn applying_the_diff_of_a_to_b_to_a_gives_b(a in data(), b in data()) {
        prop_assert_eq!(apply(&a, &ops(&a, &b)), b);
    }

    #[test]
    fn changes_to_disjoint_keys_commute(base in data(), x in data(), y in data()) {
        // x's keys are prefixed "x:" and y's "y:", so the two changes touch disjoint keys.
        let tag = |p: &str, d: &Data| -> Data { d.iter().map(|(k, v)| (format!("{p}{k}"), v.clone())).collect() };
        let (x, y) = (tag("x:", &x), tag("y:", &y));
        let mut with_x = base.clone();
        with_x.extend(x.clone());
        let mut with_y = base.clone();
        with_y.extend(y.clone());
        let cx = ops(&base, &with_x);
        let cy = ops(&base, &with_y);
        let xy = apply(&apply(&base, &cx), &cy);
        let yx = apply(&apply(&base, &cy), &cx);
        prop_assert_eq!(&xy, &yx);
        let mut both = base.clone();
        both.extend(x);
        both.extend(y);
        prop_assert_eq!(xy, both);
    }

    #[test]
    fn the_wire_form_is_ascii_and_round_trips(d in data()) {
        let text = json::encode_ascii(&d);
        prop_assert!(text.is_ascii());
        let back: Data = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(back, d);
    }

    #[test]
    fn change_header_parsing_never_panics(
        headers in prop::collection::vec(
            (prop_oneof![Just(""), Just("-set"), Just("-delete"), Just("-flush"), Just("-cycle"),
                         Just("-expiry"), Just("-subject"), Just("-incr"), Just("-append"),
                         Just("-revoke"), Just("-foo")],
             prop::collection::vec(any::<u8>(), 0..64)),
            0..6),
        snapshot in data(),
    ) {
        let pairs: Vec<(HeaderName, HeaderValue)> = headers
            .into_iter()
            .filter_map(|(suffix, bytes)| {
                let value = HeaderValue::from_bytes(&bytes).ok()?;
                Some((HeaderName::from_bytes(format!("x-session{suffix}").as_bytes()).unwrap(), value))
            })
            .collect();
        if let Ok((change, _)) = parse_changes(&pairs, "x-session", &snapshot) {
            // Whatever parsed applies, or is refused as unfit, without panicking.
            let mut r = Record::new(0);
            r.data = snapshot.clone();
            let _ = changes::apply(&mut r, &change, &policy(), 1, usize::MAX, false);
        }
    }

    #[test]
    fn json_change_values_parse_or_fail_cleanly(v in json_value(), raw in ".{0,40}") {
        for text in [v.to_string(), raw] {
            if let Ok(value) = HeaderValue::from_str(&text) {
                for name in ["x-session", "x-session-set", "x-session-delete", "x-session-incr",
                             "x-session-append"] {
                    let pairs = vec![(HeaderName::from_static(name), value.clone())];
                    let _ = parse_changes(&pairs, "x-session", &Data::new());
                }
            }
        }
    }

    #[test]
    fn cookie_parsing_never_panics_and_never_forwards_our_cookie(
        raw in prop::collection::vec(any::<u8>(), 0..200),
        pairs in prop::collection::vec(("[a-z]{1,8}|sessionid", "[ -~]{0,70}"), 0..6),
        signed in any::<bool>(),
    ) {
        let cfg = Config::from_toml("").unwrap();
        let secret = signed.then_some("a secret for the property test");
        let jar = SessionCookie::new(cfg.cookie, secret, &[]);
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&raw) {
            h.append(http::header::COOKIE, v);
        }
        let text: Vec<String> = pairs.iter().map(|(n, v)| format!("{n}={v}")).collect();
        if let Ok(v) = HeaderValue::from_str(&text.join("; ")) {
            h.append(http::header::COOKIE, v);
        }
        let presented = jar.take(&mut h);
        prop_assert!(presented.keys.len() <= session_sidecar::cookie::MAX_CANDIDATES);
        if presented.carried {
            for v in h.get_all(http::header::COOKIE) {
                let s = v.to_str().unwrap_or("");
                prop_assert!(!s.split(';').any(|p| p.split('=').next().unwrap_or("").trim() == "sessionid"), "{}", s);
            }
        }
    }

    #[test]
    fn config_parsing_never_panics(text in "[ -~\n]{0,200}", key in "[a-z_.]{1,20}", value in "[ -~]{0,20}") {
        let _ = Config::from_toml(&text);
        let _ = Config::from_toml(&format!("{key} = {value}"));
        let env = vec![(format!("SESSION_SIDECAR_{}", key.to_uppercase().replace('.', "__")), value)];
        let _ = Config::from_toml_with_env("", env);
    }

    #[test]
    fn increments_add_exactly_at_any_size_in_either_order(
        start in "0|-?[1-9][0-9]{0,40}",
        adds in prop::collection::vec("0|-?[1-9][0-9]{0,40}", 1..6),
    ) {
        let expected = adds.iter().fold(start.parse::<num_bigint::BigInt>().unwrap(), |sum, a| {
            sum + a.parse::<num_bigint::BigInt>().unwrap()
        });
        let stored = json::parse_object(format!("{{\"n\":{start}}}").as_bytes()).unwrap().unwrap();
        let each: Vec<Change> = adds
            .iter()
            .map(|a| {
                let v = HeaderValue::from_str(&format!("{{\"n\": {a}}}")).unwrap();
                parse_changes(&[(HeaderName::from_static("x-session-incr"), v)], "x-session", &stored)
                    .unwrap()
                    .0
            })
            .collect();
        for order in [each.clone(), each.iter().rev().cloned().collect()] {
            let mut data = stored.clone();
            for change in &order {
                data = apply(&data, change);
            }
            prop_assert_eq!(json::encode_ascii(&data), format!("{{\"n\":{expected}}}"));
        }
    }

    #[test]
    fn appends_keep_the_stored_list_and_add_every_item_in_order(
        stored in prop::collection::vec(json_value(), 0..5),
        batches in prop::collection::vec(prop::collection::vec(json_value(), 0..4), 1..4),
    ) {
        let mut data = Data::new();
        data.insert("l".into(), Value::Array(stored.clone()));
        let mut expected = stored;
        for items in &batches {
            let v = HeaderValue::from_str(&serde_json::json!({ "l": items }).to_string());
            let Ok(v) = v else { continue };
            let (change, _) = parse_changes(&[(HeaderName::from_static("x-session-append"), v)], "x-session", &data).unwrap();
            data = apply(&data, &change);
            expected.extend(items.iter().cloned());
        }
        prop_assert_eq!(&data["l"], &Value::Array(expected));
    }
}
