//! docs/HEADERS.md §8: the admin listener — health, readiness, metrics, sessions by key, subjects, and
//! the token rules — against a real running sidecar.

use crate::common::*;
use serde_json::{Value, json};

fn admin_url(s: &Sidecar, path: &str) -> String {
    format!("http://{}{}", s.admin, path)
}

/// A GET of `path` on the admin listener, with no cookies.
fn admin_get(s: &Sidecar, path: &str) -> Visit {
    get(&plain(), admin_url(s, path))
}

#[tokio::test]
async fn health_and_readiness() {
    let s = sidecar("").await;
    assert_eq!(admin_get(&s, "/healthz").send().await.status(), 200);
    assert_eq!(admin_get(&s, "/readyz").send().await.status(), 200);
    s.faulty
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = admin_get(&s, "/readyz").send().await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        admin_get(&s, "/healthz").send().await.status(),
        200,
        "alive while the store is not"
    );
}

#[tokio::test]
async fn metrics_move_as_traffic_flows() {
    let s = sidecar("").await;
    let before = admin_get(&s, "/metrics").text().await;
    assert!(
        before.contains("session_sidecar_open_connections"),
        "{before}"
    );
    let b = browser();
    s.get(&b, "/").incr("n").send().await;
    s.get(&b, "/").incr("n").send().await;
    s.get(&b, "/")
        .reply(&[("X-Session-Set", "{bad")])
        .send()
        .await;
    let text = admin_get(&s, "/metrics").text().await;
    for line in [
        "session_sidecar_requests_total{class=\"2xx\"} 2",
        "session_sidecar_requests_total{class=\"5xx\"} 1",
        "session_sidecar_sessions_created_total 1",
        "session_sidecar_merges_total 1",
        "session_sidecar_refusals_total{status=\"502\"} 1",
        "session_sidecar_bad_upstream_headers_total{header=\"X-Session-Set\"} 1",
        "session_sidecar_request_duration_seconds_count 3",
        "session_sidecar_upstream_duration_seconds_count 3",
        "session_sidecar_store_operations_total{op=\"create\",result=\"ok\"} 1",
    ] {
        assert!(text.contains(line), "missing {line} in:\n{text}");
    }
    assert!(
        text.contains("session_sidecar_store_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn a_session_can_be_shown_and_ended_by_key_or_cookie_value() {
    let s = sidecar("[security]\nsecret_key = \"admin test secret, long enough for hmac\"").await;
    let b = browser();
    let r = s
        .get(&b, "/")
        .reply(&[
            ("X-Session-Set", r#"{"user":"ann"}"#),
            ("X-Session-Subject", "ann"),
        ])
        .send()
        .await;
    let cookie = cookie_value(&set_cookies(&r)[0]);
    let keys: Value = admin_get(&s, "/subjects/ann")
        .send()
        .await
        .json()
        .await
        .unwrap();
    // The signed cookie value ends with the raw key; no admin answer may contain it.
    let raw_key = cookie[cookie.len() - 64..].to_string();
    assert!(!keys.to_string().contains(&raw_key), "{keys}");
    let key = keys["sessions"][0]["handle"].as_str().unwrap().to_string();
    assert_eq!(key.len(), 16, "{keys}");
    assert_eq!(keys["sessions"][0]["subject"], json!("ann"));
    for id in [&key, &cookie, &raw_key] {
        let body = admin_get(&s, &format!("/sessions/{id}")).text().await;
        assert!(!body.contains(&raw_key), "the key leaked: {body}");
        let shown: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(shown["handle"], json!(key));
        assert_eq!(shown["data"], json!({"user": "ann"}));
        // By handle the store cannot name the subject (it keeps it only for the key's holder):
        // it says the session has one.
        let subject = if id == &key {
            json!(null)
        } else {
            json!("ann")
        };
        assert_eq!(shown["subject"], subject, "{id}");
        assert_eq!(shown["tagged"], json!(true));
        for field in ["created", "last_activity", "expires"] {
            assert!(
                shown[field].as_str().unwrap().contains('T'),
                "{field}: {shown}"
            );
        }
    }
    assert_eq!(
        admin_get(&s, &format!("/sessions/{}", "0".repeat(64)))
            .send()
            .await
            .status(),
        404
    );
    let del = plain()
        .delete(admin_url(&s, &format!("/sessions/{key}")))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    assert_eq!(
        plain()
            .delete(admin_url(&s, &format!("/sessions/{key}")))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(s.get(&b, "/").seen().await.status(), "new");
}

#[tokio::test]
async fn revoking_a_subject_ends_all_of_its_sessions() {
    let s = sidecar("").await;
    let browsers: Vec<_> = (0..3).map(|_| browser()).collect();
    for b in &browsers {
        s.get(b, "/login")
            .reply(&[
                ("X-Session-Set", r#"{"u":1}"#),
                ("X-Session-Subject", "user-9"),
            ])
            .send()
            .await;
    }
    let other = browser();
    s.get(&other, "/login")
        .reply(&[
            ("X-Session-Set", r#"{"u":2}"#),
            ("X-Session-Subject", "user-10"),
        ])
        .send()
        .await;
    let listed: Value = admin_get(&s, "/subjects/user-9")
        .send()
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 3);
    let revoked: Value = plain()
        .delete(admin_url(&s, "/subjects/user-9"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(revoked["revoked"], json!(3));
    for b in &browsers {
        assert_eq!(s.get(b, "/").seen().await.status(), "new");
    }
    assert_eq!(s.get(&other, "/").seen().await.status(), "existing");
}

#[tokio::test]
async fn with_a_token_everything_but_health_needs_it() {
    let s = sidecar("[admin]\nlisten = \"\"\ntoken = \"s3cret-token\"").await;
    assert_eq!(admin_get(&s, "/healthz").send().await.status(), 200);
    assert_eq!(admin_get(&s, "/readyz").send().await.status(), 200);
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("s3cret-token"),
        Some("Bearer s3cret-tokenX"),
    ] {
        let mut req = plain().get(admin_url(&s, "/metrics"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        assert_eq!(r.text().await.unwrap(), "unauthorized\n", "nothing leaked");
    }
    let r = admin_get(&s, "/subjects/x").send().await;
    assert_eq!(r.status(), 401);
    let ok = admin_get(&s, "/metrics")
        .header("authorization", "Bearer s3cret-token")
        .send()
        .await;
    assert_eq!(ok.status(), 200);
}
