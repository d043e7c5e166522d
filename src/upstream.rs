//! The pooled HTTP/1.1 client to the upstream: URI rewrite, timeouts, and the 502/504 mapping.
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
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;

use crate::error::ProxyError;

#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Watched>,
    authority: Authority,
    timeout: Duration,
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

/// The client's request body on its way upstream, reporting its progress (none to report for
/// a request without a body).
pub struct Watched {
    inner: Incoming,
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

impl Upstream {
    pub fn new(authority: Authority, timeout: Duration) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .set_host(false)
            .build(connector);
        Upstream {
            client,
            authority,
            timeout,
        }
    }

    /// Sends `req` (its URI is rewritten to the upstream; headers are the caller's business)
    /// and waits for the response head: at most the configured timeout once the request body
    /// is sent.
    pub async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        uri.path_and_query = Some(path);
        parts.uri = Uri::from_parts(uri).expect("scheme, authority and path are valid");
        parts.version = Version::HTTP_11;
        if body.is_end_stream() {
            let body = Watched {
                inner: body,
                progress: None,
            };
            return self
                .head(self.client.request(Request::from_parts(parts, body)))
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
        let response = self.client.request(Request::from_parts(parts, body));
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
                r = &mut response => return self.answer(r),
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
        response: impl std::future::Future<
            Output = Result<Response<Incoming>, hyper_util::client::legacy::Error>,
        >,
    ) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(self.timeout, response).await {
            Ok(r) => self.answer(r),
            Err(_) => Err(ProxyError::UpstreamTimeout(self.timeout.as_secs())),
        }
    }

    fn answer(
        &self,
        r: Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let e = match r {
            Ok(resp) => return Ok(resp),
            Err(e) => e,
        };
        // The whole chain goes to the log; the client's body says only what happened.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        Err(if e.is_connect() {
            ProxyError::UpstreamDown(text)
        } else {
            ProxyError::UpstreamBroken(text)
        })
    }
}
