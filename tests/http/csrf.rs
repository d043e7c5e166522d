//! `[csrf]`: the sidecar refuses forged requests before the app sees them — the origin check
//! (Sec-Fetch-Site, then Origin against the request's host) and the per-session token handed to
//! the app and required back. Real sidecar, real app, requests shaped as browsers send them.

use crate::common::*;
use reqwest::Method;

const ORIGIN_CHECK: &str = "[csrf]\ncheck_origin = true\ntrusted_origins = [\"https://sso.example\"]\nexempt_paths = [\"/hooks/\"]\n";
const TOKEN: &str = "[csrf]\ntoken = true\n";

/// A visitor with a session (n = 1) through `s`: its cookie header.
async fn visitor(s: &Sidecar) -> String {
    let r = s.get(&plain(), "/").incr("n").send().await;
    format!("sessionid={}", cookie_value(&set_cookies(&r)[0]))
}

/// The visitor's count, read with a safe request.
async fn count(s: &Sidecar, cookie: &str) -> i64 {
    let r = s.get(&plain(), "/").cookie(cookie).send().await;
    seen(r).await.session()["n"].as_i64().unwrap_or(0)
}

/// An increment sent with `method` and extra headers; the response.
async fn change(
    s: &Sidecar,
    method: Method,
    cookie: Option<&str>,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut visit = s.request(&plain(), method, "/").incr("n");
    if let Some(c) = cookie {
        visit = visit.cookie(c);
    }
    visit.headers(headers).send().await
}

async fn refused(resp: reqwest::Response, why: &str) {
    assert_eq!(resp.status(), 403);
    assert!(set_cookies(&resp).is_empty(), "no cookie on a refusal");
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    let text = resp.text().await.unwrap();
    assert!(text.contains(why), "{text}");
}

#[tokio::test]
async fn the_origin_check_refuses_cross_site_changes_and_lets_the_site_itself_through() {
    let s = sidecar(ORIGIN_CHECK).await;
    let cookie = visitor(&s).await;
    let host = s.addr.to_string();
    let own = format!("http://{host}");
    // Browsers that send fetch metadata.
    for (site, forged) in [
        ("cross-site", true),
        ("same-site", true),
        ("same-origin", false),
        ("none", false),
    ] {
        let before = count(&s, &cookie).await;
        let resp = change(&s, Method::POST, Some(&cookie), &[("sec-fetch-site", site)]).await;
        if forged {
            refused(resp, "cross-origin request refused (Sec-Fetch-Site").await;
            assert_eq!(count(&s, &cookie).await, before, "{site}: nothing changed");
        } else {
            assert_eq!(resp.status(), 200, "{site}");
            assert_eq!(count(&s, &cookie).await, before + 1, "{site}");
        }
    }
    // Older browsers: Origin only.
    refused(
        change(
            &s,
            Method::POST,
            Some(&cookie),
            &[("origin", "https://evil.example")],
        )
        .await,
        "Origin: https://evil.example",
    )
    .await;
    refused(
        change(&s, Method::POST, Some(&cookie), &[("origin", "null")]).await,
        "Origin: null",
    )
    .await;
    let ok = change(&s, Method::POST, Some(&cookie), &[("origin", &own)]).await;
    assert_eq!(ok.status(), 200, "the request's own origin");
    // A trusted origin, even cross-site.
    let ok = change(
        &s,
        Method::POST,
        Some(&cookie),
        &[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://sso.example"),
        ],
    )
    .await;
    assert_eq!(ok.status(), 200);
    // Every unsafe method is checked; safe ones never are.
    for m in ["PUT", "PATCH", "DELETE", "PROPFIND"] {
        let m = Method::from_bytes(m.as_bytes()).unwrap();
        refused(
            change(
                &s,
                m.clone(),
                Some(&cookie),
                &[("sec-fetch-site", "cross-site")],
            )
            .await,
            "cross-origin",
        )
        .await;
    }
    for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
        let r = change(
            &s,
            m.clone(),
            Some(&cookie),
            &[("sec-fetch-site", "cross-site")],
        )
        .await;
        assert_eq!(r.status(), 200, "{m}");
    }
    // Without our cookie there is no session to ride on: passes (and may start one).
    let r = change(&s, Method::POST, None, &[("sec-fetch-site", "cross-site")]).await;
    assert_eq!(r.status(), 200);
    // Exempt paths (webhooks) are not checked.
    let r = s
        .request(&plain(), Method::POST, "/hooks/payment")
        .cookie(&cookie)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_origin_is_compared_with_the_forwarded_host() {
    let s = sidecar(&format!("trust_forwarded = true\n{ORIGIN_CHECK}")).await;
    let cookie = visitor(&s).await;
    let through_proxy = [
        ("origin", "https://www.shop.example"),
        ("x-forwarded-host", "www.shop.example"),
    ];
    assert_eq!(
        change(&s, Method::POST, Some(&cookie), &through_proxy)
            .await
            .status(),
        200
    );
    refused(
        change(
            &s,
            Method::POST,
            Some(&cookie),
            &[
                ("origin", "https://evil.example"),
                ("x-forwarded-host", "www.shop.example"),
            ],
        )
        .await,
        "cross-origin",
    )
    .await;
    // Not trusted: a client's X-Forwarded-Host is replaced by the request's own host.
    let s = sidecar(ORIGIN_CHECK).await;
    let cookie = visitor(&s).await;
    refused(
        change(&s, Method::POST, Some(&cookie), &through_proxy).await,
        "cross-origin",
    )
    .await;
}

#[tokio::test]
async fn the_token_is_handed_to_the_app_and_required_back_on_unsafe_requests() {
    let s = sidecar(TOKEN).await;
    // The first answer creates the session; the token the app got with it is already valid.
    let first = s.get(&plain(), "/form").incr("n").send().await;
    let cookie = format!("sessionid={}", cookie_value(&set_cookies(&first)[0]));
    let first_token = seen(first)
        .await
        .header("x-session-csrf")
        .unwrap()
        .to_string();
    assert_eq!(first_token.len(), 128);
    let token = async || {
        let r = s.get(&plain(), "/form").cookie(&cookie).send().await;
        seen(r).await.header("x-session-csrf").unwrap().to_string()
    };
    let (t1, t2) = (token().await, token().await);
    assert_ne!(t1, t2, "masked afresh on every request");
    // Missing, wrong, another session's: refused, nothing changed.
    refused(
        change(&s, Method::POST, Some(&cookie), &[]).await,
        "CSRF token missing",
    )
    .await;
    refused(
        change(
            &s,
            Method::POST,
            Some(&cookie),
            &[("x-csrf-token", &"0".repeat(128))],
        )
        .await,
        "CSRF token incorrect",
    )
    .await;
    let other = visitor(&s).await;
    let r = s.get(&plain(), "/").cookie(&other).send().await;
    let others = seen(r).await.header("x-session-csrf").unwrap().to_string();
    refused(
        change(
            &s,
            Method::POST,
            Some(&cookie),
            &[("x-csrf-token", &others)],
        )
        .await,
        "CSRF token incorrect",
    )
    .await;
    assert_eq!(count(&s, &cookie).await, 1);
    // Right, in the header: any of the session's tokens.
    for t in [&first_token, &t1, &t2] {
        let r = change(&s, Method::POST, Some(&cookie), &[("x-csrf-token", t)]).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(count(&s, &cookie).await, 4);
    // A client's own X-Session-Csrf never reaches the app: the sidecar's replaces it.
    let got = s
        .get(&plain(), "/")
        .cookie(&cookie)
        .header("x-session-csrf", "forged")
        .seen()
        .await;
    assert_eq!(got.headers["x-session-csrf"].len(), 1);
    assert_ne!(got.header("x-session-csrf"), Some("forged"));
    // A login cycles the key, and with it the token.
    let r = s
        .get(&plain(), "/login")
        .cookie(&cookie)
        .reply(&[("X-Session-Cycle", "1")])
        .send()
        .await;
    let cycled = format!("sessionid={}", cookie_value(&set_cookies(&r)[0]));
    refused(
        change(&s, Method::POST, Some(&cycled), &[("x-csrf-token", &t1)]).await,
        "CSRF token incorrect",
    )
    .await;
}

#[tokio::test]
async fn the_token_may_come_in_an_urlencoded_form_which_reaches_the_app_unchanged() {
    let s = sidecar(&format!("{TOKEN}max_form_bytes = 4096\n")).await;
    let cookie = visitor(&s).await;
    let r = s.get(&plain(), "/form").cookie(&cookie).send().await;
    let token = seen(r).await.header("x-session-csrf").unwrap().to_string();
    let post = async |body: String, content_type: &str| {
        s.request(&plain(), Method::POST, "/")
            .cookie(&cookie)
            .incr("n")
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
    };
    let form = format!("item=caf%C3%A9+cr%C3%A8me&csrfmiddlewaretoken={token}&qty=2");
    let r = post(form.clone(), "application/x-www-form-urlencoded").await;
    assert_eq!(r.status(), 200);
    let got = seen(r).await;
    assert_eq!(got.body_len, form.len() as u64);
    assert_eq!(got.body_sum, form.bytes().map(u64::from).sum::<u64>());
    assert_eq!(count(&s, &cookie).await, 2);
    refused(
        post(
            "csrfmiddlewaretoken=00&a=1".into(),
            "application/x-www-form-urlencoded",
        )
        .await,
        "incorrect",
    )
    .await;
    refused(
        post("a=1".into(), "application/x-www-form-urlencoded").await,
        "missing",
    )
    .await;
    // Multipart and JSON bodies are not searched: the header is their way.
    refused(
        post(format!("--b\r\nContent-Disposition: form-data; name=\"csrfmiddlewaretoken\"\r\n\r\n{token}\r\n--b--\r\n"), "multipart/form-data; boundary=b").await,
        "missing",
    )
    .await;
    // A form larger than max_form_bytes: 413, nothing forwarded or changed.
    let big = format!("csrfmiddlewaretoken={token}&pad={}", "x".repeat(5000));
    let r = post(big, "application/x-www-form-urlencoded").await;
    assert_eq!(r.status(), 413);
    assert!(set_cookies(&r).is_empty());
    assert_eq!(count(&s, &cookie).await, 2);
}

#[tokio::test]
async fn both_defences_together_and_config_errors_name_the_key() {
    let s = sidecar("[csrf]\ncheck_origin = true\ntoken = true\ntoken_header = \"X-XSRF\"\n").await;
    let cookie = visitor(&s).await;
    let r = s.get(&plain(), "/").cookie(&cookie).send().await;
    let token = seen(r).await.header("x-session-csrf").unwrap().to_string();
    // The origin check first: a cross-site request with the right token is still refused.
    refused(
        change(
            &s,
            Method::POST,
            Some(&cookie),
            &[("sec-fetch-site", "cross-site"), ("x-xsrf", &token)],
        )
        .await,
        "cross-origin",
    )
    .await;
    let r = change(
        &s,
        Method::POST,
        Some(&cookie),
        &[("sec-fetch-site", "same-origin"), ("x-xsrf", &token)],
    )
    .await;
    assert_eq!(r.status(), 200);
    for (toml, key) in [
        (
            "[csrf]\ntrusted_origins = [\"sso.example\"]",
            "csrf.trusted_origins",
        ),
        (
            "[csrf]\ntrusted_origins = [\"https://sso.example/login\"]",
            "csrf.trusted_origins",
        ),
        (
            "[csrf]\ntrusted_origins = [\"ftp://sso.example\"]",
            "csrf.trusted_origins",
        ),
        ("[csrf]\nexempt_paths = [\"hooks\"]", "csrf.exempt_paths"),
        (
            "[csrf]\ntoken = true\ntoken_header = \"bad header\"",
            "csrf.token_header",
        ),
        (
            "[csrf]\ntoken = true\nmax_form_bytes = 0",
            "csrf.max_form_bytes",
        ),
        ("[csrf]\ncheck_orign = true", "check_orign"),
    ] {
        let e = session_sidecar::Config::from_toml(toml)
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{toml}: {e}");
    }
}
