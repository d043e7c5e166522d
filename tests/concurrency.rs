//! docs/HEADERS.md §4: per-key atomic merge, cycle forwarding, no resurrection.

mod common;

use common::*;
use serde_json::{Value, json};

const N: usize = 48;

/// Starts a session, then sends N overlapping requests on it, request `i` carrying the header
/// `header(i)` that makes the app store key `k{i}`; returns the session afterwards.
async fn n_overlapping_writes(header: impl Fn(usize) -> (&'static str, String)) -> Value {
    let s = sidecar("").await;
    let b = browser();
    b.get(s.url("/"))
        .header(
            "x-test-reply",
            reply(&[("X-Session-Set", r#"{"start":0}"#)]),
        )
        .send()
        .await
        .unwrap();
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (name, value) = header(i);
            let req = b
                .get(s.url("/"))
                .header("x-test-delay-ms", "50")
                .header(name, value);
            tokio::spawn(async move {
                assert_eq!(req.send().await.unwrap().status(), 200);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    seen(b.get(s.url("/")).send().await.unwrap())
        .await
        .session()
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
    b.get(s.url("/"))
        .header("x-test-incr", "warmup")
        .send()
        .await
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let b = b.clone();
            let url = s.url("/");
            tokio::spawn(async move {
                for _ in 0..10 {
                    let r = b
                        .get(&url)
                        .header("x-test-incr", format!("c{i}"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let data = seen(b.get(s.url("/")).send().await.unwrap())
        .await
        .session();
    for i in 0..8 {
        assert_eq!(data[format!("c{i}")], json!(10), "{data}");
    }
}

#[tokio::test]
async fn a_request_in_flight_during_a_cycle_lands_in_the_renamed_session() {
    let (app, gate) = gated_app().await;
    let s = sidecar_for(app, "").await;
    let resp = plain()
        .get(s.url("/"))
        .header("x-test-incr", "n")
        .send()
        .await
        .unwrap();
    let old = cookie_value(&set_cookies(&resp)[0]);
    let old_cookie = format!("sessionid={old}");

    let slow = {
        let (url, c) = (s.url("/gate"), old_cookie.clone());
        tokio::spawn(async move {
            plain()
                .get(url)
                .header("cookie", c)
                .header(
                    "x-test-reply",
                    reply(&[("X-Session-Set", r#"{"late":true}"#)]),
                )
                .send()
                .await
                .unwrap()
        })
    };
    gate.wait_arrival().await;
    let login = plain()
        .get(s.url("/login"))
        .header("cookie", &old_cookie)
        .header("x-test-reply", reply(&[("X-Session-Cycle", "1")]))
        .send()
        .await
        .unwrap();
    let new = cookie_value(&set_cookies(&login)[0]);
    assert_ne!(new, old);
    // A request that starts with the old key after the cycle is new.
    let after = plain()
        .get(s.url("/"))
        .header("cookie", &old_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(seen(after).await.status(), "new");

    gate.open(1);
    let slow = slow.await.unwrap();
    assert_eq!(slow.status(), 200);
    assert!(
        set_cookies(&slow).is_empty(),
        "the cycle response already gave the new key"
    );
    let data = seen(
        plain()
            .get(s.url("/"))
            .header("cookie", format!("sessionid={new}"))
            .send()
            .await
            .unwrap(),
    )
    .await
    .session();
    assert_eq!(data, json!({"n": 1, "late": true}));
}

#[tokio::test]
async fn a_slow_request_cannot_resurrect_a_session_flushed_meanwhile() {
    let (app, gate) = gated_app().await;
    let s = sidecar_for(app, "").await;
    let resp = plain()
        .get(s.url("/"))
        .header("x-test-incr", "n")
        .send()
        .await
        .unwrap();
    let cookie = format!("sessionid={}", cookie_value(&set_cookies(&resp)[0]));

    let writer = {
        let (url, c) = (s.url("/gate/cart"), cookie.clone());
        tokio::spawn(async move {
            plain()
                .get(url)
                .header("cookie", c)
                .header(
                    "x-test-reply",
                    reply(&[("X-Session-Set", r#"{"cart":[1]}"#)]),
                )
                .send()
                .await
                .unwrap()
        })
    };
    gate.wait_arrival().await;
    let reader = {
        let (url, c) = (s.url("/gate/page"), cookie.clone());
        tokio::spawn(async move { plain().get(url).header("cookie", c).send().await.unwrap() })
    };
    gate.wait_arrival().await;
    let logout = plain()
        .get(s.url("/logout"))
        .header("cookie", &cookie)
        .header("x-test-reply", reply(&[("X-Session-Flush", "1")]))
        .send()
        .await
        .unwrap();
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
    let after = seen(
        plain()
            .get(s.url("/"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(after.status(), "new");
    assert_eq!(after.session(), Value::Object(Default::default()));
}

#[tokio::test]
async fn a_session_that_expires_while_a_request_is_in_flight_is_not_revived() {
    let (app, gate) = gated_app().await;
    let s = sidecar_for(app, "[expiry]\ncookie_age = 100").await;
    let resp = plain()
        .get(s.url("/"))
        .header("x-test-incr", "n")
        .send()
        .await
        .unwrap();
    let cookie = format!("sessionid={}", cookie_value(&set_cookies(&resp)[0]));
    let writer = {
        let (url, c) = (s.url("/gate"), cookie.clone());
        tokio::spawn(async move {
            plain()
                .get(url)
                .header("cookie", c)
                .header("x-test-incr", "n")
                .send()
                .await
                .unwrap()
        })
    };
    gate.wait_arrival().await;
    s.clock.advance(std::time::Duration::from_secs(101));
    gate.open(1);
    let writer = writer.await.unwrap();
    assert_eq!(writer.status(), 400);
    assert!(set_cookies(&writer).is_empty());
    let after = seen(
        plain()
            .get(s.url("/"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(after.status(), "new");
}
