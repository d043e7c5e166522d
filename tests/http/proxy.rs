//! docs/HEADERS.md §6: transparent proxying — methods, bodies, streaming, hop-by-hop, X-Forwarded-*,
//! WebSocket upgrades, h2c, keep-alive, skip_paths, and 502/504 from the upstream.

use std::time::Duration;

use crate::common::*;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[tokio::test]
async fn method_path_query_body_status_and_headers_pass_unchanged() {
    let s = sidecar("").await;
    let resp = s
        .request(&plain(), reqwest::Method::POST, "/a/b%20c?x=1&y=%C3%A9")
        .header("x-custom", "v1")
        .header("x-test-status", "201")
        .reply(&[("X-Reply", "r1")])
        .body("hello body")
        .send()
        .await;
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers().get("x-reply").unwrap(), "r1");
    let seen: Seen = resp.json().await.unwrap();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/a/b%20c");
    assert_eq!(seen.query.as_deref(), Some("x=1&y=%C3%A9"));
    assert_eq!(seen.header("x-custom"), Some("v1"));
    assert_eq!(seen.body_len, 10);
}

#[tokio::test]
async fn the_host_is_preserved_and_x_forwarded_headers_are_set() {
    let s = sidecar("").await;
    let seen = s
        .get(&plain(), "/")
        .header("host", "shop.example")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .seen()
        .await;
    assert_eq!(seen.header("host"), Some("shop.example"));
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(
        seen.header("x-forwarded-proto"),
        Some("http"),
        "untrusted: replaced"
    );
    assert_eq!(seen.header("x-forwarded-host"), Some("shop.example"));
}

#[tokio::test]
async fn trust_forwarded_keeps_what_the_proxy_in_front_set() {
    let s = sidecar("trust_forwarded = true").await;
    let seen = s
        .get(&plain(), "/")
        .header("host", "inner:8080")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "shop.example")
        .seen()
        .await;
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("shop.example"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
}

/// Sends a raw HTTP/1.1 request and returns the response head and body as text.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn hop_by_hop_headers_and_those_named_in_connection_are_dropped_both_ways() {
    let s = sidecar("").await;
    let reply_hdrs = reply(&[
        ("Connection", "x-up-private"),
        ("X-Up-Private", "1"),
        ("Keep-Alive", "timeout=5"),
    ]);
    let req = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nConnection: close, x-private\r\nX-Private: secret\r\nKeep-Alive: timeout=9\r\nProxy-Authorization: Basic eA==\r\nTE: trailers\r\nx-test-reply: {reply_hdrs}\r\n\r\n"
    );
    let out = raw(s.addr, &req).await;
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !head.contains("x-up-private") && !head.contains("keep-alive"),
        "{head}"
    );
    let body = body
        .rsplit_once('}')
        .map(|(b, _)| format!("{b}}}"))
        .unwrap();
    let body = &body[body.find('{').unwrap()..];
    let seen: Seen = serde_json::from_str(body).unwrap();
    for name in ["x-private", "keep-alive", "proxy-authorization", "te"] {
        assert!(seen.header(name).is_none(), "{name} forwarded");
    }
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let s = sidecar("").await;
    let stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    for i in 0..3 {
        w.write_all(format!("GET /k{i} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (status, _, body) = read_framed(&mut r).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(String::from_utf8(body).unwrap().contains(&format!("/k{i}")));
    }
}

#[tokio::test]
async fn h2c_clients_are_served_with_sessions() {
    let s = sidecar("").await;
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .cookie_store(true)
        .build()
        .unwrap();
    let resp = s.get(&c, "/").incr("n").send().await;
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(set_cookies(&resp).len(), 1);
    let seen = s.get(&c, "/").seen().await;
    assert_eq!(seen.status(), "existing");
    assert_eq!(
        seen.version, "HTTP/1.1",
        "the upstream still speaks HTTP/1.1"
    );
    assert!(seen.header("host").is_some());
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_with_a_plain_text_body() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let s = sidecar_for(dead, "").await;
    let resp = s.get(&plain(), "/").send().await;
    assert_eq!(resp.status(), 502);
    assert!(
        resp.headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(set_cookies(&resp).is_empty());
    assert!(resp.text().await.unwrap().contains("unreachable"));
}

#[tokio::test]
async fn an_upstream_slower_than_the_timeout_is_a_504() {
    let s = sidecar("upstream_timeout = 1").await;
    let resp = s
        .get(&browser(), "/")
        .header("x-test-delay-ms", "3000")
        .incr("n")
        .send()
        .await;
    assert_eq!(resp.status(), 504);
    assert!(set_cookies(&resp).is_empty());
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("did not answer within 1 seconds")
    );
}

#[tokio::test]
async fn skip_paths_get_no_session_work_but_are_still_scrubbed() {
    let s = sidecar("skip_paths = [\"/static/\"]").await;
    let resp = s.get(&plain(), "/").incr("n").send().await;
    let key = cookie_value(&set_cookies(&resp)[0]);
    let resp = s
        .get(&plain(), "/static/app.css")
        .cookie(format!("sessionid={key}; other=1"))
        .header("x-session", r#"{"spoof":1}"#)
        .reply(&[("X-Session-Set", r#"{"n":99}"#), ("X-Session-Flush", "1")])
        .send()
        .await;
    assert!(set_cookies(&resp).is_empty());
    assert!(resp.headers().get("vary").is_none());
    assert!(
        resp.headers()
            .keys()
            .all(|k| !k.as_str().starts_with("x-session"))
    );
    let seen1 = seen(resp).await;
    assert!(
        seen1.headers.keys().all(|k| !k.starts_with("x-session")),
        "{:?}",
        seen1.headers
    );
    assert_eq!(seen1.header("cookie"), Some("other=1"));
    let after = s
        .get(&plain(), "/")
        .cookie(format!("sessionid={key}"))
        .seen()
        .await;
    assert_eq!(
        after.session(),
        serde_json::json!({"n": 1}),
        "nothing applied on the skip path"
    );
}

/// An app that accepts a WebSocket-style upgrade and echoes bytes, reporting the session status
/// it saw on the handshake.
async fn upgrade_app(mut req: Request<Incoming>) -> Response<AppBody> {
    let status = req.headers().get("x-session-status").cloned();
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let up = on.await.unwrap();
        let mut io = hyper_util::rt::TokioIo::new(up);
        let mut buf = [0u8; 5];
        io.read_exact(&mut buf).await.unwrap();
        io.write_all(&buf).await.unwrap();
    });
    let mut b = Response::builder()
        .status(101)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("X-Session-Set", r#"{"ws":true}"#);
    if let Some(st) = status {
        b = b.header("x-seen-status", st);
    }
    b.body(full("")).unwrap()
}

#[tokio::test]
async fn websocket_upgrades_pass_through_with_session_headers_on_the_handshake() {
    let app = start_app(upgrade_app).await;
    let s = sidecar_for(app, "").await;
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("x-seen-status: new"), "{head}");
    assert!(
        head.contains("set-cookie: sessionid="),
        "the handshake can start a session: {head}"
    );
    assert!(!head.contains("x-session-set"), "{head}");
    stream.write_all(b"hello").await.unwrap();
    let mut echo = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"hello");
}

/// A bare HTTP/1.1 upstream: answers every request on a connection with `200 ok` (keep-alive
/// as far as the client can tell), closes the connection after `per_connection` answers, and
/// counts the connections it accepted.
async fn counting_upstream(
    per_connection: usize,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                for _ in 0..per_connection {
                    // A GET without a body: the head ends with an empty line.
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if w.write_all(answer).await.is_err() {
                        return;
                    }
                }
                // Closed without a word: no `Connection: close` was announced.
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let (app, accepted) = counting_upstream(usize::MAX).await;
    let s = sidecar_for(app, "workers = 2").await;
    let client = plain();
    for i in 0..50 {
        let resp = s.get(&client, &format!("/r{i}")).send().await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "ok");
    }
    let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=2).contains(&n),
        "50 requests one after another opened {n} upstream connections"
    );
}

#[tokio::test]
async fn an_upstream_that_closes_idle_connections_costs_no_request() {
    // Each upstream connection serves one answer and is closed; the sidecar must notice the
    // closed idle connection (or get its request back) and use a new one, never answer 502.
    let (app, accepted) = counting_upstream(1).await;
    let s = sidecar_for(app, "").await;
    let client = plain();
    for i in 0..30 {
        let resp = s.get(&client, &format!("/c{i}")).send().await;
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.text().await.unwrap(), "ok");
        if i % 2 == 0 {
            // Half of them after the close has surely arrived, half right away.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 30);
}

#[tokio::test]
async fn every_worker_serves_and_none_stays_idle_under_parallel_connections() {
    // Four workers accept from one socket: parallel connections must all be answered, whatever
    // worker each one lands on.
    let (app, _) = counting_upstream(usize::MAX).await;
    let s = sidecar_for(app, "workers = 4").await;
    let mut tasks = Vec::new();
    for c in 0..16 {
        let url = s.url(&format!("/p{c}"));
        tasks.push(tokio::spawn(async move {
            // One client per task: its own connection.
            let client = plain();
            for _ in 0..20 {
                let resp = get(&client, &url).send().await;
                assert_eq!(resp.status(), 200);
                resp.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// One HTTP/1.1 response read off a kept-alive connection: the status line, the head's lines
/// (lowercased names) and the body, framed by `Content-Length` or chunked encoding.
async fn read_framed<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> (String, Vec<(String, String)>, Vec<u8>) {
    let mut status = String::new();
    r.read_line(&mut status).await.unwrap();
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        head.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let find = |n: &str| head.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if let Some(len) = find("content-length") {
        body.resize(len.parse().unwrap(), 0);
        r.read_exact(&mut body).await.unwrap();
    } else {
        assert_eq!(
            find("transfer-encoding").as_deref(),
            Some("chunked"),
            "{head:?}"
        );
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await.unwrap();
            let size = usize::from_str_radix(size.trim_end(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).await.unwrap();
            assert_eq!(&chunk[size..], b"\r\n");
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    (status, head, body)
}

/// Python's http.server, many CGI servers and the example app answer HTTP/1.0, often with no
/// length (the body ends when they close). The client is answered in its own version: an
/// HTTP/1.1 client gets HTTP/1.1 with the body chunked and keeps its connection; an HTTP/1.0
/// client gets HTTP/1.0 with the body ending at the close. Both get every byte, and the app's
/// session change lands.
#[tokio::test]
async fn an_http_1_0_app_answering_until_close_does_not_cost_the_client_its_version_or_connection()
{
    let body: Vec<u8> = (0..70_000u32)
        .map(|i| b"0\r\n\r\nabc\x00\xff"[i as usize % 10])
        .collect();
    let mut answer =
        b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nX-Session-Set: {\"seen\":1}\r\n\r\n"
            .to_vec();
    answer.extend_from_slice(&body);
    let app = raw_upstream(answer).await;
    let s = sidecar_for(app, "").await;

    let stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    for i in 0..3 {
        w.write_all(format!("GET /page{i} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (status, head, got) = read_framed(&mut r).await;
        assert!(status.starts_with("HTTP/1.1 200"), "request {i}: {status}");
        assert!(
            !head
                .iter()
                .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close")),
            "request {i} closes the client's connection: {head:?}"
        );
        assert!(
            head.iter()
                .any(|(k, v)| k == "set-cookie" && v.starts_with("sessionid=")),
            "request {i}: the app's change made no session: {head:?}"
        );
        assert_eq!(got.len(), body.len(), "request {i}");
        assert!(got == body, "request {i}: body bytes differ");
    }

    // An HTTP/1.0 client: HTTP/1.0 back, the body delimited by the close, every byte of it.
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stream
        .write_all(b"GET /old HTTP/1.0\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.0 200"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(
        out[split + 4..] == body[..],
        "HTTP/1.0 client: body bytes differ"
    );
}

/// The example app (Python's http.server, HTTP/1.0 with a Content-Length) behind the sidecar:
/// a browser's kept-alive connection serves the visit counter twice, in HTTP/1.1.
#[tokio::test]
async fn the_http_1_0_example_app_keeps_the_browsers_connection() {
    let (_app, s) = python_demo("").await;
    let stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut cookie = String::new();
    for n in 1..=2 {
        w.write_all(format!("GET / HTTP/1.1\r\nHost: h\r\n{cookie}\r\n").as_bytes())
            .await
            .unwrap();
        let (status, head, body) = read_framed(&mut r).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let body = String::from_utf8(body).unwrap();
        let times = if n == 1 { "1 time" } else { "2 times" };
        assert!(
            body.contains(&format!("visited this page {times}")),
            "{body}"
        );
        if let Some((_, v)) = head.iter().find(|(k, _)| k == "set-cookie") {
            cookie = format!("Cookie: {}\r\n", v.split(';').next().unwrap());
        }
    }
}

/// A POST, PUT or PATCH without a body may come without `Content-Length` (`curl -X POST`, a
/// script's fetch); it goes up with `Content-Length: 0`, as RFC 9110 §8.6 asks of a request whose
/// method gives content a meaning, because lighttpd and other strict servers answer it 411. A GET
/// gains nothing, and a stated length is kept.
#[tokio::test]
async fn an_empty_post_without_a_length_goes_up_with_content_length_zero() {
    let s = sidecar("").await;
    for (method, sent, expected) in [
        ("POST", "", Some("0")),
        ("PUT", "", Some("0")),
        ("PATCH", "", Some("0")),
        ("POST", "Content-Length: 0\r\n", Some("0")),
        ("GET", "", None),
        ("DELETE", "", None),
    ] {
        let out = raw(
            s.addr,
            &format!("{method} /p HTTP/1.1\r\nHost: h\r\nConnection: close\r\n{sent}\r\n"),
        )
        .await;
        let body = &out[out.find("\r\n\r\n").unwrap() + 4..];
        let body = &body[body.find('{').unwrap()..=body.rfind('}').unwrap()];
        let seen: Seen = serde_json::from_str(body).unwrap();
        assert_eq!(seen.header("content-length"), expected, "{method} {sent:?}");
    }
}
