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
use tokio::net::TcpListener;

use crate::proxy::Sidecar;

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

/// Serves until `shutdown` resolves, then stops accepting and waits up to `grace` for the
/// requests in flight. Returns how many requests were cut when the grace ran out.
pub async fn serve(
    listener: TcpListener,
    sidecar: Arc<Sidecar>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> usize {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new());
    builder.http1().header_read_timeout(Duration::from_secs(30));
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
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
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
