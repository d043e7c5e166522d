//! docs/HEADERS.md §1–§2: what the upstream receives and what it may send back; the session's life
//! through set, delete, flush, cycle and subject.

use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn a_new_visitor_gets_an_empty_session_and_no_cookie() {
    let s = sidecar("").await;
    let resp = s.get(&browser(), "/").send().await;
    assert!(set_cookies(&resp).is_empty());
    assert!(resp.headers().get("vary").is_none());
    let seen = seen(resp).await;
    assert_eq!(seen.header("x-session"), Some("{}"));
    assert_eq!(seen.status(), "new");
    assert_eq!(seen.header("x-session-expiry-age"), Some("1209600"));
    assert!(seen.header("x-session-id").is_none());
    assert_eq!(
        s.store.sweep(i64::MAX).await.unwrap().sessions,
        0,
        "no record written"
    );
}

#[tokio::test]
async fn the_visit_counter_counts_across_requests() {
    let s = sidecar("").await;
    let b = browser();
    for n in 1..=3 {
        let seen = s.get(&b, "/").incr("visits").seen().await;
        assert_eq!(
            seen.session(),
            if n == 1 {
                json!({})
            } else {
                json!({"visits": n - 1})
            }
        );
        assert_eq!(seen.status(), if n == 1 { "new" } else { "existing" });
    }
}

#[tokio::test]
async fn the_session_header_is_ascii_only_json() {
    let s = sidecar("").await;
    let b = browser();
    let set = [("X-Session-Set", r#"{"name":"Zoë 😀"}"#)];
    s.get(&b, "/").reply(&set).send().await;
    let raw = s.get(&b, "/").seen().await;
    let header = raw.header("x-session").unwrap();
    assert!(header.is_ascii());
    assert_eq!(header, r#"{"name":"Zo\u00eb \ud83d\ude00"}"#);
    assert_eq!(raw.session(), json!({"name": "Zoë 😀"}));
}

#[tokio::test]
async fn client_session_headers_are_stripped_and_cannot_spoof() {
    let s = sidecar("expose_id = true").await;
    let seen = s
        .get(&plain(), "/")
        .header("X-Session", r#"{"admin":true}"#)
        .header("X-Session-Status", "existing")
        .header("x-session-id", "abc")
        .header("X-Session-Foo", "1")
        .header("X-Sessionary", "kept")
        .seen()
        .await;
    assert_eq!(seen.header("x-session"), Some("{}"));
    assert_eq!(seen.status(), "new");
    assert!(seen.header("x-session-id").is_none());
    assert!(seen.header("x-session-foo").is_none());
    assert_eq!(seen.header("x-sessionary"), Some("kept"));
}

#[tokio::test]
async fn expose_id_sends_the_key_upstream() {
    let s = sidecar("expose_id = true").await;
    let b = browser();
    let resp = s.get(&b, "/").incr("n").send().await;
    let key = cookie_value(&set_cookies(&resp)[0]);
    let seen = s.get(&b, "/").seen().await;
    assert_eq!(seen.header("x-session-id"), Some(key.as_str()));
}

#[tokio::test]
async fn session_response_headers_are_stripped_and_unknown_ones_ignored() {
    let s = sidecar("").await;
    let r = [
        ("X-Session-Set", r#"{"a":1}"#),
        ("X-Session-Foo", "bar"),
        ("X-Other", "kept"),
    ];
    let resp = s.get(&browser(), "/").reply(&r).send().await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()
            .keys()
            .all(|k| !k.as_str().starts_with("x-session"))
    );
    assert_eq!(resp.headers().get("x-other").unwrap(), "kept");
    assert_eq!(set_cookies(&resp).len(), 1);
}

#[tokio::test]
async fn a_custom_prefix_owns_exactly_its_names() {
    let s = sidecar("header_prefix = \"X-Sess\"").await;
    let b = browser();
    let r = [
        ("X-Sess-Set", r#"{"a":1}"#),
        ("X-Session-Set", r#"{"b":2}"#),
    ];
    let resp = s.get(&b, "/").reply(&r).send().await;
    assert!(resp.headers().get("x-sess-set").is_none());
    assert_eq!(
        resp.headers().get("x-session-set").unwrap(),
        r#"{"b":2}"#,
        "not ours: passes"
    );
    let seen = s.get(&b, "/").seen().await;
    assert_eq!(seen.header("x-sess"), Some(r#"{"a":1}"#));
    assert_eq!(seen.header("x-sess-status"), Some("existing"));
}

#[tokio::test]
async fn set_delete_and_full_session_apply_in_order() {
    let s = sidecar("").await;
    let b = browser();
    let r = [("X-Session-Set", r#"{"a":1,"b":2,"c":3}"#)];
    s.get(&b, "/").reply(&r).send().await;
    let r = [
        ("X-Session", r#"{"a":10,"b":2,"c":3,"d":4}"#),
        ("X-Session-Delete", r#"["c","missing"]"#),
    ];
    s.get(&b, "/").reply(&r).send().await;
    let seen = s.get(&b, "/").seen().await;
    assert_eq!(seen.session(), json!({"a": 10, "b": 2, "d": 4}));
}

#[tokio::test]
async fn flush_logs_out_and_can_start_a_fresh_session_with_a_new_key() {
    let s = sidecar("").await;
    let b = browser();
    let resp = s
        .get(&b, "/")
        .reply(&[("X-Session-Set", r#"{"user":"ann"}"#)])
        .send()
        .await;
    let old = cookie_value(&set_cookies(&resp)[0]);
    // Plain logout: record and cookie go.
    let resp = s
        .get(&b, "/logout")
        .reply(&[("X-Session-Flush", "true")])
        .send()
        .await;
    assert!(set_cookies(&resp)[0].contains("Max-Age=0"));
    assert_eq!(s.get(&b, "/").seen().await.status(), "new");
    // Logout with a flash message: a fresh session under a new key; the old key is dead.
    s.get(&b, "/")
        .reply(&[("X-Session-Set", r#"{"user":"ann"}"#)])
        .send()
        .await;
    let r = [
        ("X-Session", r#"{"flash":"bye"}"#),
        ("X-Session-Flush", "1"),
    ];
    let resp = s.get(&b, "/logout").reply(&r).send().await;
    let new = cookie_value(&set_cookies(&resp)[0]);
    assert_ne!(new, old);
    let seen2 = s.get(&b, "/").seen().await;
    assert_eq!(seen2.session(), json!({"flash": "bye"}));
    let stale = s
        .get(&plain(), "/")
        .cookie(format!("sessionid={old}"))
        .send()
        .await;
    assert_eq!(seen(stale).await.status(), "new");
}

#[tokio::test]
async fn flush_and_cycle_accept_only_their_documented_values() {
    let s = sidecar("").await;
    let b = browser();
    s.get(&b, "/").incr("n").send().await;
    let resp = s
        .get(&b, "/")
        .reply(&[("X-Session-Flush", "FALSE"), ("X-Session-Cycle", "0")])
        .send()
        .await;
    assert!(set_cookies(&resp).is_empty(), "no-ops");
    let resp = s
        .get(&b, "/")
        .reply(&[("X-Session-Cycle", "yes")])
        .send()
        .await;
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("X-Session-Cycle"));
}

#[tokio::test]
async fn cycle_keeps_the_data_under_a_new_key_and_kills_the_old_one() {
    let s = sidecar("").await;
    let b = browser();
    let resp = s.get(&b, "/").incr("n").send().await;
    let old = cookie_value(&set_cookies(&resp)[0]);
    let resp = s
        .get(&b, "/login")
        .reply(&[("X-Session-Cycle", "1"), ("X-Session-Set", r#"{"user":7}"#)])
        .send()
        .await;
    let new = cookie_value(&set_cookies(&resp)[0]);
    assert_ne!(old, new);
    let seen_new = s.get(&b, "/").seen().await;
    assert_eq!(seen_new.session(), json!({"n": 1, "user": 7}));
    let stale = s
        .get(&plain(), "/")
        .cookie(format!("sessionid={old}"))
        .send()
        .await;
    // Within retired_grace the old key is new to the app and its answer leaves the browser's
    // cookie alone (retired.rs); after it, the stale cookie is deleted as any unknown one.
    assert!(set_cookies(&stale).is_empty(), "retired: no cookie");
    assert_eq!(seen(stale).await.status(), "new");
    s.clock.advance(std::time::Duration::from_secs(61));
    let stale = s
        .get(&plain(), "/")
        .cookie(format!("sessionid={old}"))
        .send()
        .await;
    let stale_cookie = set_cookies(&stale);
    assert_eq!(seen(stale).await.status(), "new");
    assert!(
        stale_cookie[0].contains("Max-Age=0"),
        "stale cookie deleted"
    );
}

#[tokio::test]
async fn bad_change_headers_are_a_502_naming_the_header_and_keep_the_session() {
    let s = sidecar("").await;
    let b = browser();
    s.get(&b, "/")
        .reply(&[("X-Session-Set", r#"{"keep":1}"#)])
        .send()
        .await;
    for (name, value) in [
        ("X-Session-Set", "{oops"),
        ("X-Session", "[1,2]"),
        ("X-Session-Delete", "\"a\""),
        ("X-Session-Expiry", "next week"),
        ("X-Session-Flush", "maybe"),
        ("X-Session-Subject", "has space"),
    ] {
        let r = [("X-Session-Set", r#"{"lost":1}"#), (name, value)];
        let resp = s.get(&b, "/").reply(&r).send().await;
        assert_eq!(resp.status(), 502, "{name}: {value}");
        assert!(set_cookies(&resp).is_empty());
        assert!(
            resp.headers()
                .get("content-type")
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        let text = resp.text().await.unwrap();
        assert!(text.contains(name), "{text}");
    }
    let seen = s.get(&b, "/").seen().await;
    assert_eq!(seen.session(), json!({"keep": 1}));
}

#[tokio::test]
async fn a_session_over_the_size_cap_is_refused_with_502() {
    let s = sidecar("max_session_bytes = 100").await;
    let b = browser();
    s.get(&b, "/")
        .reply(&[("X-Session-Set", r#"{"keep":1}"#)])
        .send()
        .await;
    // 30 two-byte characters: 60 bytes of UTF-8 but 180 once escaped, as the header carries it.
    let big = format!(r#"{{"big":"{}"}}"#, "é".repeat(30));
    let resp = s
        .get(&b, "/")
        .reply(&[("X-Session-Set", &big)])
        .send()
        .await;
    assert_eq!(resp.status(), 502);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("max_session_bytes") && text.contains("X-Session-Set"),
        "{text}"
    );
    let kept = s.get(&b, "/").seen().await;
    assert_eq!(kept.session(), json!({"keep": 1}));
    // A logout whose fresh session would be over the cap keeps the old session.
    let r = [("X-Session-Flush", "1"), ("X-Session-Set", &big)];
    let resp = s.get(&b, "/").reply(&r).send().await;
    assert_eq!(resp.status(), 502);
    let after = s.get(&b, "/").seen().await;
    assert_eq!(after.session(), json!({"keep": 1}));
    // A new visitor over the cap gets no session either.
    let resp = s
        .get(&plain(), "/")
        .reply(&[("X-Session-Set", &big)])
        .send()
        .await;
    assert_eq!(resp.status(), 502);
}

#[tokio::test]
async fn a_5xx_from_the_upstream_applies_nothing_and_passes_through() {
    let s = sidecar("").await;
    let b = browser();
    s.get(&b, "/").incr("n").send().await;
    for r in [
        [("X-Session-Set", r#"{"n":99}"#)],
        [("X-Session-Flush", "1")],
        [("X-Session-Cycle", "1")],
        [("X-Session-Set", "{garbage")],
    ] {
        let resp = s
            .get(&b, "/")
            .reply(&r)
            .header("x-test-status", "503")
            .send()
            .await;
        assert_eq!(resp.status(), 503);
        assert!(set_cookies(&resp).is_empty());
        assert!(
            resp.headers()
                .keys()
                .all(|k| !k.as_str().starts_with("x-session"))
        );
        assert_eq!(resp.headers().get("vary").unwrap(), "Cookie");
    }
    assert_eq!(s.get(&b, "/").seen().await.session(), json!({"n": 1}));
}

#[tokio::test]
async fn subject_tags_a_session_and_survives_a_cycle_but_not_a_flush() {
    let s = sidecar("").await;
    let b = browser();
    s.get(&b, "/login")
        .reply(&[
            ("X-Session-Set", r#"{"u":1}"#),
            ("X-Session-Subject", "user-42"),
        ])
        .send()
        .await;
    let now = s.now();
    assert_eq!(subject_handles(&s.store, "user-42", now).await.len(), 1);
    let seen1 = s.get(&b, "/").seen().await;
    assert_eq!(
        seen1.session(),
        json!({"u": 1}),
        "the subject is not part of the data"
    );
    let resp = s
        .get(&b, "/")
        .reply(&[("X-Session-Cycle", "1")])
        .send()
        .await;
    let key = cookie_value(&set_cookies(&resp)[0]);
    assert_eq!(
        subject_handles(&s.store, "user-42", now).await,
        vec![session_sidecar::session::id::handle(&key)]
    );
    s.get(&b, "/")
        .reply(&[
            ("X-Session-Flush", "1"),
            ("X-Session-Set", r#"{"flash":1}"#),
        ])
        .send()
        .await;
    assert!(subject_handles(&s.store, "user-42", now).await.is_empty());
}

#[tokio::test]
async fn a_failing_store_answers_503_and_never_a_fresh_session() {
    let s = sidecar("").await;
    let b = browser();
    s.get(&b, "/").incr("n").send().await;
    s.faulty
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let resp = s.get(&b, "/").incr("n").send().await;
    assert_eq!(resp.status(), 503);
    assert!(set_cookies(&resp).is_empty());
    assert!(resp.text().await.unwrap().contains("session store"));
    let resp = s.get(&plain(), "/").incr("n").send().await;
    assert_eq!(resp.status(), 503, "a new visitor's write fails closed too");
    s.faulty
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let seen = s.get(&b, "/").seen().await;
    assert_eq!(seen.session(), json!({"n": 1}), "the session was kept");
}
