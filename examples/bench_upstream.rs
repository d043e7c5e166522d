//! The benchmark's upstream: a minimal hyper server on one worker thread that plays the seed's
//! visit counter through the session headers. Not a legacy app; a fixed, cheap workload so that
//! the benchmark measures the proxy in front of it.
//!
//! ```text
//! cargo run --release --example bench_upstream -- 18000
//! ```
//! - `/static/...`  a small body, no session work (the skip_paths route)
//! - `/read`        reads `X-Session`, answers the count, changes nothing
//! - `/count`       the visit counter: `X-Session-Set: {"num_visits": n + 1}`
//! - `/stats`       JSON: requests served, and requests that expected an existing session but
//!   were told `new` (a lost session; requests carry `x-bench-expect: existing`)

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

static REQUESTS: AtomicU64 = AtomicU64::new(0);
static LOST: AtomicU64 = AtomicU64::new(0);

fn visits(req: &Request<Incoming>) -> u64 {
    let Some(raw) = req.headers().get("x-session") else {
        return 0;
    };
    let session: serde_json::Value = serde_json::from_slice(raw.as_bytes()).unwrap_or_default();
    session["num_visits"].as_u64().unwrap_or(0)
}

async fn app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    if path == "/stats" {
        let body = format!(
            "{{\"requests\":{},\"lost\":{}}}",
            REQUESTS.load(Ordering::Relaxed),
            LOST.load(Ordering::Relaxed)
        );
        return Ok(Response::new(Full::new(Bytes::from(body))));
    }
    REQUESTS.fetch_add(1, Ordering::Relaxed);
    let expected = req.headers().get("x-bench-expect").is_some();
    let status = req.headers().get("x-session-status");
    if expected && status.is_some_and(|s| s != "existing") {
        LOST.fetch_add(1, Ordering::Relaxed);
    }
    let mut resp = Response::builder().header("content-type", "text/plain");
    let body = if path.starts_with("/static/") {
        "static content\n".to_string()
    } else if path == "/count" {
        let n = visits(&req) + 1;
        resp = resp.header("X-Session-Set", format!("{{\"num_visits\":{n}}}"));
        format!("You have visited this page {n} times.\n")
    } else {
        format!("You have visited this page {} times.\n", visits(&req))
    };
    Ok(resp.body(Full::new(Bytes::from(body))).unwrap())
}

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(18000);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
            loop {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service_fn(app))
                        .await;
                });
            }
        })
}
