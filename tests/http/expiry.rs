//! docs/HEADERS.md §5: expiry policy, driven by an injected clock instead of waiting.

use std::time::Duration;

use crate::common::*;
use serde_json::json;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn max_age(set_cookie: &str) -> Option<u64> {
    set_cookie
        .split(';')
        .find_map(|p| p.trim().strip_prefix("Max-Age="))
        .map(|v| v.parse().unwrap())
}

#[tokio::test]
async fn a_session_expires_cookie_age_after_its_last_save() {
    let s = sidecar("[expiry]\ncookie_age = 1000").await;
    let b = browser();
    let resp = s.get(&b, "/").incr("n").send().await;
    assert_eq!(max_age(&set_cookies(&resp)[0]), Some(1000));
    s.clock.advance(secs(400));
    let seen1 = s.get(&b, "/").seen().await;
    assert_eq!(seen1.status(), "existing");
    assert_eq!(seen1.header("x-session-expiry-age"), Some("600"));
    s.clock.advance(secs(600));
    let seen2 = s.get(&b, "/").seen().await;
    assert_eq!(seen2.status(), "new", "expired sessions are never loaded");
    assert_eq!(seen2.session(), json!({}));
}

#[tokio::test]
async fn a_save_pushes_the_expiry_out_again() {
    let s = sidecar("[expiry]\ncookie_age = 1000").await;
    let b = browser();
    s.get(&b, "/").incr("n").send().await;
    for _ in 0..3 {
        s.clock.advance(secs(900));
        let resp = s.get(&b, "/").incr("n").send().await;
        assert_eq!(max_age(&set_cookies(&resp)[0]), Some(1000));
    }
    assert_eq!(s.get(&b, "/").seen().await.session(), json!({"n": 4}));
}

#[tokio::test]
async fn expire_at_browser_close_sets_a_cookie_without_max_age() {
    let s = sidecar("[expiry]\nexpire_at_browser_close = true").await;
    let resp = s.get(&browser(), "/").incr("n").send().await;
    let c = &set_cookies(&resp)[0];
    assert!(!c.contains("Max-Age") && !c.contains("Expires"), "{c}");
}

#[tokio::test]
async fn set_expiry_takes_seconds_zero_a_timestamp_and_default() {
    let s = sidecar("[expiry]\ncookie_age = 1000").await;
    let b = browser();
    let exp = |v: &str| {
        s.get(&b, "/")
            .reply(&[("X-Session-Set", r#"{"a":1}"#), ("X-Session-Expiry", v)])
    };
    let resp = exp("60").send().await;
    assert_eq!(max_age(&set_cookies(&resp)[0]), Some(60));
    let resp = exp("0").send().await;
    let c = &set_cookies(&resp)[0];
    assert!(
        !c.contains("Max-Age") && !c.contains("Expires"),
        "browser-close: {c}"
    );
    let at = time::OffsetDateTime::from_unix_timestamp(s.now() / 1000 + 500).unwrap();
    let ts = at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let resp = exp(&ts).send().await;
    let m = max_age(&set_cookies(&resp)[0]).unwrap();
    assert!((499..=500).contains(&m), "{m}");
    let resp = exp("default").send().await;
    assert_eq!(max_age(&set_cookies(&resp)[0]), Some(1000));
    // Seconds mean inactivity after the last save: 60 s later the session is gone.
    exp("60").send().await;
    s.clock.advance(secs(61));
    assert_eq!(s.get(&b, "/").seen().await.status(), "new");
}

#[tokio::test]
async fn an_expiry_in_the_past_ends_the_session() {
    let s = sidecar("").await;
    let b = browser();
    s.get(&b, "/").incr("n").send().await;
    let r = [("X-Session-Expiry", "2001-01-01T00:00:00Z")];
    let resp = s.get(&b, "/").reply(&r).send().await;
    assert!(set_cookies(&resp)[0].contains("Max-Age=0"));
    assert_eq!(s.get(&b, "/").seen().await.status(), "new");
}

#[tokio::test]
async fn save_every_request_refreshes_cookie_and_expiry_on_reads() {
    let s = sidecar("[expiry]\ncookie_age = 1000\nsave_every_request = true").await;
    let b = browser();
    s.get(&b, "/").incr("n").send().await;
    for _ in 0..3 {
        s.clock.advance(secs(900));
        let resp = s.get(&b, "/").send().await;
        assert_eq!(
            max_age(&set_cookies(&resp)[0]),
            Some(1000),
            "cookie refreshed on a read"
        );
        assert_eq!(seen(resp).await.status(), "existing");
    }
    // Still nothing for a visitor without data.
    let resp = s.get(&plain(), "/").send().await;
    assert!(set_cookies(&resp).is_empty());
}

#[tokio::test]
async fn idle_timeout_ends_an_unused_session_without_a_write_per_request() {
    let s = sidecar("[expiry]\ncookie_age = 100000\nidle_timeout = 100").await;
    let b = browser();
    let resp = s.get(&b, "/").incr("n").send().await;
    let key = cookie_value(&set_cookies(&resp)[0]);
    assert_eq!(
        max_age(&set_cookies(&resp)[0]),
        Some(100000),
        "the cookie follows cookie_age"
    );
    let created = s.store.load(&key, s.now()).await.unwrap().unwrap().accessed;
    // Reads within the touch interval (10 s here) write nothing.
    s.clock.advance(secs(5));
    let r = s.get(&b, "/").seen().await;
    assert_eq!(r.header("x-session-expiry-age"), Some("95"));
    assert_eq!(
        s.store.load(&key, s.now()).await.unwrap().unwrap().accessed,
        created
    );
    // Activity keeps it alive past the idle timeout.
    for _ in 0..4 {
        s.clock.advance(secs(60));
        let r = s.get(&b, "/").seen().await;
        assert_eq!(r.status(), "existing");
        assert_eq!(r.header("x-session-expiry-age"), Some("100"));
    }
    s.clock.advance(secs(101));
    assert_eq!(s.get(&b, "/").seen().await.status(), "new");
}

#[tokio::test]
async fn absolute_timeout_ends_a_session_whatever_the_activity() {
    let s = sidecar("[expiry]\nabsolute_timeout = 300").await;
    let b = browser();
    let resp = s.get(&b, "/").incr("n").send().await;
    assert_eq!(max_age(&set_cookies(&resp)[0]), Some(300));
    for _ in 0..2 {
        s.clock.advance(secs(100));
        let resp = s.get(&b, "/").incr("n").send().await;
        assert_eq!(resp.status(), 200);
    }
    s.clock.advance(secs(100));
    assert_eq!(s.get(&b, "/").seen().await.status(), "new");
}

#[tokio::test]
async fn a_new_visitor_is_told_the_smallest_age_in_force() {
    let s =
        sidecar("[expiry]\ncookie_age = 1000\nidle_timeout = 600\nabsolute_timeout = 800").await;
    let r = s.get(&plain(), "/").seen().await;
    assert_eq!(r.header("x-session-expiry-age"), Some("600"));
}

#[tokio::test]
async fn the_sweeper_removes_expired_records_through_the_index() {
    let s = sidecar("[expiry]\ncookie_age = 1000\nsweep_interval = 1").await;
    let mut keys = Vec::new();
    for i in 0..5 {
        let resp = s.get(&plain(), "/").incr("n").send().await;
        keys.push(cookie_value(&set_cookies(&resp)[0]));
        if i == 2 {
            s.clock.advance(secs(500));
        }
    }
    s.clock.advance(secs(600)); // the first three are now expired, the last two are not
    let mut gone = false;
    for _ in 0..100 {
        // The background sweeper runs every second of real time.
        let live = s.store.liveness(&keys[0], i64::MIN, None).await.unwrap();
        if live == session_sidecar::session::testing::Liveness::Ended {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the background sweeper removed the expired record");
    let swept = s.store.sweep(s.now()).await.unwrap();
    assert_eq!(
        swept.sessions, 0,
        "the background sweeper already took all three"
    );
    for k in &keys[3..] {
        assert!(s.store.load(k, s.now()).await.unwrap().is_some());
    }
}
