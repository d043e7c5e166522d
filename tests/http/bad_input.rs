//! The bad-input matrix (docs/BAD-INPUT.md): whatever a client, the upstream, the disk or the
//! operator throws at the sidecar, it answers clearly, keeps serving everyone else, and keeps
//! every session as it was.

use std::time::Duration;

use crate::common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A session with `{"n": 1}`, as a raw cookie header value.
async fn session(s: &Sidecar) -> String {
    let resp = s.get(&plain(), "/").incr("n").send().await;
    format!("sessionid={}", cookie_value(&set_cookies(&resp)[0]))
}

async fn assert_still_serving(s: &Sidecar, cookie: &str) {
    let seen = s.get(&plain(), "/").cookie(cookie).seen().await;
    assert_eq!(seen.status(), "existing");
    assert_eq!(seen.session(), json!({"n": 1}), "the session is as it was");
}

// ------------------------------------------------------------------ from clients

#[tokio::test]
async fn a_request_head_over_the_limit_is_431_with_a_plain_text_body() {
    let s = sidecar("max_header_bytes = 4096").await;
    let cookie = session(&s).await;
    let resp = s
        .get(&plain(), "/")
        .cookie(&cookie)
        .header("x-big", "a".repeat(5000))
        .incr("n")
        .send()
        .await;
    assert_eq!(resp.status(), 431);
    assert!(set_cookies(&resp).is_empty());
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("more than the 4096 allowed")
    );
    // Far beyond the limit the HTTP layer itself refuses the head, still with 431.
    let out = raw_exchange(
        s.addr,
        format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX-Huge: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        )
        .as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert_still_serving(&s, &cookie).await;
}

#[tokio::test]
async fn too_many_request_headers_is_431() {
    let s = sidecar("max_headers = 20").await;
    let cookie = session(&s).await;
    let mut visit = s.get(&plain(), "/").cookie(&cookie);
    for i in 0..25 {
        visit = visit.header(format!("x-h{i}"), "v");
    }
    let resp = visit.send().await;
    assert_eq!(resp.status(), 431);
    assert!(resp.text().await.unwrap().contains("request headers"));
    assert_still_serving(&s, &cookie).await;
}

#[tokio::test]
async fn far_too_many_request_headers_is_a_bare_431_and_others_are_still_served() {
    // Past the HTTP layer's own count limit (100 with the default max_headers): hyper answers.
    let s = sidecar("").await;
    let cookie = session(&s).await;
    let mut head = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
    for i in 0..150 {
        head.push_str(&format!("x-h{i}: v\r\n"));
    }
    head.push_str("\r\n");
    let out = raw_exchange(s.addr, head.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert_still_serving(&s, &cookie).await;
}

#[tokio::test]
async fn a_malformed_request_line_is_400_and_others_are_still_served() {
    let s = sidecar("").await;
    let cookie = session(&s).await;
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: h\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00",
    ] {
        let out = raw_exchange(s.addr, garbage).await;
        assert!(
            out.is_empty() || out.starts_with("HTTP/1.1 400") || out.starts_with("HTTP/1.1 505"),
            "{out}"
        );
    }
    assert_still_serving(&s, &cookie).await;
}

#[tokio::test]
async fn a_slow_client_is_cut_by_the_header_read_timeout() {
    let s = sidecar("header_read_timeout = 1").await;
    let cookie = session(&s).await;
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: ")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the connection was closed");
    assert!(started.elapsed() < Duration::from_secs(5));
    let out = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 408"), "{out}");
    assert_still_serving(&s, &cookie).await;
}

#[tokio::test]
async fn a_body_that_stops_mid_stream_changes_nothing() {
    let s = sidecar("").await;
    let cookie = session(&s).await;
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: h\r\nCookie: {cookie}\r\nx-test-incr: n\r\nContent-Length: 100000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[b'x'; 1000]).await.unwrap();
    drop(stream);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_still_serving(&s, &cookie).await;
}

#[tokio::test]
async fn oversized_garbled_and_duplicate_session_cookies() {
    let s = sidecar("").await;
    let cookie = session(&s).await;
    // Oversized: never looked up, the visitor is new and the stale cookie is deleted.
    let resp = s
        .get(&plain(), "/")
        .cookie(format!("sessionid={}", "a".repeat(4000)))
        .send()
        .await;
    assert!(set_cookies(&resp)[0].contains("Max-Age=0"));
    assert_eq!(seen(resp).await.status(), "new");
    // Garbled: bytes that are not text.
    let garbled =
        reqwest::header::HeaderValue::from_bytes(b"sessionid=\xff\xfe\x80; other=1").unwrap();
    let resp = s.get(&plain(), "/").cookie(garbled).send().await;
    assert_eq!(resp.status(), 200);
    assert_eq!(seen(resp).await.status(), "new");
    // Duplicates: the first one that verifies wins; a stale one before it does no harm.
    let dup = format!("sessionid={}; {cookie}", "f".repeat(64));
    let seen1 = s.get(&plain(), "/").cookie(dup).seen().await;
    assert_eq!(seen1.status(), "existing");
    assert!(seen1.header("cookie").is_none(), "both copies removed");
    // Two Cookie header lines, as HTTP/2 clients send them.
    let seen2 = s
        .get(&plain(), "/")
        .cookie("a=1")
        .cookie(&cookie)
        .seen()
        .await;
    assert_eq!(seen2.status(), "existing");
    assert_eq!(seen2.header("cookie"), Some("a=1"));
}

#[tokio::test]
async fn past_max_connections_new_connections_get_a_plain_503_and_are_closed() {
    let s = sidecar("max_connections = 3").await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        // A complete exchange, so each connection certainly holds its slot.
        c.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        c.read_exact(&mut buf).await.unwrap();
        idle.push(c);
    }
    let out = raw_exchange(s.addr, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains("too many open connections"), "{out}");
    idle.pop();
    let mut served = false;
    for _ in 0..100 {
        let out = raw_exchange(
            s.addr,
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
        .await;
        if out.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "a freed slot is used again");
}

#[tokio::test]
async fn expect_100_continue_is_honoured() {
    let s = sidecar("").await;
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut first = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert!(
        first.starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&first)
    );
    stream.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("HTTP/1.1 200") && rest.contains("\"body_len\":5"),
        "{rest}"
    );
}

// ------------------------------------------------------------------ from the upstream

#[tokio::test]
async fn garbage_instead_of_http_from_the_upstream_is_a_502() {
    let app = raw_upstream(b"this is not HTTP at all\r\n\r\n".to_vec()).await;
    let s = sidecar_for(app, "").await;
    let resp = s.get(&plain(), "/").send().await;
    assert_eq!(resp.status(), 502);
    let text = resp.text().await.unwrap();
    assert!(text.contains("answer was broken"), "{text}");
}

#[tokio::test]
async fn a_huge_response_head_from_the_upstream_is_a_502() {
    let mut answer = b"HTTP/1.1 200 OK\r\nX-Session-Set: {\"a\":1}\r\nX-Huge: ".to_vec();
    answer.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024));
    answer.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
    let app = raw_upstream(answer).await;
    let s = sidecar_for(app, "").await;
    let resp = s.get(&browser(), "/").send().await;
    assert_eq!(resp.status(), 502);
    assert!(set_cookies(&resp).is_empty());
    assert!(
        resp.headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(resp.text().await.unwrap().contains("answer was broken"));
}

#[tokio::test]
async fn an_upstream_that_resets_mid_body_cuts_that_response_only() {
    let app =
        raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial".to_vec()).await;
    let s = sidecar_for(app, "").await;
    let resp = s.get(&plain(), "/").send().await;
    assert_eq!(resp.status(), 200, "the head had already been forwarded");
    assert!(
        resp.bytes().await.is_err(),
        "the client sees the body cut, not a short success"
    );
    let again = s.get(&plain(), "/").send().await;
    assert_eq!(again.status(), 200);
}

#[tokio::test]
async fn informational_responses_from_the_upstream_are_passed_over() {
    let app = raw_upstream(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Session-Set: {\"hinted\":1}\r\n\r\nok".to_vec()).await;
    let s = sidecar_for(app, "").await;
    let resp = s.get(&plain(), "/").send().await;
    assert_eq!(resp.status(), 200);
    assert_eq!(set_cookies(&resp).len(), 1);
    assert_eq!(resp.text().await.unwrap(), "ok");
}

// ------------------------------------------------------------------ from the store

#[tokio::test]
async fn a_store_that_fails_at_run_time_answers_503_for_reads_and_writes() {
    let s = sidecar("").await;
    let cookie = session(&s).await;
    s.faulty
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for incr in [false, true] {
        let mut visit = s.get(&plain(), "/").cookie(&cookie);
        if incr {
            visit = visit.incr("n");
        }
        let resp = visit.send().await;
        assert_eq!(resp.status(), 503);
        assert!(set_cookies(&resp).is_empty());
    }
    s.faulty
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_still_serving(&s, &cookie).await;
}

/// A tmpfs mounted for one test and unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap().keep();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.to_str().unwrap(),
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l", self.0.to_str().unwrap()])
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_full_disk_answers_503_and_never_claims_a_change_was_kept() {
    let Some(disk) = SmallDisk::mount("16m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root and mount rights)");
        return;
    };
    let app = start_app(echo).await;
    let s = sidecar_at(app, "", &disk.0).await;
    let cookie = session(&s).await;
    // Fill the disk.
    let filler = disk.0.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![1u8; 1 << 20];
    while std::io::Write::write_all(&mut f, &block).is_ok() {}
    drop(f);
    // A change is refused once it cannot be kept: the write-ahead log writes into space it took
    // ahead (up to 1 MiB), so the first refusal may take a few hundred writes.
    let mut refused = 0;
    for i in 0..2000 {
        if refused > 0 {
            break;
        }
        let set = format!(r#"{{"big":"{i}{}"}}"#, "x".repeat(4000));
        let resp = s
            .get(&plain(), "/")
            .cookie(&cookie)
            .reply(&[("X-Session-Set", &set)])
            .send()
            .await;
        match resp.status().as_u16() {
            200 => {}
            503 => {
                assert!(set_cookies(&resp).is_empty());
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(refused > 0, "writes to a full disk are refused");
    drop(s);
    drop(disk);
}

// ------------------------------------------------------------------ from the operator

#[test]
fn a_store_path_that_cannot_be_opened_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\n[store]\npath = {:?}\n[admin]\nlisten = \"\"\n",
            file.join("sessions").display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-sidecar"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open the session store") && err.contains("not-a-dir"),
        "{err}"
    );
}

#[tokio::test]
async fn a_second_sidecar_on_a_held_store_exits_with_a_clear_message() {
    let s = sidecar("").await;
    let cfg = s.path.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\n[store]\npath = {:?}\n[admin]\nlisten = \"\"\n",
            s.path.join("sessions").display().to_string()
        ),
    )
    .unwrap();
    // The in-process sidecar holds the lock; a second process must refuse, not wait or corrupt.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-sidecar"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");
}
