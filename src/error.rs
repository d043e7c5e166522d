//! Responses the sidecar produces itself, and the one place that picks their status code.
//!
//! Each error says whose fault it is: the client's (400), the upstream's (502/504), or the
//! sidecar's own store (503). That choice also picks the log level.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::headers::BadHeader;
use crate::session::store::StoreError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the sidecar sends: the upstream's, streamed, or its own text.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The session ended (flushed elsewhere, expired) while this request was in flight, and
    /// storing its changes would bring it back.
    #[error(
        "your session ended while this request was being handled (logged out in another tab, or expired); please retry"
    )]
    SessionEnded,
    #[error("request header fields too large: {0}")]
    HeadTooLarge(String),
    #[error("the application sent a bad session header: {0}")]
    BadHeader(#[from] BadHeader),
    #[error("the application is unreachable: {0}")]
    UpstreamDown(String),
    #[error("the application's answer was broken (not HTTP, too large, or cut off): {0}")]
    UpstreamBroken(String),
    #[error("the application did not answer within {0} seconds")]
    UpstreamTimeout(u64),
    #[error("the request body stalled: nothing arrived for {0} seconds")]
    ClientTimeout(u64),
    /// A cross-site request forgery defence refused the request (`[csrf]`); the app never saw it.
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("the form is larger than the {0} bytes read to find its CSRF token")]
    FormTooLarge(usize),
    #[error("the request body could not be read: {0}")]
    ClientBody(String),
    /// `[limits] new_sessions_per_minute`: retry after this many seconds.
    #[error("too many new sessions from this address; retry in {0} s")]
    TooManySessions(u64),
    #[error("the session store is unavailable: {0}")]
    Store(#[from] StoreError),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::SessionEnded => StatusCode::BAD_REQUEST,
            ProxyError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BadHeader(_)
            | ProxyError::UpstreamDown(_)
            | ProxyError::UpstreamBroken(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::FormTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::TooManySessions(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Logs at the level the fault deserves and builds the plain-text answer (no session cookie).
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        match &self {
            ProxyError::SessionEnded
            | ProxyError::HeadTooLarge(_)
            | ProxyError::ClientTimeout(_)
            | ProxyError::Forbidden(_)
            | ProxyError::FormTooLarge(_)
            | ProxyError::ClientBody(_)
            | ProxyError::TooManySessions(_) => {
                tracing::warn!(status = status.as_u16(), "{self}")
            }
            _ => tracing::error!(status = status.as_u16(), "{self}"),
        }
        // Store and connection errors carry paths, addresses and library internals: the log
        // has them, the client only needs the gist.
        let text = match &self {
            ProxyError::Store(_) => {
                "the session store is unavailable; please retry later".to_string()
            }
            ProxyError::UpstreamDown(_) => "the application is unreachable".to_string(),
            ProxyError::UpstreamBroken(_) => {
                "the application's answer was broken (not HTTP, too large, or cut off)".to_string()
            }
            other => other.to_string(),
        };
        let mut resp = text_response(status, text);
        if let ProxyError::TooManySessions(secs) = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

pub fn text_response(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    let mut body = text.into();
    body.push('\n');
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}
