//! The accept loop: HTTP/1.1 (keep-alive, upgrades) and h2c through hyper-util's auto builder,
//! and the graceful drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Sidecar;

async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(TOO_MANY_CONNECTIONS).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Counts requests whose response has not been fully sent; the guard lives in the response body.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> InFlight {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a client gets when `max_connections` are already open: a plain answer, then a close.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 52\r\nconnection: close\r\nretry-after: 1\r\n\r\ntoo many open connections; please retry in a moment\n";

/// Serves until `shutdown` resolves, then stops accepting and waits up to `shutdown_grace` for
/// the requests in flight. Returns how many requests were cut when the grace ran out.
pub async fn serve(
    listener: TcpListener,
    sidecar: Arc<Sidecar>,
    shutdown: impl Future<Output = ()>,
    config: &Config,
    metrics: Arc<Metrics>,
) -> usize {
    let grace = config.shutdown_grace;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The HTTP layer's own limits sit above the configured ones, so that the sidecar itself
    // answers most oversized heads with a plain-text 431 (proxy.rs); only far larger ones meet
    // hyper's bare 431.
    builder
        .http1()
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size((config.max_header_bytes * 2).max(16 * 1024))
        .max_headers(config.max_headers * 2);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size((config.max_header_bytes * 2).min(u32::MAX as usize) as u32);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = config.max_connections, "connection refused: max_connections reached");
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let sidecar = sidecar.clone();
        let in_flight = in_flight.clone();
        let service = service_fn(move |req| {
            let sidecar = sidecar.clone();
            let guard = InFlight::enter(&in_flight);
            async move {
                let resp = sidecar.handle(req, peer).await;
                Ok::<_, std::convert::Infallible>(resp.map(|body| {
                    body.map_frame(move |frame| {
                        let _ = &guard;
                        frame
                    })
                    .boxed()
                }))
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        let open = metrics.open_connections.clone();
        open.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
            open.dec();
        });
    }
    drop(listener);
    tracing::info!(
        grace_s = grace.as_secs(),
        "shutting down: listener closed, draining requests"
    );
    tokio::select! {
        _ = graceful.shutdown() => 0,
        _ = tokio::time::sleep(grace) => in_flight.load(Ordering::SeqCst).max(1),
    }
}
