//! Responses the sidecar produces itself, and the one place that picks their status code.
//!
//! Each error says whose fault it is: the client's (400), the upstream's (502/504), or the
//! sidecar's own store (503). That choice also picks the log level.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::headers::BadHeader;
use crate::session::{Unavailable, chain};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the sidecar sends: the upstream's, streamed, or its own text.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Why a connection to the app could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0} s")]
    TimedOut(u64),
}

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
    #[error("the application is unreachable: connecting to {addr}")]
    UpstreamDown {
        addr: String,
        source: ConnectFailure,
    },
    #[error("the application's answer was broken (not HTTP, too large, or cut off)")]
    UpstreamBroken(#[source] hyper::Error),
    #[error("the application did not answer within {0} seconds")]
    UpstreamTimeout(u64),
    #[error("the request body stalled: nothing arrived for {0} seconds")]
    ClientTimeout(u64),
    /// A cross-site request forgery defence refused the request (`[csrf]`); the app never saw it.
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("the form is larger than the {0} bytes read to find its CSRF token")]
    FormTooLarge(usize),
    #[error("the request body could not be read")]
    ClientBody(#[source] BoxError),
    /// `[limits] new_sessions_per_minute`: retry after this many seconds.
    #[error("too many new sessions from this address; retry in {0} s")]
    TooManySessions(u64),
    #[error(transparent)]
    Store(#[from] Unavailable),
}

/// Whose fault an error is: the client's is logged at warn level, the others at error level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Store,
}

/// How the sidecar answers one kind of error.
struct Answer {
    status: StatusCode,
    fault: Fault,
    /// What the client reads instead of the error's own text, where that text (its sources)
    /// carries paths, addresses or library internals that only the log should have.
    public: Option<&'static str>,
}

impl ProxyError {
    /// The one place each kind of error gets its status, its fault and what the client reads.
    fn answer(&self) -> Answer {
        use ProxyError::*;
        let (status, fault, public) = match self {
            SessionEnded => (StatusCode::BAD_REQUEST, Fault::Client, None),
            HeadTooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                Fault::Client,
                None,
            ),
            ClientTimeout(_) => (StatusCode::REQUEST_TIMEOUT, Fault::Client, None),
            Forbidden(_) => (StatusCode::FORBIDDEN, Fault::Client, None),
            FormTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, Fault::Client, None),
            ClientBody(_) => (StatusCode::BAD_REQUEST, Fault::Client, None),
            TooManySessions(_) => (StatusCode::TOO_MANY_REQUESTS, Fault::Client, None),
            BadHeader(_) => (StatusCode::BAD_GATEWAY, Fault::Upstream, None),
            UpstreamDown { .. } => (
                StatusCode::BAD_GATEWAY,
                Fault::Upstream,
                Some("the application is unreachable"),
            ),
            UpstreamBroken(_) => (StatusCode::BAD_GATEWAY, Fault::Upstream, None),
            UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, Fault::Upstream, None),
            Store(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Fault::Store,
                Some("the session store is unavailable; please retry later"),
            ),
        };
        Answer {
            status,
            fault,
            public,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.answer().status
    }

    #[cfg(test)]
    fn fault(&self) -> Fault {
        self.answer().fault
    }

    /// Logs at the level the fault deserves, with the whole chain of sources, and builds the
    /// plain-text answer (no session cookie): the error's own words, never its sources.
    pub fn into_response(self) -> Response<Body> {
        let answer = self.answer();
        let status = answer.status.as_u16();
        let chain = chain(&self);
        match answer.fault {
            Fault::Client => tracing::warn!(status, "{chain}"),
            Fault::Upstream | Fault::Store => tracing::error!(status, "{chain}"),
        }
        let text = answer
            .public
            .map_or_else(|| self.to_string(), str::to_string);
        let mut resp = text_response(answer.status, text);
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_text(resp: Response<Body>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn a_bad_header_is_named_once_in_the_log() {
        let e = ProxyError::BadHeader(crate::headers::BadHeader {
            header: "X-Session-Set".into(),
            problem: "the session would be 9010 bytes".into(),
        });
        assert_eq!(
            chain(&e),
            "the application sent a bad session header: X-Session-Set: the session would be 9010 bytes"
        );
    }

    #[tokio::test]
    async fn the_log_gets_every_source_and_the_client_only_the_gist() {
        let refused =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused at 10.1.2.3");
        let e = ProxyError::UpstreamDown {
            addr: "app:8000".into(),
            source: ConnectFailure::Io(refused),
        };
        assert_eq!(
            (e.status(), e.fault()),
            (StatusCode::BAD_GATEWAY, Fault::Upstream)
        );
        let logged = chain(&e);
        assert!(
            logged.contains("app:8000") && logged.contains("refused at 10.1.2.3"),
            "{logged}"
        );
        let body = body_text(e.into_response()).await;
        assert_eq!(body, "the application is unreachable\n");
        let timed_out: crate::session::BoxError = "10.0.0.7:6379 timed out".into();
        let store =
            ProxyError::Store(crate::session::StoreError::Backend("redis", timed_out).into());
        assert_eq!(
            (store.status(), store.fault()),
            (StatusCode::SERVICE_UNAVAILABLE, Fault::Store)
        );
        assert!(!body_text(store.into_response()).await.contains("10.0.0.7"));
        let limited = ProxyError::TooManySessions(7);
        assert_eq!(limited.fault(), Fault::Client);
        let resp = limited.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
    }
}
