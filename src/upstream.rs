//! The HTTP/1.1 client to the upstream: a worker's own pool of keep-alive connections, URI
//! rewrite, timeouts, and the 502/504 mapping.
//!
//! Each worker thread has its own [`Upstream`] (see `server.rs`): a request goes out on a
//! connection of the thread that accepted it, straight through hyper's `client::conn`, and the
//! connection goes back to that thread's idle list when the response body has been read to its
//! end. A connection the app closed while idle is noticed before use; one that closed just as
//! a request was handed to it gives the request back, and the request goes on a new connection.
//!
//! The upstream's timeout starts once the client's request body has been sent: a slow upload is
//! the client's time, not the app's (a 504 would blame the app). While the body is still coming,
//! a client that sends nothing for the same timeout gets 408; an upstream that stops reading it
//! meanwhile gets the 504.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;

use crate::config::UpstreamAddr;
use crate::error::{ConnectFailure, ProxyError};

/// An idle connection is closed after this long unused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections a worker keeps; more are closed when their response ends (nginx's usual
/// `keepalive 32`). An app server that serves a fixed number of connections (waitress: 100, a
/// process-per-connection server) accepts nothing new while all of them sit idle in a pool, so
/// after a burst beyond its limit a deep pool would leave the connections still queued in its
/// backlog unserved until the upstream timeout: the pool gives the surplus back at once.
const MAX_IDLE: usize = 32;

type Sender = SendRequest<Watched>;

/// A worker's idle connections to the upstream, most recently used last.
#[derive(Default)]
struct Pool {
    idle: std::sync::Mutex<Vec<(Sender, Instant)>>,
}

impl Pool {
    fn take(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((sender, since)) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    fn give_back(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // The oldest sit at the bottom, where a busy worker never reaches: close those that
        // have waited too long, so that the idle limit holds under traffic too.
        let stale = idle
            .iter()
            .take_while(|(_, since)| since.elapsed() >= IDLE_TIMEOUT)
            .count();
        idle.drain(..stale);
        if idle.len() < MAX_IDLE {
            idle.push((sender, Instant::now()));
        }
    }
}

/// Why no response came.
enum Failure {
    /// No connection could be made.
    Connect(ConnectFailure),
    /// The exchange on a connection failed.
    Http(hyper::Error),
}

pub struct Upstream {
    pool: Arc<Pool>,
    addr: UpstreamAddr,
    timeout: Duration,
}

/// The upstream's response body: when it has been read to its end, its connection goes back
/// to the worker's idle list.
pub struct ResponseBody {
    inner: Incoming,
    back: Option<(Sender, Arc<Pool>)>,
}

impl ResponseBody {
    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            pool.give_back(sender);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            // A connection whose response failed halfway is not reused.
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How far the client's request body has come.
struct Progress {
    started: Instant,
    /// Milliseconds after `started` of the last frame from the client.
    last_ms: AtomicU64,
    /// The upstream connection asked for more and the client has not sent it yet.
    waiting_on_client: AtomicBool,
    done: AtomicBool,
    finished: Notify,
}

impl Progress {
    fn mark(&self) {
        self.last_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::SeqCst);
    }

    fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.finished.notify_waiters();
    }

    fn quiet_for(&self) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::SeqCst)))
    }
}

/// A request body for the upstream: the client's, streamed as it comes, or one the sidecar has
/// read already (a form whose CSRF token field it checked).
pub enum RequestBody {
    Streamed(Incoming),
    Read(Option<Bytes>),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streamed(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Read(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(body) => body.is_end_stream(),
            RequestBody::Read(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(body) => body.size_hint(),
            RequestBody::Read(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// The client's request body on its way upstream, reporting its progress (none to report for
/// a request without a body).
pub struct Watched {
    inner: RequestBody,
    progress: Option<Arc<Progress>>,
}

impl Body for Watched {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let Some(p) = &self.progress else {
            return polled;
        };
        match &polled {
            Poll::Pending => p.waiting_on_client.store(true, Ordering::SeqCst),
            Poll::Ready(Some(Ok(_))) => {
                p.waiting_on_client.store(false, Ordering::SeqCst);
                p.mark();
                if self.inner.is_end_stream() {
                    p.finish();
                }
            }
            Poll::Ready(_) => p.finish(),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(p) = &self.progress {
            p.finish();
        }
    }
}

/// HTTP/1.1 over a connected stream, its driver running on this worker.
async fn handshake<S>(stream: S) -> Result<Sender, Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(Failure::Http)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

impl Upstream {
    pub fn new(addr: UpstreamAddr, timeout: Duration) -> Upstream {
        Upstream {
            pool: Arc::new(Pool::default()),
            addr,
            timeout,
        }
    }

    /// This worker's upstream at a reloaded address and timeout; the idle connections stay
    /// when the address is the same.
    pub fn reconfigured(&self, addr: &UpstreamAddr, timeout: Duration) -> Upstream {
        Upstream {
            pool: if *addr == self.addr {
                self.pool.clone()
            } else {
                Arc::new(Pool::default())
            },
            addr: addr.clone(),
            timeout,
        }
    }

    /// A new connection to the upstream, its driver running on this worker.
    async fn connect(&self) -> Result<Sender, Failure> {
        match &self.addr {
            UpstreamAddr::Tcp(authority) => {
                let host = authority.host();
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                let port = authority.port_u16().unwrap_or(80);
                let stream = self.within(TcpStream::connect((host, port))).await?;
                let _ = stream.set_nodelay(true);
                handshake(stream).await
            }
            UpstreamAddr::Unix(path) => {
                handshake(self.within(UnixStream::connect(path)).await?).await
            }
        }
    }

    /// A connection attempt, within the upstream timeout.
    async fn within<S>(
        &self,
        connect: impl std::future::Future<Output = std::io::Result<S>>,
    ) -> Result<S, Failure> {
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(Failure::Connect(e.into())),
            Err(_) => Err(Failure::Connect(ConnectFailure::TimedOut(
                self.timeout.as_secs(),
            ))),
        }
    }

    /// Sends `req` on an idle connection if one is ready, else on a new one; a request an idle
    /// connection could not take (it had just closed) goes on the next.
    async fn exchange(&self, mut req: Request<Watched>) -> Result<Response<ResponseBody>, Failure> {
        loop {
            let (mut sender, pooled) = match self.pool.take() {
                Some(mut sender) => match sender.ready().await {
                    Ok(()) => (sender, true),
                    Err(_) => continue,
                },
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, inner) = resp.into_parts();
                    let mut body = ResponseBody {
                        inner,
                        back: (parts.status != http::StatusCode::SWITCHING_PROTOCOLS)
                            .then(|| (sender, self.pool.clone())),
                    };
                    if body.inner.is_end_stream() {
                        body.give_back();
                    }
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match e.take_message() {
                    Some(again) if pooled => req = again,
                    _ => return Err(Failure::Http(e.into_error())),
                },
            }
        }
    }

    /// Sends `req` (its URI is rewritten to the upstream; headers are the caller's business)
    /// and waits for the response head: at most the configured timeout once the request body
    /// is sent.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        // Origin form: the request line carries the path and query only.
        parts.uri = Uri::from(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        parts.version = Version::HTTP_11;
        if body.is_end_stream() {
            // RFC 9110 §8.6: a request whose method gives content a meaning states its length,
            // even 0. A client may leave it out of an empty POST (`curl -X POST`, a script's
            // fetch) and HTTP/1.1 still frames that as empty, but lighttpd (and other strict
            // servers) answer it 411 Length Required; browsers always send it.
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
                && !parts.headers.contains_key(CONTENT_LENGTH)
            {
                parts
                    .headers
                    .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
            }
            let body = Watched {
                inner: body,
                progress: None,
            };
            return self
                .head(self.exchange(Request::from_parts(parts, body)))
                .await;
        }
        let progress = Arc::new(Progress {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            waiting_on_client: AtomicBool::new(false),
            done: AtomicBool::new(false),
            finished: Notify::new(),
        });
        let body = Watched {
            inner: body,
            progress: Some(progress.clone()),
        };
        let response = self.exchange(Request::from_parts(parts, body));
        tokio::pin!(response);
        // While the body is coming: no deadline for the app, an idle deadline for the client.
        while !progress.done.load(Ordering::SeqCst) {
            let finished = progress.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if progress.done.load(Ordering::SeqCst) {
                break;
            }
            let quiet = self.timeout.saturating_sub(progress.quiet_for());
            tokio::select! {
                r = &mut response => return answer(r, &self.addr),
                _ = finished => {}
                _ = tokio::time::sleep(quiet) => {
                    if progress.quiet_for() >= self.timeout {
                        return Err(if progress.waiting_on_client.load(Ordering::SeqCst) {
                            ProxyError::ClientTimeout(self.timeout.as_secs())
                        } else {
                            ProxyError::UpstreamTimeout(self.timeout.as_secs())
                        });
                    }
                }
            }
        }
        self.head(response).await
    }

    /// The response head, within the timeout.
    async fn head(
        &self,
        response: impl std::future::Future<Output = Result<Response<ResponseBody>, Failure>>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        match tokio::time::timeout(self.timeout, response).await {
            Ok(r) => answer(r, &self.addr),
            Err(_) => Err(ProxyError::UpstreamTimeout(self.timeout.as_secs())),
        }
    }
}

fn answer(
    r: Result<Response<ResponseBody>, Failure>,
    addr: &impl std::fmt::Display,
) -> Result<Response<ResponseBody>, ProxyError> {
    match r {
        Ok(resp) => Ok(resp),
        Err(Failure::Connect(source)) => Err(ProxyError::UpstreamDown {
            addr: addr.to_string(),
            source,
        }),
        Err(Failure::Http(e)) => Err(ProxyError::UpstreamBroken(e)),
    }
}
