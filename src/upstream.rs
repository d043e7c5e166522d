//! The pooled HTTP/1.1 client to the upstream: URI rewrite, timeout, and the 502/504 mapping.

use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::ProxyError;

#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Incoming>,
    authority: Authority,
    timeout: Duration,
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
    /// and waits at most the configured timeout for the response head.
    pub async fn send(&self, mut req: Request<Incoming>) -> Result<Response<Incoming>, ProxyError> {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        *req.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path are valid");
        *req.version_mut() = Version::HTTP_11;
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
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
            Err(_) => Err(ProxyError::UpstreamTimeout(self.timeout.as_secs())),
        }
    }
}
