//! docs/HEADERS.md §2, the app API beyond Django's words, over real HTTP, on sled, on one Redis
//! server (through two sidecars) and on a Redis Cluster: `X-Session-Incr` and
//! `X-Session-Append` (concurrent requests of one browser each add to the latest stored value:
//! none is lost), and `X-Session-Revoke` (a subject's other sessions, or all of them, end).

mod common;

use common::*;
use futures_util::future::join_all;
use serde_json::{Value, json};

/// One request of `client` through `s`, the app answering with `reply`; the status and what
/// the app saw.
async fn ask(client: &reqwest::Client, s: &Sidecar, reply: &[(&str, &str)]) -> (u16, String) {
    let r = client
        .get(s.url("/"))
        .header("x-test-reply", reply_pairs(reply))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn reply_pairs(pairs: &[(&str, &str)]) -> String {
    serde_json::to_string(pairs).unwrap()
}

/// The session as the app receives it now: the raw `X-Session` text.
async fn session_text(client: &reqwest::Client, s: &Sidecar) -> String {
    let (status, body) = ask(client, s, &[]).await;
    assert_eq!(status, 200, "{body}");
    let seen: Seen = serde_json::from_str(&body).unwrap();
    seen.header("x-session").unwrap().to_string()
}

async fn session(client: &reqwest::Client, s: &Sidecar) -> Value {
    serde_json::from_str(&session_text(client, s).await).unwrap()
}

/// Every clause of Incr and Append, against the store behind `s`.
async fn holds_the_atomic_operations(s: &Sidecar) {
    let client = browser();
    // A visitor without a session: an increment starts one (a missing key counts as 0).
    let (status, body) = ask(
        &client,
        s,
        &[("X-Session-Incr", r#"{"visits": 1, "credits": -5}"#)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        session(&client, s).await,
        json!({"visits": 1, "credits": -5})
    );

    // Twenty concurrent increments of one browser: +20, none lost.
    let counted =
        join_all((0..20).map(|_| ask(&client, s, &[("X-Session-Incr", r#"{"visits": 1}"#)]))).await;
    assert!(counted.iter().all(|(st, _)| *st == 200), "{counted:?}");
    assert_eq!(session(&client, s).await["visits"], json!(21));

    // Integers of any size stay exact.
    for _ in 0..2 {
        let (st, body) = ask(
            &client,
            s,
            &[("X-Session-Incr", r#"{"big": 12345678901234567890123}"#)],
        )
        .await;
        assert_eq!(st, 200, "{body}");
    }
    let text = session_text(&client, s).await;
    assert!(text.contains(r#""big":24691357802469135780246"#), "{text}");

    // Two tabs appending to one cart at once: every item is kept.
    let tab = |item: &'static str| {
        let client = &client;
        async move {
            ask(
                client,
                s,
                &[("X-Session-Append", &format!(r#"{{"cart": ["{item}"]}}"#))],
            )
            .await
        }
    };
    let added = join_all((0..10).flat_map(|_| [tab("pen"), tab("ink")])).await;
    assert!(added.iter().all(|(st, _)| *st == 200), "{added:?}");
    let cart = session(&client, s).await["cart"].clone();
    let items = cart.as_array().unwrap();
    assert_eq!(items.len(), 20, "{cart}");
    assert_eq!(items.iter().filter(|i| *i == "pen").count(), 10, "{cart}");

    // What does not fit the stored value, or is no integer or list at all, is bad upstream
    // input: 502 naming the header, and the session exactly as it was.
    let before = session_text(&client, s).await;
    for (header, value, says) in [
        ("X-Session-Incr", r#"{"cart": 1}"#, "not an integer"),
        ("X-Session-Append", r#"{"visits": ["x"]}"#, "not a list"),
        ("X-Session-Incr", r#"{"visits": 1.0}"#, "integers"),
        ("X-Session-Incr", r#"{"visits": 1e3}"#, "integers"),
        ("X-Session-Incr", r#"{"visits": "1"}"#, "integers"),
        ("X-Session-Append", r#"{"cart": "pen"}"#, "lists"),
        ("X-Session-Incr", "[1]", "object"),
        ("X-Session-Append", r#"{"cart": ["#, "malformed"),
    ] {
        let (st, body) = ask(
            &client,
            s,
            &[(header, value), ("X-Session-Set", r#"{"also": 1}"#)],
        )
        .await;
        assert_eq!(st, 502, "{header}: {value} -> {body}");
        assert!(
            body.contains(header) && body.contains(says),
            "{header}: {value} -> {body}"
        );
        assert_eq!(session_text(&client, s).await, before, "{header}: {value}");
    }
    // A list that would pass max_session_bytes is refused like any oversize change.
    let huge = format!(r#"{{"cart": ["{}"]}}"#, "x".repeat(9000));
    let (st, body) = ask(&client, s, &[("X-Session-Append", &huge)]).await;
    assert_eq!(st, 502, "{body}");
    assert!(
        body.contains("X-Session-Append") && body.contains("max_session_bytes"),
        "{body}"
    );
    assert_eq!(session_text(&client, s).await, before);

    // Set, Incr and Append in one answer apply in the order the names first appear.
    let (st, body) = ask(
        &client,
        s,
        &[
            ("X-Session-Set", r#"{"n": 10, "l": []}"#),
            ("X-Session-Incr", r#"{"n": 5}"#),
            ("X-Session-Append", r#"{"l": [1, 2]}"#),
        ],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let now = session(&client, s).await;
    assert_eq!(
        (now["n"].clone(), now["l"].clone()),
        (json!(15), json!([1, 2]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_and_appends_are_atomic_on_sled() {
    let s = sidecar("").await;
    holds_the_atomic_operations(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_and_appends_are_atomic_on_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let app = start_app(echo).await;
    let s = sidecar_for(app, &server.store_toml("api:")).await;
    holds_the_atomic_operations(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_and_appends_are_atomic_on_a_redis_cluster() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let app = start_app(echo).await;
    let s = sidecar_for(app, &cluster.store_toml("api:")).await;
    holds_the_atomic_operations(&s).await;
}

/// Two sidecars on one Redis: increments through both land on the same latest value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_through_two_sidecars_on_one_redis_all_count() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let app = start_app(echo).await;
    let store = server.store_toml("api2:");
    let (a, b) = (
        sidecar_for(app, &store).await,
        sidecar_for(app, &store).await,
    );
    let client = browser();
    let (st, _) = ask(&client, &a, &[("X-Session-Incr", r#"{"n": 1}"#)]).await;
    assert_eq!(st, 200);
    // The cookie a set is sent to b too: both listen on 127.0.0.1, and cookies ignore ports.
    let incr = [("X-Session-Incr", r#"{"n": 1}"#)];
    let both =
        join_all((0..10).flat_map(|_| [ask(&client, &a, &incr), ask(&client, &b, &incr)])).await;
    assert!(both.iter().all(|(st, _)| *st == 200), "{both:?}");
    assert_eq!(session(&client, &b).await["n"], json!(21));
}

/// The `[identity]` table the revoke tests' sidecars run with.
const IDENTITY: &str = "[identity]\nheader = \"X-WEBAUTH-USER\"\n";

/// `X-Session-Subject` in the app's answer: logs `client` in as `who` on `s`.
async fn log_in(client: &reqwest::Client, s: &Sidecar, who: &str) {
    let user = format!(r#"{{"user": "{who}"}}"#);
    let (st, body) = ask(
        client,
        s,
        &[("X-Session-Subject", who), ("X-Session-Set", &user)],
    )
    .await;
    assert_eq!(st, 200, "{body}");
}

/// `new` or `existing`, as the app sees the browser's next request.
async fn status(client: &reqwest::Client, s: &Sidecar) -> String {
    let (st, body) = ask(client, s, &[]).await;
    assert_eq!(st, 200, "{body}");
    let seen: Seen = serde_json::from_str(&body).unwrap();
    seen.status().to_string()
}

/// The revocations counted by `s`'s metrics.
async fn revoked_metric(s: &Sidecar) -> u64 {
    let text = plain()
        .get(format!("http://{}/metrics", s.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("session_sidecar_sessions_revoked_total "))
        .unwrap_or_else(|| panic!("no revoked counter in {text}"))
        .parse()
        .unwrap()
}

/// Every clause of `X-Session-Revoke`, with browsers going through `a` and `b` (the same
/// sidecar, or two sharing a store).
async fn holds_revoke(a: &Sidecar, b: &Sidecar) {
    let counted = revoked_metric(a).await;
    let (phone, laptop, tablet, bob) = (browser(), browser(), browser(), browser());
    log_in(&phone, a, "alice").await;
    log_in(&laptop, b, "alice").await;
    log_in(&tablet, a, "alice").await;
    log_in(&bob, b, "bob").await;
    // Each browser's app sees its own subject, whichever sidecar it goes through, and in the
    // `[identity]` header too, whatever the browser forges.
    for (client, via, who) in [
        (&phone, a, "alice"),
        (&laptop, b, "alice"),
        (&bob, a, "bob"),
    ] {
        let seen = via
            .get(client, "/")
            .header("X-WEBAUTH-USER", "root")
            .seen()
            .await;
        assert_eq!(seen.header("x-session-subject"), Some(who));
        assert_eq!(seen.header("x-webauth-user"), Some(who));
    }

    // After a password change: the phone keeps its session (under a new key), alice's others end,
    // bob's does not.
    let (st, body) = ask(
        &phone,
        a,
        &[("X-Session-Cycle", "1"), ("X-Session-Revoke", "others")],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(status(&phone, a).await, "existing");
    assert_eq!(session(&phone, a).await, json!({"user": "alice"}));
    assert_eq!(status(&laptop, b).await, "new");
    assert_eq!(status(&tablet, a).await, "new");
    assert_eq!(status(&bob, b).await, "existing");
    assert_eq!(revoked_metric(a).await, counted + 2);

    // "Log out everywhere": every session of alice, this one too, as a flush: its cookie goes.
    log_in(&laptop, b, "alice").await;
    let r = phone
        .get(a.url("/"))
        .header("x-test-reply", reply_pairs(&[("X-Session-Revoke", "all")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookies = set_cookies(&r);
    assert!(
        cookies.len() == 1 && cookies[0].contains("Max-Age=0"),
        "{cookies:?}"
    );
    assert_eq!(status(&phone, a).await, "new");
    assert_eq!(status(&laptop, b).await, "new");
    assert_eq!(status(&bob, b).await, "existing");

    // With a flash message: the data starts a fresh session, as with a flush, and the other
    // sessions of the subject the session had end.
    log_in(&phone, a, "alice").await;
    log_in(&laptop, b, "alice").await;
    let (st, body) = ask(
        &phone,
        a,
        &[
            ("X-Session-Revoke", "ALL"),
            ("X-Session-Set", r#"{"flash": "logged out everywhere"}"#),
        ],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        session(&phone, a).await,
        json!({"flash": "logged out everywhere"})
    );
    assert_eq!(status(&laptop, b).await, "new");

    // The answer names the subject (an untagged session logging out "carol" everywhere, or one
    // that also sends `X-Session-Flush`): carol's sessions end, and the fresh session holding
    // the flash is untagged, as after any logout.
    for flush in [false, true] {
        let (carol, guest) = (browser(), browser());
        log_in(&carol, b, "carol").await;
        let (st, _) = ask(&guest, a, &[("X-Session-Set", r#"{"n": 1}"#)]).await;
        assert_eq!(st, 200);
        let mut reply = vec![
            ("X-Session-Subject", "carol"),
            ("X-Session-Revoke", "all"),
            ("X-Session-Set", r#"{"flash": "bye"}"#),
        ];
        if flush {
            reply.push(("X-Session-Flush", "1"));
        }
        let (st, body) = ask(&guest, a, &reply).await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(status(&carol, b).await, "new", "flush: {flush}");
        let seen = a.get(&guest, "/").seen().await;
        assert_eq!(seen.session(), json!({"flash": "bye"}), "flush: {flush}");
        assert_eq!(seen.header("x-session-subject"), None, "flush: {flush}");
    }

    // A session without a subject has no others: nothing ends.
    let guest = browser();
    let (st, _) = ask(&guest, a, &[("X-Session-Set", r#"{"cart": []}"#)]).await;
    assert_eq!(st, 200);
    let before = revoked_metric(a).await;
    let (st, body) = ask(&guest, a, &[("X-Session-Revoke", "others")]).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(status(&guest, a).await, "existing");
    assert_eq!(status(&bob, b).await, "existing");
    assert_eq!(revoked_metric(a).await, before);

    // A value that is neither: bad upstream input, nothing happens.
    log_in(&laptop, b, "bob").await;
    let (st, body) = ask(&bob, b, &[("X-Session-Revoke", "everyone")]).await;
    assert_eq!(st, 502, "{body}");
    assert!(
        body.contains("X-Session-Revoke") && body.contains("others or all"),
        "{body}"
    );
    assert_eq!(status(&laptop, b).await, "existing");
    assert_eq!(status(&bob, b).await, "existing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_ends_the_subjects_other_sessions_on_sled() {
    let s = sidecar(IDENTITY).await;
    holds_revoke(&s, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_ends_the_subjects_sessions_through_every_sidecar_on_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let app = start_app(echo).await;
    let store = format!("{IDENTITY}{}", server.store_toml("revoke:"));
    let (a, b) = (
        sidecar_for(app, &store).await,
        sidecar_for(app, &store).await,
    );
    holds_revoke(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_ends_the_subjects_sessions_on_a_redis_cluster() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let app = start_app(echo).await;
    let store = format!("{IDENTITY}{}", cluster.store_toml("revoke:"));
    let (a, b) = (
        sidecar_for(app, &store).await,
        sidecar_for(app, &store).await,
    );
    holds_revoke(&a, &b).await;
}

/// `X-Session-Subject` reaches the app with the session's subject, and with `[identity]` the
/// app's own user header carries it too; no client spelling of either gets through, on a skip
/// path neither.
#[tokio::test]
async fn the_subject_reaches_the_app_and_the_identity_header_carries_it() {
    let s = sidecar("skip_paths = [\"/static/\"]\n[identity]\nheader = \"X-WEBAUTH-USER\"").await;
    let client = browser();
    let forged = [
        ("X-WEBAUTH-USER", "admin"),
        ("X_Webauth_User", "admin"),
        ("x-session-subject", "admin"),
        ("X_SESSION_SUBJECT", "admin"),
    ];
    let users = |seen: &Seen| {
        (
            seen.headers.get("x-webauth-user").cloned(),
            seen.headers.get("x-session-subject").cloned(),
        )
    };
    let first = s.get(&client, "/").headers(&forged).seen().await;
    assert_eq!(users(&first), (None, None), "{:?}", first.headers);
    assert!(!first.headers.contains_key("x_webauth_user"));

    s.get(&client, "/")
        .reply(&[
            ("X-Session-Subject", "alice"),
            ("X-Session-Set", r#"{"u": 1}"#),
        ])
        .send()
        .await;
    let seen = s.get(&client, "/").headers(&forged).seen().await;
    let alice = Some(vec!["alice".to_string()]);
    assert_eq!(users(&seen), (alice.clone(), alice), "{:?}", seen.headers);
    // The subject is not part of the data.
    assert_eq!(seen.session(), json!({"u": 1}));

    let skipped = s
        .get(&client, "/static/app.css")
        .headers(&forged)
        .seen()
        .await;
    assert_eq!(users(&skipped), (None, None), "{:?}", skipped.headers);

    // Untagged: neither header.
    s.get(&client, "/")
        .reply(&[("X-Session-Subject", "")])
        .send()
        .await;
    let seen = s.get(&client, "/").headers(&forged).seen().await;
    assert_eq!(users(&seen), (None, None), "{:?}", seen.headers);
}

/// Without `[identity]`, the subject still reaches the app as `X-Session-Subject`, and a
/// client's own `X-WEBAUTH-USER` is the app's business (passed on).
#[tokio::test]
async fn without_identity_only_the_session_header_carries_the_subject() {
    let s = sidecar("").await;
    let client = browser();
    s.get(&client, "/")
        .reply(&[
            ("X-Session-Subject", "bob"),
            ("X-Session-Set", r#"{"u": 1}"#),
        ])
        .send()
        .await;
    let seen = s
        .get(&client, "/")
        .header("X-WEBAUTH-USER", "someone")
        .seen()
        .await;
    assert_eq!(seen.header("x-session-subject"), Some("bob"));
    assert_eq!(seen.header("x-webauth-user"), Some("someone"));
}
