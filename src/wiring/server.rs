//! The accept loop: HTTP/1.1 (keep-alive, upgrades) and h2c through hyper-util's auto builder,
//! idle connections closed, and the graceful drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::config::Config;
use crate::drain::{Guard, Tracker};
use crate::error::Body;
use crate::metrics::Metrics;
use crate::proxy::Worker;

/// One connection's requests in flight and the time its last one finished, for the idle
/// timeout.
struct Activity {
    busy: AtomicUsize,
    idle_since_ms: AtomicU64,
    born: Instant,
}

impl Activity {
    fn idle_for(&self) -> Option<Duration> {
        if self.busy.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
        Some(self.born.elapsed().saturating_sub(since))
    }
}

/// A request in flight on a connection: counted globally and on its connection.
struct InFlight {
    _global: Guard,
    activity: Arc<Activity>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.activity;
        a.idle_since_ms
            .store(a.born.elapsed().as_millis() as u64, Ordering::SeqCst);
        a.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in flight until the body is dropped
/// (fully sent, or the connection gone).
struct Guarded {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = crate::error::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(TOO_MANY_CONNECTIONS).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// hyper's own limit on the number of request headers when none is set.
const HYPER_MAX_HEADERS: usize = 100;

/// How long a connection asked to close, with nothing in flight, may take to do so.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What a client gets when `max_connections` are already open: a plain answer, then a close.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 52\r\nconnection: close\r\nretry-after: 1\r\n\r\ntoo many open connections; please retry in a moment\n";

/// What every worker shares: the HTTP settings, the connection limit, the counters.
struct Shared {
    builder: auto::Builder<TokioExecutor>,
    connections: Arc<Semaphore>,
    max_connections: usize,
    idle: Duration,
    metrics: Arc<Metrics>,
    tracker: Arc<Tracker>,
}

/// Serves until `shutdown` resolves, then stops accepting, marks the sidecar as draining and
/// waits up to `shutdown_grace` for requests, connections and spliced upgrades. Returns how many
/// requests were still in flight when the grace ran out (0 after a clean drain).
///
/// Each `(listener, worker)` pair is served by a thread of its own running a single-threaded
/// event loop: a connection, its requests and its upstream connections stay on that thread, so
/// a request never waits for another core to pick up its wake-up. The caller's runtime only
/// waits for the shutdown and runs the drain.
pub async fn serve(
    workers: Vec<(std::net::TcpListener, Arc<Worker>)>,
    shutdown: impl Future<Output = ()>,
    config: &Config,
    metrics: Arc<Metrics>,
    tracker: Arc<Tracker>,
) -> std::io::Result<usize> {
    let grace = config.shutdown_grace;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The HTTP layer's own limits sit above the configured ones, so that the sidecar itself
    // answers most oversized heads with a plain-text 431 (proxy.rs); only far larger ones meet
    // hyper's bare 431. hyper's header-count limit stays at its own 100 unless the configured
    // one is higher: any other value costs every request a heap-allocated, element-by-element
    // initialised parse buffer (about 6 % of a pass-through request's instructions).
    let mut http1 = builder.http1();
    http1
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size((config.max_header_bytes * 2).max(16 * 1024));
    if config.max_headers > HYPER_MAX_HEADERS {
        http1.max_headers(config.max_headers * 2);
    }
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size((config.max_header_bytes * 2).min(u32::MAX as usize) as u32);
    let shared = Arc::new(Shared {
        builder,
        connections: Arc::new(Semaphore::new(config.max_connections)),
        max_connections: config.max_connections,
        idle: config.idle_connection_timeout,
        metrics,
        tracker: tracker.clone(),
    });
    let (stop, _) = watch::channel(false);
    let (finished, _) = watch::channel(false);
    let mut exited = Vec::new();
    let mut started = Vec::new();
    for (i, (listener, worker)) in workers.into_iter().enumerate() {
        let (exit_tx, exit_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<std::io::Result<()>>();
        let (shared, stop_rx, mut finished_rx) =
            (shared.clone(), stop.subscribe(), finished.subscribe());
        listener.set_nonblocking(true)?;
        let thread = std::thread::Builder::new()
            .name(format!("sidecar-worker-{i}"))
            .spawn(move || {
                crate::metrics::set_shard(i + 1);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            let _ = ready_tx.send(Ok(()));
                            accept(listener, worker, stop_rx, &shared).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                    // Connections keep running on this thread until the drain is over.
                    let _ = finished_rx.wait_for(|f| *f).await;
                });
                drop(runtime);
                let _ = exit_tx.send(());
            });
        exited.push(exit_rx);
        started.push(thread.map(|_| ready_rx));
    }
    // Every worker serves, or none does: a sidecar quietly running on fewer threads than it
    // was given would be a mystery to its operator.
    for ready in started {
        let failed = match ready {
            Err(e) => Some(e),
            Ok(ready) => match ready.await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(std::io::Error::other(
                    "a worker thread ended while starting",
                )),
            },
        };
        if let Some(e) = failed {
            let _ = stop.send(true);
            let _ = finished.send(true);
            for worker in exited {
                let _ = worker.await;
            }
            return Err(e);
        }
    }
    shutdown.await;
    let _ = stop.send(true);
    let cut = crate::drain::drain(&tracker, grace).await;
    let _ = finished.send(true);
    for worker in exited {
        let _ = worker.await;
    }
    Ok(cut)
}

/// One worker's accept loop, until `stop`.
async fn accept(
    listener: TcpListener,
    worker: Arc<Worker>,
    mut stop: watch::Receiver<bool>,
    shared: &Arc<Shared>,
) {
    let (idle, tracker, connections) = (shared.idle, &shared.tracker, &shared.connections);
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
            _ = stop.wait_for(|s| *s) => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = shared.max_connections, "connection refused: max_connections reached");
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity {
            busy: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            born: Instant::now(),
        });
        let service = {
            let (worker, tracker, activity) = (worker.clone(), tracker.clone(), activity.clone());
            service_fn(move |req| {
                let worker = worker.clone();
                activity.busy.fetch_add(1, Ordering::SeqCst);
                let guard = InFlight {
                    _global: tracker.request(),
                    activity: activity.clone(),
                };
                async move {
                    let resp = worker.handle(req, peer).await;
                    Ok::<_, std::convert::Infallible>(resp.map(|body| Guarded {
                        body,
                        _in_flight: guard,
                    }))
                }
            })
        };
        let connection = tracker.connection();
        let open = shared.metrics.open_connections.clone();
        let shared = shared.clone();
        let mut drain = tracker.draining();
        open.inc();
        tokio::spawn(async move {
            let conn = shared
                .builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            // When the connection was asked to close: a peer that never answers the shutdown
            // (an h2 client that ignores GOAWAY's ping) is cut once nothing is in flight.
            let mut closing: Option<Instant> = None;
            loop {
                let check = match closing {
                    Some(_) => CLOSE_WAIT,
                    None => activity
                        .idle_for()
                        .map_or(idle, |spent| idle.saturating_sub(spent)),
                };
                tokio::select! {
                    done = conn.as_mut() => {
                        if let Err(e) = done {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = drain.wait_for(|d| *d), if closing.is_none() => {
                        closing = Some(Instant::now());
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = tokio::time::sleep(check) => match closing {
                        None => {
                            if activity.idle_for().is_some_and(|spent| spent >= idle) {
                                tracing::debug!(%peer, "closing an idle connection");
                                closing = Some(Instant::now());
                                conn.as_mut().graceful_shutdown();
                            }
                        }
                        Some(since) => {
                            if since.elapsed() >= CLOSE_WAIT && activity.idle_for().is_some() {
                                tracing::debug!(%peer, "cutting a connection that did not close");
                                break;
                            }
                        }
                    },
                }
            }
            drop(permit);
            open.dec();
            drop(connection);
        });
    }
}
