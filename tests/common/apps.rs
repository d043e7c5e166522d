//! Upstream apps for the sidecar to stand in front of: the echo app (which reports what it saw
//! and answers with the session changes a test asks for), a gated echo for ordering concurrent
//! requests, a raw-bytes "upstream", apps on a Unix socket, and the Python example app run as a
//! child process.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::sidecar::{Sidecar, sidecar_for};

pub type AppBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What the test upstream saw, as its echo body reports it.
#[derive(Debug, serde::Deserialize)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_len: u64,
    /// The body's bytes added up (wrapping): that it arrived unchanged.
    pub body_sum: u64,
    pub version: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
    pub fn session(&self) -> Value {
        serde_json::from_str(self.header("x-session").expect("x-session header")).unwrap()
    }
    pub fn status(&self) -> &str {
        self.header("x-session-status").unwrap()
    }
}

/// Starts an upstream with a custom handler.
pub async fn start_app<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<AppBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_app_connection(stream, handler.clone()));
        }
    });
    addr
}

/// Serves one connection of a test app with `handler` (HTTP/1.1, upgrades allowed).
async fn serve_app_connection<S, F, Fut>(stream: S, handler: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<AppBody>> + Send + 'static,
{
    let svc = service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades()
        .await;
}

/// The echo app (or another handler) on a Unix socket at `path`; counts the connections it
/// accepts.
pub async fn start_unix_app<F, Fut>(path: &std::path::Path, handler: F) -> Arc<AtomicU64>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<AppBody>> + Send + 'static,
{
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_app_connection(stream, handler.clone()));
        }
    });
    accepted
}

pub fn full(b: impl Into<Bytes>) -> AppBody {
    Full::new(b.into()).boxed()
}

/// The echo app. It answers with a JSON description of the request it received, and obeys
/// instructions in request headers:
/// - `x-test-reply`: JSON array of `[name, value]` pairs to add to the response;
/// - `x-test-incr: key`: answer `X-Session-Set: {key: received[key] + 1}`;
/// - `x-test-full-set: {json}`: answer `X-Session` = received session with these keys set;
/// - `x-test-status`, `x-test-delay-ms`, `x-test-body-size` (a streamed body of N bytes).
pub async fn echo(req: Request<Incoming>) -> Response<AppBody> {
    let h = req.headers().clone();
    let get = |n: &str| {
        h.get(n)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in h.iter() {
        headers
            .entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let version = format!("{:?}", req.version());
    let mut body = req.into_body();
    let (mut body_len, mut body_sum) = (0u64, 0u64);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_len += d.len() as u64;
                    body_sum = d.iter().fold(body_sum, |s, &b| s.wrapping_add(b as u64));
                }
            }
            Err(_) => break,
        }
    }
    if let Some(ms) = get("x-test-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    let session: serde_json::Map<String, Value> = get("x-session")
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let mut builder = Response::builder();
    if let Some(s) = get("x-test-status") {
        builder = builder.status(s.parse::<u16>().unwrap());
    }
    if let Some(reply) = h.get("x-test-reply") {
        let pairs: Vec<(String, String)> = serde_json::from_slice(reply.as_bytes()).unwrap();
        for (n, v) in pairs {
            builder = builder.header(
                n,
                hyper::header::HeaderValue::from_bytes(v.as_bytes()).unwrap(),
            );
        }
    }
    if let Some(key) = get("x-test-incr") {
        let n = session.get(&key).and_then(Value::as_i64).unwrap_or(0);
        builder = builder.header("X-Session-Set", json!({ key: n + 1 }).to_string());
    }
    if let Some(set) = get("x-test-full-set") {
        let mut all = session.clone();
        let add: serde_json::Map<String, Value> = serde_json::from_str(&set).unwrap();
        all.extend(add);
        builder = builder.header("X-Session", Value::Object(all).to_string());
    }
    if let Some(size) = get("x-test-body-size") {
        let size: u64 = size.parse().unwrap();
        return builder.body(streamed(size)).unwrap();
    }
    let seen = json!({"method": method, "path": path, "query": query, "headers": headers,
                      "body_len": body_len, "body_sum": body_sum, "version": version});
    builder
        .header("content-type", "application/json")
        .body(full(seen.to_string()))
        .unwrap()
}

/// A body of `size` zero bytes, produced 64 KiB at a time, never held whole.
pub fn streamed(size: u64) -> AppBody {
    let chunk = Bytes::from(vec![0u8; 64 * 1024]);
    let stream = futures_util_stream(size, chunk);
    StreamBody::new(stream).boxed()
}

fn futures_util_stream(
    size: u64,
    chunk: Bytes,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if tx.send(Ok(Frame::data(chunk.slice(..n)))).await.is_err() {
                return;
            }
            left -= n as u64;
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_core::Stream<Item = T> + Send + Sync {
    struct S<T>(std::sync::Mutex<tokio::sync::mpsc::Receiver<T>>);
    impl<T> futures_core::Stream for S<T> {
        type Item = T;
        fn poll_next(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.lock().unwrap().poll_recv(cx)
        }
    }
    let _ = &mut rx;
    S(std::sync::Mutex::new(rx))
}

/// An echo app whose `/gate...` requests report their arrival and then wait to be released, so a
/// test can order concurrent requests without sleeping. Requests are released strictly in the
/// order they arrived: each takes a ticket before it reports its arrival.
pub struct Gate {
    pub arrived: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<()>>,
    released: tokio::sync::watch::Sender<usize>,
}

impl Gate {
    pub async fn wait_arrival(&self) {
        self.arrived.lock().await.recv().await.unwrap();
    }
    pub fn open(&self, n: usize) {
        self.released.send_modify(|r| *r += n);
    }
}

pub async fn gated_app() -> (SocketAddr, Arc<Gate>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (released, _) = tokio::sync::watch::channel(0usize);
    let gate = Arc::new(Gate {
        arrived: tokio::sync::Mutex::new(rx),
        released,
    });
    let tickets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let g = gate.clone();
    let addr = start_app(move |req: Request<Incoming>| {
        let (tx, gate, tickets) = (tx.clone(), g.clone(), tickets.clone());
        async move {
            if req.uri().path().starts_with("/gate") {
                let ticket = tickets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut released = gate.released.subscribe();
                let _ = tx.send(());
                let _ = released.wait_for(|r| *r > ticket).await;
            }
            echo(req).await
        }
    })
    .await;
    (addr, gate)
}

/// An "upstream" that answers every connection with the same raw bytes and then closes:
/// for garbage, truncated or oversized answers that no HTTP library would produce.
pub async fn raw_upstream(answer: Vec<u8>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(&answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// A child process killed and reaped when dropped (an example app, a browser, a Redis node).
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something listens on 127.0.0.1:`port` (an example app starting).
pub async fn wait_until_up(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("example app did not start on {port}");
}

/// The Python example app (examples/legacy_app.py) behind a sidecar with `extra` config.
pub async fn python_demo(extra: &str) -> (Killed, Sidecar) {
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/legacy_app.py");
    let app = Killed(
        std::process::Command::new("python3")
            .args([script, &port.to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3"),
    );
    wait_until_up(port).await;
    let s = sidecar_for(format!("127.0.0.1:{port}").parse().unwrap(), extra).await;
    (app, s)
}
