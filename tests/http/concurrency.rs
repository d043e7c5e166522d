//! docs/HEADERS.md §4: per-key atomic merge, cycle forwarding, no resurrection.

use crate::common::*;
use serde_json::{Value, json};

const N: usize = 48;

/// Starts a session, then sends N overlapping requests on it, request `i` carrying the header
/// `header(i)` that makes the app store key `k{i}`; returns the session afterwards.
async fn n_overlapping_writes(header: impl Fn(usize) -> (&'static str, String)) -> Value {
    let s = sidecar("").await;
    let b = browser();
    s.get(&b, "/")
        .reply(&[("X-Session-Set", r#"{"start":0}"#)])
        .send()
        .await;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (name, value) = header(i);
            let visit = s
                .get(&b, "/")
                .header("x-test-delay-ms", "50")
                .header(name, value);
            tokio::spawn(async move {
                assert_eq!(visit.send().await.status(), 200);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    s.get(&b, "/").seen().await.session()
}

#[tokio::test]
async fn concurrent_requests_setting_their_own_keys_lose_none() {
    let data = n_overlapping_writes(|i| {
        let set = format!(r#"{{"k{i}":{i}}}"#);
        ("x-test-reply", reply(&[("X-Session-Set", &set)]))
    })
    .await;
    assert_eq!(data.as_object().unwrap().len(), N + 1, "{data}");
    for i in 0..N {
        assert_eq!(data[format!("k{i}")], json!(i));
    }
}

#[tokio::test]
async fn concurrent_full_session_echoes_lose_none() {
    // Each answers the whole dictionary it was sent plus its own key, as a Django-style app
    // that saves the full session would.
    let data = n_overlapping_writes(|i| ("x-test-full-set", format!(r#"{{"k{i}":{i}}}"#))).await;
    assert_eq!(data.as_object().unwrap().len(), N + 1, "{data}");
    for i in 0..N {
        assert_eq!(data[format!("k{i}")], json!(i));
    }
}

#[tokio::test]
async fn concurrent_counters_on_one_session_count_every_increment_of_distinct_keys() {
    let s = sidecar("").await;
    let b = browser();
    s.get(&b, "/").incr("warmup").send().await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let b = b.clone();
            let url = s.url("/");
            tokio::spawn(async move {
                for _ in 0..10 {
                    let r = get(&b, &url).incr(&format!("c{i}")).send().await;
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let data = s.get(&b, "/").seen().await.session();
    for i in 0..8 {
        assert_eq!(data[format!("c{i}")], json!(10), "{data}");
    }
}

#[tokio::test]
async fn a_request_in_flight_during_a_cycle_lands_in_the_renamed_session() {
    let (app, gate) = gated_app().await;
    let s = sidecar_for(app, "").await;
    let resp = s.get(&plain(), "/").incr("n").send().await;
    let old = cookie_value(&set_cookies(&resp)[0]);
    let old_cookie = format!("sessionid={old}");

    let slow = {
        let (url, c) = (s.url("/gate"), old_cookie.clone());
        tokio::spawn(async move {
            get(&plain(), url)
                .cookie(c)
                .reply(&[("X-Session-Set", r#"{"late":true}"#)])
                .send()
                .await
        })
    };
    gate.wait_arrival().await;
    let login = s
        .get(&plain(), "/login")
        .cookie(&old_cookie)
        .reply(&[("X-Session-Cycle", "1")])
        .send()
        .await;
    let new = cookie_value(&set_cookies(&login)[0]);
    assert_ne!(new, old);
    // A request that starts with the old key after the cycle is new.
    let after = s.get(&plain(), "/").cookie(&old_cookie).send().await;
    assert_eq!(seen(after).await.status(), "new");

    gate.open(1);
    let slow = slow.await.unwrap();
    assert_eq!(slow.status(), 200);
    assert!(
        set_cookies(&slow).is_empty(),
        "the cycle response already gave the new key"
    );
    let data = s
        .get(&plain(), "/")
        .cookie(format!("sessionid={new}"))
        .seen()
        .await
        .session();
    assert_eq!(data, json!({"n": 1, "late": true}));
}

#[tokio::test]
async fn a_slow_request_cannot_resurrect_a_session_flushed_meanwhile() {
    let (app, gate) = gated_app().await;
    let s = sidecar_for(app, "").await;
    let resp = s.get(&plain(), "/").incr("n").send().await;
    let cookie = format!("sessionid={}", cookie_value(&set_cookies(&resp)[0]));

    let writer = {
        let (url, c) = (s.url("/gate/cart"), cookie.clone());
        tokio::spawn(async move {
            get(&plain(), url)
                .cookie(c)
                .reply(&[("X-Session-Set", r#"{"cart":[1]}"#)])
                .send()
                .await
        })
    };
    gate.wait_arrival().await;
    let reader = {
        let (url, c) = (s.url("/gate/page"), cookie.clone());
        tokio::spawn(async move { get(&plain(), url).cookie(c).send().await })
    };
    gate.wait_arrival().await;
    let logout = s
        .get(&plain(), "/logout")
        .cookie(&cookie)
        .reply(&[("X-Session-Flush", "1")])
        .send()
        .await;
    assert!(set_cookies(&logout)[0].contains("Max-Age=0"));

    gate.open(2);
    let writer = writer.await.unwrap();
    assert_eq!(writer.status(), 400);
    assert!(set_cookies(&writer).is_empty());
    assert!(writer.text().await.unwrap().contains("session ended"));
    // A request that would store nothing just passes, and drops the stale cookie.
    let reader = reader.await.unwrap();
    assert_eq!(reader.status(), 200);
    assert!(set_cookies(&reader)[0].contains("Max-Age=0"));
    let after = s.get(&plain(), "/").cookie(&cookie).seen().await;
    assert_eq!(after.status(), "new");
    assert_eq!(after.session(), Value::Object(Default::default()));
}

#[tokio::test]
async fn a_session_that_expires_while_a_request_is_in_flight_is_not_revived() {
    let (app, gate) = gated_app().await;
    let s = sidecar_for(app, "[expiry]\ncookie_age = 100").await;
    let resp = s.get(&plain(), "/").incr("n").send().await;
    let cookie = format!("sessionid={}", cookie_value(&set_cookies(&resp)[0]));
    let writer = {
        let (url, c) = (s.url("/gate"), cookie.clone());
        tokio::spawn(async move { get(&plain(), url).cookie(c).incr("n").send().await })
    };
    gate.wait_arrival().await;
    s.clock.advance(std::time::Duration::from_secs(101));
    gate.open(1);
    let writer = writer.await.unwrap();
    assert_eq!(writer.status(), 400);
    assert!(set_cookies(&writer).is_empty());
    let after = s.get(&plain(), "/").cookie(&cookie).seen().await;
    assert_eq!(after.status(), "new");
}
