//! docs/HEADERS.md §3: what the browser sees — the cookie, its attributes and signature, stale cookies,
//! `Vary: Cookie`.

use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn the_session_cookie_is_not_forwarded_but_other_cookies_are() {
    let s = sidecar("").await;
    let resp = s.get(&plain(), "/").incr("n").send().await;
    let key = cookie_value(&set_cookies(&resp)[0]);
    let cookies = format!("theme=dark; sessionid={key}; lang=en");
    let seen = s.get(&plain(), "/").cookie(cookies).seen().await;
    assert_eq!(seen.status(), "existing");
    let cookie = seen.header("cookie").unwrap_or("");
    assert!(!cookie.contains("sessionid"), "{cookie}");
    assert_eq!(cookie, "theme=dark; lang=en");
}

#[tokio::test]
async fn the_cookie_has_the_configured_attributes_and_a_long_random_key() {
    let s = sidecar("[cookie]\nname = \"sessionid\"\npath = \"/app\"\ndomain = \"127.0.0.1\"\nsecure = false\nsame_site = \"Strict\"").await;
    let resp = s.get(&plain(), "/app").incr("n").send().await;
    let c = set_cookies(&resp).pop().expect("a cookie");
    for part in [
        "Path=/app",
        "Domain=127.0.0.1",
        "HttpOnly",
        "SameSite=Strict",
        "Max-Age=1209600",
        "Expires=",
    ] {
        assert!(c.contains(part), "{part} in {c}");
    }
    let key = cookie_value(&c);
    assert!(
        key.len() >= 32 && key.bytes().all(|b| b.is_ascii_hexdigit()),
        "{key}"
    );
    assert_eq!(resp.headers().get("vary").unwrap(), "Cookie");
}

#[tokio::test]
async fn echoing_the_session_unchanged_writes_nothing_and_sets_no_cookie() {
    let s = sidecar("").await;
    let b = browser();
    s.get(&b, "/").incr("n").send().await;
    let resp = s.get(&b, "/").header("x-test-full-set", "{}").send().await;
    assert!(set_cookies(&resp).is_empty());
    assert_eq!(
        resp.headers().get("vary").unwrap(),
        "Cookie",
        "request carried the cookie"
    );
}

#[tokio::test]
async fn emptying_the_session_deletes_record_and_cookie() {
    let s = sidecar("").await;
    let b = browser();
    s.get(&b, "/").incr("n").send().await;
    let r = [("X-Session-Delete", r#"["n"]"#)];
    let resp = s.get(&b, "/").reply(&r).send().await;
    let c = set_cookies(&resp).pop().expect("removal cookie");
    assert!(c.contains("Max-Age=0") && c.contains("Path=/"), "{c}");
    let seen = s.get(&b, "/").seen().await;
    assert_eq!(seen.status(), "new");
}

#[tokio::test]
async fn unknown_malformed_and_forged_cookies_are_never_adopted() {
    let s = sidecar("").await;
    for cookie in [
        "sessionid=garbage",
        &format!("sessionid={}", "a".repeat(64)),
        "sessionid=",
    ] {
        let resp = s.get(&plain(), "/").cookie(cookie).send().await;
        let removal = set_cookies(&resp);
        assert!(removal[0].contains("Max-Age=0"), "{cookie}: {removal:?}");
        assert_eq!(resp.headers().get("vary").unwrap(), "Cookie");
        assert_eq!(seen(resp).await.status(), "new");
    }
    // Data stored on an unknown cookie goes to a fresh random key.
    let forged = "b".repeat(64);
    let resp = s
        .get(&plain(), "/")
        .cookie(format!("sessionid={forged}"))
        .incr("n")
        .send()
        .await;
    let key = cookie_value(&set_cookies(&resp)[0]);
    assert_ne!(key, forged);
}

#[tokio::test]
async fn signed_cookies_verify_rotate_and_reject_forgeries() {
    let app = start_app(echo).await;
    let old_secret = "[security]\nsecret_key = \"the old secret, thirty-two bytes long\"";
    let s = sidecar_for(app, old_secret).await;
    let resp = s.get(&plain(), "/").incr("n").send().await;
    let signed = cookie_value(&set_cookies(&resp)[0]);
    assert!(signed.len() > 64, "signature prepended: {signed}");
    // The raw key alone is a forgery.
    let raw = &signed[signed.len() - 64..];
    let resp = s
        .get(&plain(), "/")
        .cookie(format!("sessionid={raw}"))
        .send()
        .await;
    assert_eq!(seen(resp).await.status(), "new");
    let (_, dir) = s.stop().await;
    let dir = dir.unwrap();
    // Rotate: the new secret signs, the old one still verifies.
    let rotated = "[security]\nsecret_key = \"a brand new secret of thirty-two bytes\"\nsecret_key_fallbacks = [\"the old secret, thirty-two bytes long\"]";
    let s2 = sidecar_at(app, rotated, dir.path()).await;
    let resp = s2
        .get(&plain(), "/")
        .cookie(format!("sessionid={signed}"))
        .incr("n")
        .send()
        .await;
    let resigned = cookie_value(&set_cookies(&resp)[0]);
    assert_ne!(resigned, signed, "re-signed with the new secret");
    let seen2 = seen(resp).await;
    assert_eq!(seen2.status(), "existing");
    assert_eq!(seen2.session(), json!({"n": 1}));
}

#[tokio::test]
async fn vary_cookie_is_added_whatever_the_status() {
    let s = sidecar("").await;
    let b = browser();
    s.get(&b, "/").incr("n").send().await;
    for status in ["200", "404", "302", "500"] {
        let resp = s.get(&b, "/").header("x-test-status", status).send().await;
        assert_eq!(resp.headers().get("vary").unwrap(), "Cookie", "{status}");
    }
}

#[tokio::test]
async fn the_upstreams_own_set_cookie_passes_and_ours_is_appended() {
    let s = sidecar("").await;
    let r = [
        ("Set-Cookie", "theme=dark; Path=/"),
        ("X-Session-Set", r#"{"a":1}"#),
    ];
    let resp = s.get(&plain(), "/").reply(&r).send().await;
    let all: Vec<_> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], "theme=dark; Path=/");
    assert!(all[1].starts_with("sessionid="));
}

/// `__Host-` name, `Partitioned`: every cookie the sidecar sets or deletes keeps the promises the
/// prefix makes (a deletion too, or browsers ignore it and the session stays), and the sidecar
/// recognises the cookie under that name.
#[tokio::test]
async fn a_host_prefixed_partitioned_cookie_carries_what_browsers_require_set_and_deleted() {
    let s = sidecar(
        "[cookie]\nname = \"__Host-sid\"\nsecure = true\nsame_site = \"None\"\npartitioned = true",
    )
    .await;
    let resp = s.get(&plain(), "/").incr("n").send().await;
    let ours = |resp: &reqwest::Response| -> Option<String> {
        resp.headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .find(|c| c.starts_with("__Host-sid="))
    };
    let set = ours(&resp).expect("a cookie");
    let removal_needs = ["Secure", "Path=/", "Partitioned", "SameSite=None"];
    assert!(set.starts_with("__Host-sid="), "{set}");
    for part in removal_needs {
        assert!(set.contains(part), "{part} in {set}");
    }
    assert!(!set.contains("Domain"), "{set}");
    let cookie = format!("__Host-sid={}", cookie_value(&set));
    let again = s.get(&plain(), "/").cookie(&cookie).incr("n").send().await;
    assert_eq!(seen(again).await.session()["n"], 1, "the cookie is ours");
    let out = s
        .get(&plain(), "/logout")
        .cookie(&cookie)
        .reply(&[("X-Session-Flush", "1")])
        .send()
        .await;
    let gone = ours(&out).expect("removal cookie");
    assert!(
        gone.starts_with("__Host-sid=") && gone.contains("Max-Age=0"),
        "{gone}"
    );
    for part in removal_needs {
        assert!(gone.contains(part), "{part} in {gone}");
    }
    assert!(!gone.contains("Domain"), "{gone}");
}
