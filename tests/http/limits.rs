//! `[limits]`: at most N sessions per subject (a login ends the subject's oldest others), and at
//! most N new sessions per client address per minute (429 with Retry-After beyond).

use crate::common::*;

/// A login of `subject` from a fresh client: its cookie header.
async fn login(s: &Sidecar, subject: &str) -> String {
    let r = s
        .get(&plain(), "/login")
        .incr("n")
        .reply(&[("X-Session-Subject", subject)])
        .send()
        .await;
    assert_eq!(r.status(), 200);
    format!("sessionid={}", cookie_value(&set_cookies(&r)[0]))
}

async fn status(s: &Sidecar, cookie: &str) -> String {
    let r = s.get(&plain(), "/").cookie(cookie).send().await;
    seen(r).await.status().to_string()
}

#[tokio::test]
async fn a_login_beyond_max_sessions_per_subject_ends_the_oldest_others() {
    let s = sidecar("[limits]\nmax_sessions_per_subject = 2").await;
    let first = login(&s, "alice").await;
    s.clock.advance(std::time::Duration::from_secs(1));
    let second = login(&s, "alice").await;
    s.clock.advance(std::time::Duration::from_secs(1));
    let bob = login(&s, "bob").await;
    assert_eq!(status(&s, &first).await, "existing", "two allowed");
    s.clock.advance(std::time::Duration::from_secs(1));
    let third = login(&s, "alice").await;
    assert_eq!(status(&s, &first).await, "new", "the oldest ended");
    assert_eq!(status(&s, &second).await, "existing");
    assert_eq!(status(&s, &third).await, "existing");
    assert_eq!(
        status(&s, &bob).await,
        "existing",
        "another subject untouched"
    );
    // Tagging an existing session (login after browsing) counts the same way.
    let r = s.get(&plain(), "/").incr("n").send().await;
    let browsing = format!("sessionid={}", cookie_value(&set_cookies(&r)[0]));
    s.clock.advance(std::time::Duration::from_secs(1));
    let r = s
        .get(&plain(), "/login")
        .cookie(&browsing)
        .reply(&[("X-Session-Subject", "alice")])
        .send()
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        status(&s, &browsing).await,
        "existing",
        "the one just tagged stays"
    );
    assert_eq!(status(&s, &second).await, "new");
    assert_eq!(status(&s, &third).await, "existing");
}

#[tokio::test]
async fn one_login_at_a_time() {
    let s = sidecar("[limits]\nmax_sessions_per_subject = 1").await;
    let laptop = login(&s, "admin").await;
    let phone = login(&s, "admin").await;
    assert_eq!(status(&s, &laptop).await, "new");
    assert_eq!(status(&s, &phone).await, "existing");
    // Without the limit, both stay.
    let s = sidecar("").await;
    let laptop = login(&s, "admin").await;
    let _phone = login(&s, "admin").await;
    assert_eq!(status(&s, &laptop).await, "existing");
}

#[tokio::test]
async fn new_sessions_per_minute_per_client_address_then_429_with_retry_after() {
    let s = sidecar("trust_forwarded = true\n[limits]\nnew_sessions_per_minute = 3").await;
    let create = async |addr: &str| {
        s.get(&plain(), "/")
            .header("x-forwarded-for", addr)
            .incr("n")
            .send()
            .await
    };
    let mut cookies = Vec::new();
    for _ in 0..3 {
        let r = create("203.0.113.9").await;
        assert_eq!(r.status(), 200);
        cookies.push(format!("sessionid={}", cookie_value(&set_cookies(&r)[0])));
    }
    let r = create("203.0.113.9").await;
    assert_eq!(r.status(), 429);
    assert!(set_cookies(&r).is_empty(), "no session, no cookie");
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&wait), "one more every 20 s: {wait}");
    assert!(r.text().await.unwrap().contains("too many new sessions"));
    // What creates nothing passes, and the address's existing sessions go on.
    let r = s
        .get(&plain(), "/")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await;
    assert_eq!(r.status(), 200);
    let r = s
        .get(&plain(), "/")
        .header("x-forwarded-for", "203.0.113.9")
        .cookie(&cookies[0])
        .incr("n")
        .send()
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(seen(r).await.session()["n"], 1);
    // Another address has its own allowance; a client's own earlier entries do not count.
    assert_eq!(create("6.6.6.6, 203.0.113.10").await.status(), 200);
    // Untrusted, X-Forwarded-For is the client's claim: the peer's address counts.
    let s = sidecar("[limits]\nnew_sessions_per_minute = 1").await;
    let r = s
        .get(&plain(), "/")
        .header("x-forwarded-for", "198.51.100.1")
        .incr("n")
        .send()
        .await;
    assert_eq!(r.status(), 200);
    let r = s
        .get(&plain(), "/")
        .header("x-forwarded-for", "198.51.100.2")
        .incr("n")
        .send()
        .await;
    assert_eq!(r.status(), 429, "same peer, whatever it claims");
}
