//! Real parts for the integration tests: a real upstream app on 127.0.0.1:0, a real sidecar in
//! front of it (in-process, on a temporary sled store, with a clock the test can move), and a
//! real cookie-keeping HTTP client.
#![allow(dead_code)]

pub mod binary;
pub mod relay;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use session_sidecar::session::testing::{self, Store};
use session_sidecar::session::{ManualClock, Millis, StoreError, Watch};
use session_sidecar::{Config, Deps};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

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

/// Makes the store fail on demand (fault injection for fail-closed): every operation is
/// refused before it reaches the real store while `failing` is set.
pub struct Faulty {
    pub failing: AtomicBool,
}

impl Watch for Faulty {
    fn before(&self, _op: &'static str) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError::Backend("test", "injected failure".into()))
        } else {
            Ok(())
        }
    }
}

/// Which of `names` (session keys, subjects) appears in `bytes`, if any: what a reader of the
/// store or a backup would learn.
pub fn named_in<'a>(bytes: &[u8], names: &'a [String]) -> Option<&'a str> {
    names
        .iter()
        .find(|n| bytes.windows(n.len()).any(|w| w == n.as_bytes()))
        .map(String::as_str)
}

/// Every key name under `prefix` on each of `ports`, with its value as text (a set as its
/// members), as `redis-cli` shows them.
pub fn redis_contents(ports: &[u16], prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for &port in ports {
        let names = redis_cli(port, &["--scan", "--pattern", &format!("{prefix}*")]);
        for name in names.lines().filter(|n| !n.is_empty()) {
            let value = match redis_cli(port, &["TYPE", name]).as_str() {
                "set" => redis_cli(port, &["SMEMBERS", name]),
                "none" => continue,
                _ => redis_cli(port, &["GET", name]),
            };
            out.push((name.to_string(), value));
        }
    }
    out
}

/// The handles of `subject`'s live sessions, sorted (the store knows no keys to list).
pub async fn subject_handles(store: &Arc<dyn Store>, subject: &str, now: Millis) -> Vec<String> {
    let mut handles: Vec<String> = store
        .subject_sessions(subject, now)
        .await
        .unwrap()
        .iter()
        .map(|(cell, _)| cell.handle())
        .collect();
    handles.sort();
    handles
}

/// A running sidecar in front of an app.
pub struct Sidecar {
    pub addr: SocketAddr,
    pub app: SocketAddr,
    pub clock: Arc<ManualClock>,
    /// The admin listener (always on in tests, on a free port).
    pub admin: SocketAddr,
    pub store: Arc<dyn Store>,
    pub faulty: Arc<Faulty>,
    /// Owns the temporary directory when the sidecar made it.
    pub dir: Option<tempfile::TempDir>,
    pub path: std::path::PathBuf,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), session_sidecar::RunError>>>,
}

impl Sidecar {
    pub fn now(&self) -> Millis {
        session_sidecar::session::Clock::now(&*self.clock)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// SIGTERM, as far as `run` is concerned: stop and wait for the drain. The store is closed
    /// once this returns (the temporary directory, if any, is handed back).
    pub async fn stop(
        mut self,
    ) -> (
        Result<(), session_sidecar::RunError>,
        Option<tempfile::TempDir>,
    ) {
        let _ = self.stop.take().unwrap().send(());
        let result = self.task.take().unwrap().await.unwrap();
        let dir = self.dir.take();
        drop(self);
        (result, dir)
    }
}

/// A sidecar in front of the echo app, with extra TOML lines.
pub async fn sidecar(extra: &str) -> Sidecar {
    let app = start_app(echo).await;
    sidecar_for(app, extra).await
}

pub async fn sidecar_for(app: SocketAddr, extra: &str) -> Sidecar {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sidecar_at(app, extra, dir.path()).await;
    s.dir = Some(dir);
    s
}

/// A sidecar on an existing store directory (a restart).
pub async fn sidecar_at(app: SocketAddr, extra: &str, dir: &std::path::Path) -> Sidecar {
    let (top, tables) = split_extra(extra);
    let text = format!(
        "{upstream}listen = \"127.0.0.1:0\"\n{timeout}{top}\n{store}{admin}{tables}",
        upstream = if top.contains("upstream = ") {
            String::new()
        } else {
            format!("upstream = \"http://{app}\"\n")
        },
        admin = if tables.contains("[admin]") {
            ""
        } else {
            "[admin]\nlisten = \"\"\n"
        },
        store = if tables.contains("[store]") {
            String::new()
        } else {
            format!(
                "[store]\npath = {:?}\n",
                dir.join("sessions").display().to_string()
            )
        },
        timeout = if top.contains("upstream_timeout") {
            ""
        } else {
            "upstream_timeout = 5\n"
        },
    );
    let config = Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    // A sidecar stopped in this process may still be letting go of the directory lock.
    let mut tries = 0;
    let deps = loop {
        match Deps::open(&config).await {
            Ok(d) => break d,
            Err(StoreError::Locked { .. }) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let clock = ManualClock::starting_now();
    let faulty = Arc::new(Faulty {
        failing: AtomicBool::new(false),
    });
    let storage = deps.store.watched(faulty.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let store = testing::store_of(&storage);
    let deps = Deps {
        store: storage,
        clock: clock.clone(),
    };
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let task = tokio::spawn(session_sidecar::run_with_admin(
        config,
        listener,
        Some(admin),
        async {
            let _ = rx.await;
        },
        deps,
        None,
    ));
    Sidecar {
        addr,
        app,
        clock,
        admin: admin_addr,
        store,
        faulty,
        dir: None,
        path: dir.to_path_buf(),
        stop: Some(tx),
        task: Some(task),
    }
}

/// Extra TOML may carry top-level keys and tables; `[store]`/`[admin]` lines are merged.
fn split_extra(extra: &str) -> (String, String) {
    let mut top = String::new();
    let mut tables = String::new();
    let mut in_table = false;
    for line in extra.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_table = true;
        }
        if in_table {
            tables.push_str(line);
            tables.push('\n');
        } else {
            top.push_str(line);
            top.push('\n');
        }
    }
    (top, tables)
}

/// A cookie-keeping client, like a browser.
pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A client that keeps no cookies, for raw Cookie headers.
pub fn plain() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `x-test-reply` value for a list of response headers.
pub fn reply(pairs: &[(&str, &str)]) -> String {
    serde_json::to_string(
        &pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>(),
    )
    .unwrap()
}

pub async fn seen(resp: reqwest::Response) -> Seen {
    assert!(resp.status().is_success(), "status {}", resp.status());
    resp.json().await.unwrap()
}

/// The `Set-Cookie` headers of a response, for our cookie.
pub fn set_cookies(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .filter(|c| c.starts_with("sessionid="))
        .collect()
}

/// The session key in a `Set-Cookie` value.
pub fn cookie_value(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_string()
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

/// Writes `request` on a fresh connection and reads until the peer closes (or 10 s pass).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
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

/// Says why a test that needs Redis (or iptables) does not run, and passes; with
/// `SIDECAR_REQUIRE_REDIS=1` (set by CI) it fails instead: a missing install step must not
/// turn the Redis, Sentinel, Cluster and partition tests green by skipping them.
pub fn skipped(why: &str) {
    assert!(
        std::env::var_os("SIDECAR_REQUIRE_REDIS").is_none(),
        "SIDECAR_REQUIRE_REDIS is set and {why}"
    );
    eprintln!("SKIPPED: {why}");
}

/// A real `redis-server` on a free port with a temporary directory and no persistence, stopped
/// when dropped. `None` (with a message saying why) when redis-server is not installed.
pub struct RedisServer {
    pub port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Option<RedisServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        RedisServer::start_on(port)
    }

    /// On a given port, e.g. to bring a stopped server back.
    pub fn start_on(port: u16) -> Option<RedisServer> {
        RedisServer::start_with(port, None)
    }

    /// Holding what `dump` (an RDB file) holds, on a free port.
    pub fn start_from_dump(dump: &std::path::Path) -> Option<RedisServer> {
        RedisServer::start_with(free_port(), Some(dump))
    }

    /// The server's directory (its `dump.rdb` after a `SAVE`).
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    fn start_with(port: u16, dump: Option<&std::path::Path>) -> Option<RedisServer> {
        let dir = tempfile::tempdir().unwrap();
        if let Some(dump) = dump {
            std::fs::copy(dump, dir.path().join("dump.rdb")).unwrap();
        }
        let child = match std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                skipped(&format!(
                    "redis-server is not installed ({e}); `apt-get install redis-server` runs these tests"
                ));
                return None;
            }
        };
        let server = RedisServer {
            port,
            child,
            _dir: dir,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start on {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `[store]` lines for a sidecar on this server, under its own key prefix.
    pub fn store_toml(&self, prefix: &str) -> String {
        format!(
            "[store]\nbackend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\ncommand_timeout = 2\n",
            self.url()
        )
    }

    /// Blocks the server for `secs` seconds (`DEBUG SLEEP` through redis-cli), as an overloaded
    /// Redis would be. Returns once the server is asleep.
    pub fn stall(&self, secs: f64) {
        let mut cli = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &self.port.to_string(),
                "DEBUG",
                "SLEEP",
                &secs.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-cli comes with redis-server");
        std::thread::spawn(move || cli.wait());
        // Wait until a PING no longer answers within 100 ms.
        for _ in 0..100 {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
            c.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            c.write_all(b"PING\r\n").unwrap();
            let mut buf = [0u8; 16];
            if c.read(&mut buf).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("redis did not stall");
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A child process killed and reaped when dropped (an example app, a browser).
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

/// A free port for a cluster node: its cluster bus port (port + 10000) must exist and be free
/// too, or redis-server exits at start.
pub fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
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

/// sled's background threads may hold the database (and its file lock) a moment after the
/// last handle is dropped; opening it again before then fails with Locked. Wait until the
/// lock sled takes (flock on the `db` file) is free.
pub fn sled_lets_go(path: &std::path::Path) {
    let db_file = path.join("db");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let file = std::fs::File::open(&db_file).unwrap();
        match file.try_lock() {
            Ok(()) => return,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("sled still holds {}: {e}", db_file.display()),
        }
    }
}

/// A Redis master, two replicas and three sentinels watching them (quorum 2), all on loopback
/// ports of their own, as production runs Redis with Sentinel. `None` (saying why) when
/// redis-server or redis-sentinel is not installed.
pub struct SentinelSet {
    pub master_port: u16,
    pub replica_ports: Vec<u16>,
    pub sentinel_ports: Vec<u16>,
    pub master: Option<Killed>,
    pub replicas: Vec<Killed>,
    sentinels: Vec<Killed>,
    dir: tempfile::TempDir,
    _turn: std::sync::MutexGuard<'static, ()>,
}

pub const MASTER_NAME: &str = "sessions";

/// Replicated Redis set-ups (a Sentinel set, a cluster) run one at a time within a test binary:
/// each is half a dozen processes whose failovers and timeouts the tests measure, and two cores
/// shared by several of them make those figures, and the set-up itself, unreliable.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn redis_process(program: &str, args: &[String]) -> Option<Killed> {
    match std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(child) => Some(Killed(child)),
        Err(e) => {
            skipped(&format!(
                "{program} is not installed ({e}); `apt-get install redis-server redis-sentinel` runs these tests"
            ));
            None
        }
    }
}

/// A redis-server on 127.0.0.1:`port` with its own directory under `dir`, no persistence, and
/// `extra` arguments.
fn redis_node(dir: &std::path::Path, port: u16, extra: &[&str]) -> Option<Killed> {
    let data = dir.join(format!("redis-{port}"));
    std::fs::create_dir_all(&data).unwrap();
    let port = port.to_string();
    let data = data.display().to_string();
    let mut args = vec![
        "--port",
        &port,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &data,
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    redis_process("redis-server", &args)
}

fn wait_port(port: u16) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing listens on {port}");
}

/// Sends one command to 127.0.0.1:`port` through redis-cli and returns its output.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli comes with redis-server");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl SentinelSet {
    pub fn start() -> Option<SentinelSet> {
        SentinelSet::start_with_sentinels_as(None)
    }

    /// With `uid`, the sentinels run as that user and group id (`setpriv`), so that a firewall
    /// rule on the socket owner can cut them, and only them, off from a server.
    pub fn start_with_sentinels_as(uid: Option<u32>) -> Option<SentinelSet> {
        let turn = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        if uid.is_some() {
            // The sentinels rewrite their configuration files.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let master_port = free_port();
        let replica_ports = vec![free_port(), free_port()];
        let server = |port: u16, extra: &[&str]| redis_node(dir.path(), port, extra);
        let master = server(master_port, &[])?;
        wait_port(master_port);
        let mut replicas = Vec::new();
        for &port in &replica_ports {
            replicas.push(server(
                port,
                &["--replicaof", "127.0.0.1", &master_port.to_string()],
            )?);
            wait_port(port);
        }
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 4000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    dir.path().display()
                ),
            )
            .unwrap();
            let conf = conf.display().to_string();
            sentinels.push(match uid {
                None => redis_process("redis-sentinel", &[conf])?,
                Some(uid) => {
                    std::process::Command::new("chown")
                        .args([format!("{uid}:{uid}"), conf.clone()])
                        .status()
                        .unwrap();
                    let args = [
                        format!("--reuid={uid}"),
                        format!("--regid={uid}"),
                        "--clear-groups".into(),
                        "redis-sentinel".into(),
                        conf,
                    ];
                    redis_process("setpriv", &args)?
                }
            });
            wait_port(port);
            sentinel_ports.push(port);
        }
        let set = SentinelSet {
            master_port,
            replica_ports,
            sentinel_ports,
            master: Some(master),
            replicas,
            sentinels,
            dir,
            _turn: turn,
        };
        set.wait_until_ready();
        Some(set)
    }

    /// Until the replicas are in sync and every sentinel knows them and the other two: the state
    /// in which a failover can happen.
    fn wait_until_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let synced = self
                .replica_ports
                .iter()
                .all(|&p| redis_cli(p, &["INFO", "replication"]).contains("master_link_status:up"));
            let known = self.sentinel_ports.iter().all(|&p| {
                let info = redis_cli(p, &["SENTINEL", "MASTER", MASTER_NAME]);
                let field = |name: &str| {
                    let lines: Vec<&str> = info.lines().collect();
                    lines
                        .iter()
                        .position(|l| *l == name)
                        .and_then(|i| lines.get(i + 1))
                        .map(|v| v.to_string())
                };
                field("num-slaves").as_deref() == Some("2")
                    && field("num-other-sentinels").as_deref() == Some("2")
            });
            if synced && known {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the sentinels did not learn the replica and each other"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `[store]` lines for a sidecar that finds the master through the sentinels.
    pub fn store_toml(&self, prefix: &str) -> String {
        let sentinels: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        format!(
            "[store]\nbackend = \"redis\"\nsentinels = {sentinels:?}\nmaster_name = \"{MASTER_NAME}\"\n\
             key_prefix = \"{prefix}\"\ncommand_timeout = 2\nconnect_timeout = 2\n"
        )
    }

    /// The port of the server the sentinels name as master now.
    pub fn current_master(&self) -> u16 {
        let out = redis_cli(
            self.sentinel_ports[0],
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
        );
        out.lines().nth(1).unwrap().parse().unwrap()
    }

    /// SIGKILLs the master, as a crashed host would leave it.
    pub fn kill_master(&mut self) {
        self.master.take();
    }
}

/// A Redis Cluster of three masters (slots spread by `redis-cli --cluster create`), on loopback
/// ports of its own. `None` (saying why) when redis-server is not installed.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _nodes: Vec<Killed>,
    _dir: tempfile::TempDir,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl RedisCluster {
    /// Three masters.
    pub fn start() -> Option<RedisCluster> {
        RedisCluster::start_with_replicas(0)
    }

    /// Three masters, each with `replicas` replicas (`redis-cli --cluster create` assigns them).
    pub fn start_with_replicas(replicas: usize) -> Option<RedisCluster> {
        let turn = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3 * (1 + replicas))
            .map(|_| free_cluster_port())
            .collect();
        let mut nodes = Vec::new();
        for &port in &ports {
            let cluster = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ];
            nodes.push(redis_node(dir.path(), port, &cluster)?);
            wait_port(port);
        }
        let mut create = std::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for p in &ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli comes with redis-server");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let linked = |p: u16| {
            let info = redis_cli(p, &["INFO", "replication"]);
            !info.contains("role:slave") || info.contains("master_link_status:up")
        };
        while !ports
            .iter()
            .all(|&p| redis_cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok") && linked(p))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(RedisCluster {
            ports,
            _nodes: nodes,
            _dir: dir,
            _turn: turn,
        })
    }

    /// `[store]` lines for a sidecar on this cluster, under its own key prefix.
    pub fn store_toml(&self, prefix: &str) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        format!(
            "[store]\nbackend = \"redis\"\ncluster_nodes = {nodes:?}\nkey_prefix = \"{prefix}\"\ncommand_timeout = 2\n"
        )
    }

    /// The nodes that are replicas now, with their processes.
    pub fn replicas(&self) -> Vec<(u16, u32)> {
        self.ports
            .iter()
            .zip(&self._nodes)
            .filter(|&(&p, _)| redis_cli(p, &["INFO", "replication"]).contains("role:slave"))
            .map(|(&p, node)| (p, node.0.id()))
            .collect()
    }

    /// The port of the master serving `key`'s slot now.
    pub fn master_of(&self, key: &str) -> u16 {
        let slot: u16 = redis_cli(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .parse()
            .unwrap();
        let serves = |port: u16| {
            let nodes = redis_cli(port, &["CLUSTER", "NODES"]);
            let me = nodes
                .lines()
                .find(|l| l.contains("myself"))
                .unwrap()
                .to_string();
            me.contains("master")
                && me.split_whitespace().skip(8).any(|range| {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
                })
        };
        *self.ports.iter().find(|&&p| serves(p)).unwrap()
    }

    /// The replicas (port, pid) of the master on `master`.
    pub fn replicas_of(&self, master: u16) -> Vec<(u16, u32)> {
        let link = format!("master_port:{master}");
        self.replicas()
            .into_iter()
            .filter(|&(p, _)| redis_cli(p, &["INFO", "replication"]).contains(&link))
            .collect()
    }

    /// Keys held by each node.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.ports
            .iter()
            .map(|&p| redis_cli(p, &["DBSIZE"]).parse().unwrap())
            .collect()
    }
}

/// An `iptables` rule that drops what processes of `uid` send to 127.0.0.1:`port`, removed on
/// drop: the sentinels lose the master while the sidecar still reaches it.
pub struct Cut {
    rule: Vec<String>,
}

impl Cut {
    /// `None` (saying why) where the firewall cannot be changed.
    pub fn new(uid: u32, port: u16) -> Option<Cut> {
        let rule: Vec<String> = [
            "OUTPUT",
            "-o",
            "lo",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-m",
            "owner",
            "--uid-owner",
            &uid.to_string(),
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let added = std::process::Command::new("iptables")
            .arg("-I")
            .args(&rule)
            .status();
        match added {
            Ok(s) if s.success() => Some(Cut { rule }),
            other => {
                skipped(&format!(
                    "iptables cannot add a rule ({other:?}); it needs root and the iptables package"
                ));
                None
            }
        }
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = std::process::Command::new("iptables")
            .arg("-D")
            .args(&self.rule)
            .status();
    }
}

/// A visitor counts through `sidecar`; `cut` partitions it from (part of) Redis: every request
/// answers 503 within the command timeout (2 s), and once the cut is dropped the visitor goes
/// on counting from where it was. Skips (returns) when `cut` cannot be made.
pub async fn partition_and_heal(sidecar: &Sidecar, cut: impl FnOnce() -> Option<Vec<Cut>>) {
    let client = browser();
    let count = async || {
        client
            .get(sidecar.url("/"))
            .header("x-test-incr", "n")
            .send()
            .await
            .unwrap()
    };
    for expected in 0..3 {
        let resp = count().await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            seen(resp)
                .await
                .session()
                .get("n")
                .cloned()
                .unwrap_or(json!(0)),
            expected
        );
    }
    let Some(cut) = cut() else {
        return;
    };
    let mut slowest = Duration::ZERO;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let resp = count().await;
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert_eq!(
            resp.status(),
            503,
            "cut off: {}",
            resp.text().await.unwrap()
        );
        assert!(
            took < Duration::from_millis(2900),
            "503 after {took:?}; command_timeout is 2 s"
        );
    }
    drop(cut);
    let healed = std::time::Instant::now();
    loop {
        let resp = count().await;
        if resp.status() == 200 {
            let n = seen(resp).await.session()["n"].as_i64().unwrap();
            // The refused requests' changes were never made (the writes did not reach Redis).
            assert_eq!(n, 3, "the session as it was before the cut");
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(30),
            "no recovery within 30 s of the heal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "partition: 503 within {slowest:?} (slowest of 3); served again {:?} after the heal",
        healed.elapsed()
    );
}
