//! Shutdown as an orchestrator sees it: readiness turns 503 while draining, requests and
//! upgraded connections in flight finish, and a drain with nothing to wait for is clean
//! whatever the grace (docs/HEADERS.md §6).

use std::time::Duration;

use crate::common::*;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_zero_grace_with_nothing_in_flight_stops_cleanly() {
    let s = sidecar("shutdown_grace = 0").await;
    let b = browser();
    assert_eq!(s.get(&b, "/").send().await.status(), 200);
    // An h2c client that never answers the shutdown's ping, beside the browser's keep-alive
    // connection: idle connections are not requests cut.
    let mut h2 = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut settings = [0u8; 9];
    h2.read_exact(&mut settings).await.unwrap();
    let (result, _) = s.stop().await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn readiness_is_503_while_draining_and_the_request_in_flight_finishes() {
    let (app, gate) = gated_app().await;
    let s = sidecar_for(app, "").await;
    let ready = format!("http://{}/readyz", s.admin);
    assert_eq!(get(&plain(), &ready).send().await.status(), 200);
    let slow = s.get(&plain(), "/gate");
    let slow = tokio::spawn(async move { slow.send().await.status() });
    gate.wait_arrival().await;
    let stopping = tokio::spawn(s.stop());
    let mut draining = false;
    for _ in 0..200 {
        if get(&plain(), &ready).send().await.status() == 503 {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining, "/readyz kept saying 200 while draining");
    gate.open(1);
    assert_eq!(slow.await.unwrap(), 200);
    let (result, _) = stopping.await.unwrap();
    assert!(result.is_ok(), "{result:?}");
}

/// Accepts a WebSocket-style upgrade and echoes bytes until the client closes.
async fn echo_upgrade(mut req: Request<Incoming>) -> Response<AppBody> {
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let mut io = hyper_util::rt::TokioIo::new(on.await.unwrap());
        let mut buf = [0u8; 64];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Response::builder()
        .status(101)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .body(full(""))
        .unwrap()
}

#[tokio::test]
async fn an_open_websocket_is_drained_not_dropped() {
    let app = start_app(echo_upgrade).await;
    let s = sidecar_for(app, "").await;
    let mut ws = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        ws.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let stopping = tokio::spawn(s.stop());
    // The splice still carries traffic during the drain, and the drain waits for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.write_all(b"still here").await.unwrap();
    let mut echo = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"still here");
    assert!(
        !stopping.is_finished(),
        "the drain did not wait for the WebSocket"
    );
    drop(ws);
    let (result, _) = tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the drain ends once the WebSocket closes")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}
