//! docs/HEADERS.md "Retired keys": a key that a login (cycle) or a logout (flush) retired stays
//! known for `retired_grace`. A request that starts with it — the page's own polling request or
//! image, sent before the login's answer reached the browser — is new to the app and its answer
//! carries no session cookie, so it cannot replace the key the browser now holds, whichever
//! answer arrives last. The browser here applies `Set-Cookie` in the order answers arrive.

use std::time::Duration;

use crate::common::*;
use serde_json::json;

/// A browser's cookie jar that applies `Set-Cookie` in the order answers arrive, as browsers do.
#[derive(Default)]
struct Jar(Option<String>);

impl Jar {
    fn apply(&mut self, resp: &reqwest::Response) {
        for c in set_cookies(resp) {
            if c.contains("Max-Age=0") {
                self.0 = None;
            } else {
                self.0 = Some(cookie_value(&c));
            }
        }
    }

    fn cookie(&self) -> String {
        self.0
            .as_ref()
            .map(|k| format!("sessionid={k}"))
            .unwrap_or_default()
    }
}

async fn send(s: &Sidecar, path: &str, cookie: &str, answer: &[(&str, &str)]) -> reqwest::Response {
    let mut visit = s.get(&plain(), path).cookie(cookie);
    if !answer.is_empty() {
        visit = visit.reply(answer);
    }
    visit.send().await
}

async fn metric(s: &Sidecar, name: &str) -> f64 {
    let text = get(&plain(), format!("http://{}/metrics", s.admin))
        .text()
        .await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
}

#[tokio::test]
async fn a_poll_that_left_before_the_login_answer_arrived_does_not_log_the_user_out() {
    let s = sidecar("").await;
    let mut jar = Jar::default();
    let first = send(&s, "/visits", "", &[("X-Session-Set", r#"{"visits":1}"#)]).await;
    jar.apply(&first);
    let k1 = jar.cookie();
    let login = send(
        &s,
        "/login",
        &k1,
        &[("X-Session-Cycle", "1"), ("X-Session-Subject", "ann")],
    )
    .await;
    assert_eq!(login.status(), 200);
    // The poll still carries K1: it left before the login's answer arrived, and its own answer
    // arrives after it. One that only reads, and one whose app stores something for it.
    let read = send(&s, "/poll", &k1, &[]).await;
    let write = send(&s, "/poll", &k1, &[("X-Session-Set", r#"{"polled":1}"#)]).await;
    jar.apply(&login);
    for poll in [read, write] {
        assert!(set_cookies(&poll).is_empty(), "no cookie at all");
        assert_eq!(
            poll.headers().get("vary").map(|v| v.to_str().unwrap()),
            Some("Cookie"),
            "it carried the cookie"
        );
        jar.apply(&poll);
        let seen = seen(poll).await;
        assert_eq!(seen.status(), "new", "never the cycled session");
        assert_eq!(seen.session(), json!({}));
    }
    // Still logged in, and the poll's change was not stored anywhere.
    let after = seen(send(&s, "/", &jar.cookie(), &[]).await).await;
    assert_eq!(after.status(), "existing");
    assert_eq!(after.session(), json!({"visits": 1}));
    assert_eq!(
        metric(&s, "session_sidecar_retired_key_changes_dropped_total").await,
        1.0
    );
    // After the grace, K1 is an unknown key like any other: its stale cookie is deleted.
    s.clock.advance(Duration::from_secs(61));
    let late = send(&s, "/poll", &k1, &[]).await;
    assert!(set_cookies(&late)[0].contains("Max-Age=0"));
}

#[tokio::test]
async fn a_poll_racing_a_logout_with_a_flash_message_keeps_the_flash() {
    let s = sidecar("").await;
    let mut jar = Jar::default();
    jar.apply(&send(&s, "/login", "", &[("X-Session-Set", r#"{"user":"ann"}"#)]).await);
    let k1 = jar.cookie();
    let logout = send(
        &s,
        "/logout",
        &k1,
        &[
            ("X-Session-Flush", "1"),
            ("X-Session-Set", r#"{"flash":"bye"}"#),
        ],
    )
    .await;
    let poll = send(&s, "/poll", &k1, &[("X-Session-Set", r#"{"seen":1}"#)]).await;
    jar.apply(&logout);
    assert!(set_cookies(&poll).is_empty());
    jar.apply(&poll);
    let seen_poll = seen(poll).await;
    assert_eq!(seen_poll.status(), "new");
    assert_eq!(seen_poll.session(), json!({}));
    let after = seen(send(&s, "/", &jar.cookie(), &[]).await).await;
    assert_eq!(after.session(), json!({"flash": "bye"}));
    // A plain logout: the key is retired too, and the browser holds no cookie either way.
    let k2 = jar.cookie();
    let logout = send(&s, "/logout", &k2, &[("X-Session-Flush", "1")]).await;
    jar.apply(&logout);
    assert!(jar.0.is_none());
    let poll = send(&s, "/poll", &k2, &[]).await;
    assert!(set_cookies(&poll).is_empty());
}

#[tokio::test]
async fn a_request_in_flight_during_the_login_still_lands_its_change_in_the_new_session() {
    let (app, gate) = gated_app().await;
    let s = sidecar_for(app, "").await;
    let mut jar = Jar::default();
    jar.apply(&send(&s, "/", "", &[("X-Session-Set", r#"{"n":1}"#)]).await);
    let k1 = jar.cookie();
    let slow = s
        .get(&plain(), "/gate")
        .cookie(&k1)
        .reply(&[("X-Session-Set", r#"{"cart":1}"#)]);
    let slow = tokio::spawn(slow.send());
    gate.wait_arrival().await;
    jar.apply(&send(&s, "/login", &k1, &[("X-Session-Cycle", "1")]).await);
    gate.open(1);
    let slow = slow.await.unwrap();
    assert_eq!(slow.status(), 200);
    assert!(set_cookies(&slow).is_empty());
    jar.apply(&slow);
    let after = seen(send(&s, "/", &jar.cookie(), &[]).await).await;
    assert_eq!(after.session(), json!({"n": 1, "cart": 1}));
}

#[tokio::test]
async fn with_retired_grace_off_a_retired_key_is_an_unknown_one_at_once() {
    let s = sidecar("[expiry]\nretired_grace = 0").await;
    let mut jar = Jar::default();
    jar.apply(&send(&s, "/", "", &[("X-Session-Set", r#"{"n":1}"#)]).await);
    let k1 = jar.cookie();
    jar.apply(&send(&s, "/login", &k1, &[("X-Session-Cycle", "1")]).await);
    let poll = send(&s, "/poll", &k1, &[]).await;
    assert!(set_cookies(&poll)[0].contains("Max-Age=0"));
    let poll = send(&s, "/poll", &k1, &[("X-Session-Set", r#"{"m":1}"#)]).await;
    let fresh = cookie_value(&set_cookies(&poll)[0]);
    assert_ne!(format!("sessionid={fresh}"), jar.cookie());
}

#[tokio::test]
async fn sessions_ended_otherwise_are_not_retired_keys() {
    let s = sidecar("").await;
    let mut jar = Jar::default();
    jar.apply(
        &send(
            &s,
            "/",
            "",
            &[
                ("X-Session-Set", r#"{"n":1}"#),
                ("X-Session-Subject", "bob"),
            ],
        )
        .await,
    );
    let k1 = jar.cookie();
    // Revoked by the operator ("log out everywhere"): the next request deletes the cookie.
    let revoked = plain()
        .delete(format!("http://{}/subjects/bob", s.admin))
        .send()
        .await
        .unwrap();
    assert!(revoked.status().is_success());
    let next = send(&s, "/", &k1, &[]).await;
    assert!(set_cookies(&next)[0].contains("Max-Age=0"));
    // Expired: the same.
    jar.apply(&send(&s, "/", "", &[("X-Session-Set", r#"{"n":1}"#)]).await);
    s.clock.advance(Duration::from_secs(1_209_601));
    let next = send(&s, "/", &jar.cookie(), &[]).await;
    assert!(set_cookies(&next)[0].contains("Max-Age=0"));
}
