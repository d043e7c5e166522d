//! Everyday-odd and hostile input, from outside (docs/HEADERS.md): header spellings, bytes a
//! header may not carry, non-ASCII cookies, a double-clicked login, an app clashing with the
//! session cookie, idle users, upgrades the sidecar cannot vouch for.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use hyper::Request;
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every header name that CGI/WSGI/PHP would read as one of the sidecar's.
fn ours_as_cgi_reads(name: &str) -> bool {
    let n = name.to_ascii_lowercase().replace('_', "-");
    n == "x-session" || n.starts_with("x-session-")
}

/// Starts a session holding `data` (JSON; DEL is sent escaped, as a header value must carry it)
/// and returns the cookie value.
async fn login(s: &Sidecar, b: &reqwest::Client, data: &str) -> String {
    let data = data.replace('\u{7f}', "\\u007f");
    let r = s
        .get(b, "/login")
        .reply(&[("X-Session-Set", &data)])
        .send()
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(set_cookies(&r).len(), 1, "a session was started");
    cookie_value(&set_cookies(&r)[0])
}

#[tokio::test]
async fn underscore_spellings_from_the_client_never_reach_the_app() {
    let s = sidecar("").await;
    let b = browser();
    login(&s, &b, r#"{"user":"ann"}"#).await;
    let seen = s
        .get(&b, "/")
        .header("X_Session", r#"{"user":"admin"}"#)
        .header("x_session_set", r#"{"role":"root"}"#)
        .header("X-Session_Status", "new")
        .header("x-session_expiry_age", "999999")
        .header("X_SESSION_ID", "0".repeat(64))
        .seen()
        .await;
    for (name, values) in &seen.headers {
        if ours_as_cgi_reads(name) {
            assert!(
                ["x-session", "x-session-status", "x-session-expiry-age"].contains(&name.as_str()),
                "a spoofed {name} reached the app: {values:?}"
            );
            assert_eq!(values.len(), 1, "{name}: {values:?}");
        }
    }
    assert_eq!(seen.session(), json!({"user": "ann"}));
    assert_eq!(seen.status(), "existing");
}

#[tokio::test]
async fn underscore_spellings_from_the_app_are_stripped_and_never_applied() {
    let s = sidecar("").await;
    let b = browser();
    let key = login(&s, &b, r#"{"user":"ann"}"#).await;
    let r = s
        .get(&b, "/")
        .reply(&[
            ("X_Session_Flush", "1"),
            ("x_session", r#"{"user":"mallory"}"#),
            ("X-Session_Set", r#"{"role":"root"}"#),
            ("x-session-set", r#"{"ok":1}"#),
        ])
        .send()
        .await;
    assert_eq!(r.status(), 200);
    for name in r.headers().keys() {
        assert!(
            !ours_as_cgi_reads(name.as_str()),
            "{name} reached the browser"
        );
    }
    for c in set_cookies(&r) {
        assert_eq!(cookie_value(&c), key, "no flush, no cycle happened: {c}");
    }
    let seen = s.get(&b, "/").seen().await;
    assert_eq!(seen.session(), json!({"user": "ann", "ok": 1}));
}

#[tokio::test]
async fn a_value_holding_del_or_any_control_character_round_trips() {
    let s = sidecar("").await;
    let b = browser();
    let nasty: String = (0u32..0x80)
        .chain([0xe9, 0x2028, 0xfeff, 0x1f600])
        .filter_map(char::from_u32)
        .collect();
    let data = json!({"pasted": nasty, "del": "a\u{7f}b"});
    login(&s, &b, &data.to_string()).await;
    for _ in 0..2 {
        let seen = s.get(&b, "/").seen().await;
        assert_eq!(seen.status(), "existing");
        assert_eq!(seen.session(), data);
        assert!(seen.header("x-session").unwrap().is_ascii());
    }
    let r = s
        .get(&b, "/logout")
        .reply(&[("X-Session-Flush", "1")])
        .send()
        .await;
    assert_eq!(r.status(), 200, "logout works");
    assert!(set_cookies(&r)[0].contains("Max-Age=0"));
}

/// An app that records the raw bytes of each request's `Cookie` headers, then echoes.
async fn cookie_recorder() -> (std::net::SocketAddr, Arc<Mutex<Vec<Vec<Vec<u8>>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = start_app(move |req: Request<Incoming>| {
        let log = log.clone();
        async move {
            let cookies = req
                .headers()
                .get_all("cookie")
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect();
            log.lock().unwrap().push(cookies);
            echo(req).await
        }
    })
    .await;
    (app, seen)
}

#[tokio::test]
async fn non_ascii_cookie_bytes_leave_the_session_found_and_the_others_byte_for_byte() {
    let (app, cookies) = cookie_recorder().await;
    let s = sidecar_for(app, "").await;
    let r = s
        .get(&plain(), "/")
        .reply(&[("X-Session-Set", r#"{"n":1}"#)])
        .send()
        .await;
    let value = cookie_value(&set_cookies(&r)[0]);
    let mut request = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\nCookie: theme=\xc3\xa9t\xc3\xa9; sessionid=".to_vec();
    request.extend_from_slice(value.as_bytes());
    request.extend_from_slice(b"; raw=\xff\xfe\x80; last=\"q\"\r\n\r\n");
    let answer = raw_exchange(s.addr, &request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["headers"]["x-session-status"][0], "existing");
    assert_eq!(body["headers"]["x-session"][0], r#"{"n":1}"#);
    let last = cookies.lock().unwrap().last().unwrap().clone();
    assert_eq!(
        last,
        vec![b"theme=\xc3\xa9t\xc3\xa9; raw=\xff\xfe\x80; last=\"q\"".to_vec()],
        "the other cookies pass byte for byte, the session key does not"
    );
}

#[tokio::test]
async fn several_cookie_headers_reach_the_upstream_as_one() {
    let (app, cookies) = cookie_recorder().await;
    let s = sidecar_for(app, "").await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for client in [plain(), h2] {
        let r = s
            .get(&client, "/")
            .cookie("a=1")
            .cookie("b=2; sessionid=junk")
            .cookie("c=3")
            .send()
            .await;
        assert_eq!(r.status(), 200);
        let last = cookies.lock().unwrap().last().unwrap().clone();
        assert_eq!(last, vec![b"a=1; b=2; c=3".to_vec()]);
        let r = s.get(&client, "/").cookie("a=1").cookie("c=3").send().await;
        assert_eq!(r.status(), 200);
        let last = cookies.lock().unwrap().last().unwrap().clone();
        assert_eq!(last, vec![b"a=1; c=3".to_vec()]);
    }
}

#[tokio::test]
async fn a_double_clicked_login_leaves_one_working_session_holding_both_changes() {
    let (app, gate) = gated_app().await;
    let s = sidecar_for(app, "").await;
    for first_released in ["a", "b"] {
        let b = browser();
        login(&s, &b, r#"{"cart":3}"#).await;
        let old = s.get(&b, "/").seen().await;
        assert_eq!(old.status(), "existing");
        let click = |key: &str| {
            let visit = s.get(&b, &format!("/gate/login/{key}")).reply(&[
                ("X-Session-Cycle", "1"),
                ("X-Session-Set", &format!(r#"{{"{key}":1}}"#)),
            ]);
            tokio::spawn(visit.send())
        };
        let one = click(first_released);
        gate.wait_arrival().await;
        let two = click(if first_released == "a" { "b" } else { "a" });
        gate.wait_arrival().await;
        gate.open(1);
        let r1 = one.await.unwrap();
        gate.open(1);
        let r2 = two.await.unwrap();
        assert_eq!((r1.status().as_u16(), r2.status().as_u16()), (200, 200));
        let cookies = set_cookies(&r1).len() + set_cookies(&r2).len();
        assert_eq!(
            cookies, 1,
            "one response renames the session, the other lands in it"
        );
        let now = s.get(&b, "/").seen().await;
        assert_eq!(now.status(), "existing", "the user is still logged in");
        assert_eq!(now.session(), json!({"cart": 3, "a": 1, "b": 1}));
    }
}

#[tokio::test]
async fn the_apps_set_cookie_for_the_session_name_is_dropped() {
    let s = sidecar("").await;
    let b = browser();
    login(&s, &b, r#"{"user":"ann"}"#).await;
    let r = s
        .get(&b, "/")
        .reply(&[
            ("Set-Cookie", "sessionid=; Max-Age=0; Path=/"),
            ("Set-Cookie", "theme=dark; Path=/"),
            ("Set-Cookie", " sessionid =evil"),
        ])
        .send()
        .await;
    let set: Vec<_> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(set, vec!["theme=dark; Path=/".to_string()]);
    let seen = s.get(&b, "/").seen().await;
    assert_eq!(seen.status(), "existing");
    assert_eq!(seen.session(), json!({"user": "ann"}));
}

#[tokio::test]
async fn no_op_changes_and_error_answers_count_as_activity_for_the_idle_timeout() {
    let s = sidecar("[expiry]\nidle_timeout = 100").await;
    let b = browser();
    login(&s, &b, r#"{"user":"ann"}"#).await;
    let answers: [&[(&str, &str)]; 4] = [
        &[("X-Session-Delete", r#"["flash"]"#)],
        &[("X-Session-Set", r#"{"user":"ann"}"#)],
        &[("X-Session", r#"{"user":"ann"}"#)],
        &[("X-Session-Set", r#"{"x":1}"#), ("x-test-ignored", "1")],
    ];
    for step in 0..8 {
        s.clock.advance(Duration::from_secs(60));
        let visit = s.get(&b, "/page");
        let visit = if step % 4 == 3 {
            visit.header("x-test-status", "500")
        } else {
            visit.reply(answers[step % 4])
        };
        let r = visit.send().await;
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["headers"]["x-session-status"][0], "existing",
            "step {step}: 60 s after the last request the user was logged out"
        );
    }
    s.clock.advance(Duration::from_secs(101));
    let seen = s.get(&b, "/").seen().await;
    assert_eq!(seen.status(), "new", "idle beyond the timeout does expire");
}

#[tokio::test]
async fn an_h2c_upgrade_goes_up_as_a_plain_request() {
    let s = sidecar("").await;
    let answer = raw_exchange(
        s.addr,
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nX_Session: {\"user\":\"admin\"}\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let headers = body["headers"].as_object().unwrap();
    for gone in ["upgrade", "http2-settings", "x_session"] {
        assert!(
            !headers.contains_key(gone),
            "{gone} reached the app: {body}"
        );
    }
    assert_eq!(body["headers"]["x-session"][0], "{}");
    // Mixed lists are refused whole: the sidecar cannot vouch for the h2c part.
    let answer = raw_exchange(
        s.addr,
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, close\r\nUpgrade: websocket, h2c\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("\"upgrade\""),
        "{answer}"
    );
}

#[tokio::test]
async fn a_431_to_a_cookie_carrying_request_varies_on_cookie() {
    let s = sidecar("max_headers = 10").await;
    let mut visit = s
        .get(&plain(), "/")
        .cookie(format!("sessionid={}", "a".repeat(64)));
    // Over the configured 10, under the HTTP layer's own limit: the sidecar itself answers.
    for i in 0..12 {
        visit = visit.header(format!("x-filler-{i}"), "1");
    }
    let r = visit.send().await;
    assert_eq!(r.status(), 431);
    assert!(r.headers().get_all("vary").iter().any(|v| v == "Cookie"));
    assert!(set_cookies(&r).is_empty());
}

#[tokio::test]
async fn untrusted_forwarded_and_x_real_ip_are_removed() {
    for (trust, kept) in [("false", false), ("true", true)] {
        let s = sidecar(&format!("trust_forwarded = {trust}")).await;
        let seen = s
            .get(&plain(), "/")
            .header("forwarded", "for=203.0.113.9;proto=https")
            .header("x-real-ip", "203.0.113.9")
            .seen()
            .await;
        assert_eq!(seen.header("forwarded").is_some(), kept, "trust {trust}");
        assert_eq!(seen.header("x-real-ip").is_some(), kept, "trust {trust}");
    }
}

#[tokio::test]
async fn a_502_body_carries_no_library_internals() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = sidecar_for(closed, "").await;
    let broken_app = raw_upstream(b"NOT HTTP AT ALL\r\n\r\n".to_vec()).await;
    let broken = sidecar_for(broken_app, "").await;
    for (s, expected) in [
        (&down, "the application is unreachable\n"),
        (
            &broken,
            "the application's answer was broken (not HTTP, too large, or cut off)\n",
        ),
    ] {
        let r = s.get(&plain(), "/").send().await;
        assert_eq!(r.status(), 502);
        assert_eq!(r.text().await.unwrap(), expected);
    }
}

/// A request with a `Content-Length` body written a few bytes at a time, `pause` apart.
async fn trickle(addr: std::net::SocketAddr, len: usize, sent: usize, pause: Duration) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..sent {
        tokio::time::sleep(pause).await;
        if stream.write_all(b"x").await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_slow_upload_is_not_blamed_on_the_app() {
    let s = sidecar("upstream_timeout = 1").await;
    // 2.5 s of upload against a 1 s timeout: the app answers at once once it has the body.
    let answer = trickle(s.addr, 5, 5, Duration::from_millis(500)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"body_len\":5"), "{answer}");
}

#[tokio::test]
async fn a_stalled_upload_is_the_clients_timeout_not_the_apps() {
    let s = sidecar("upstream_timeout = 1").await;
    let answer = trickle(s.addr, 10, 1, Duration::from_millis(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request body stalled"), "{answer}");
}

#[tokio::test]
async fn an_idle_h2c_connection_gives_its_slot_back() {
    let s = sidecar("max_connections = 1\nidle_connection_timeout = 1").await;
    let mut h2 = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    // The HTTP/2 preface and an empty SETTINGS frame, then nothing.
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), h2.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the idle h2c connection was never closed");
    let r = s.get(&plain(), "/").send().await;
    assert_eq!(r.status(), 200, "the slot is free again");
}
