//! The operator's listener (docs/HEADERS.md §8): health, readiness, metrics, and looking at or ending
//! sessions by key or by subject. Loopback by default; with `[admin] token` every endpoint but
//! `/healthz` and `/readyz` wants `Authorization: Bearer <token>`.
//!
//! No answer contains a session key, not even an echo of the one asked about: an app sharing
//! the loopback (a pod, a host) could otherwise turn a server-side request forgery into a
//! session hijack. Sessions are named by their handle ([`id::handle`]), a one-way digest.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::session::{Cell, Clock, Millis, Record, Storage, StoreError, chain, id};
use crate::settings::Settings;

pub struct Admin {
    pub store: Storage,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// The cookie (to read a cookie value) and the token, as the latest reload left them.
    pub settings: watch::Receiver<Arc<Settings>>,
    /// Set when the sidecar starts draining: `/readyz` answers 503 so orchestrators stop
    /// sending traffic.
    pub draining: Arc<AtomicBool>,
}

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, body: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, value: serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Token comparison whose time depends neither on where the inputs differ nor on their lengths:
/// both are hashed to 32 bytes first, then compared without an early exit.
fn same_token(given: &[u8], token: &[u8]) -> bool {
    use sha2::Digest;
    let (a, b) = (sha2::Sha256::digest(given), sha2::Sha256::digest(token));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// A path segment percent-decoded (`a%3Fx` → `a?x`); `None` if it is not UTF-8 once decoded.
fn decode(segment: &str) -> Option<String> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

fn rfc3339(ms: Millis) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl Admin {
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let settings = self.settings.borrow().clone();
        let Some(token) = &settings.config.admin.token else {
            return true;
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        same_token(given.as_bytes(), token.as_bytes())
    }

    /// The session a path names: a handle as `/subjects` lists it, a raw key, or a cookie
    /// value.
    async fn named(&self, text: &str) -> Result<Option<Named>, StoreError> {
        if id::is_handle(text) {
            return Ok(self.store.find_handle(text).await?.map(Named::Stored));
        }
        if id::is_well_formed(text) {
            return Ok(Some(Named::Key(text.to_string())));
        }
        let cookie = self.settings.borrow().cookie.clone();
        Ok(cookie.verify(text).map(Named::Key))
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Resp {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        match (method.clone(), path.as_str()) {
            (Method::GET, "/healthz") => return text(StatusCode::OK, "ok"),
            (Method::GET, "/readyz") => {
                if self.draining.load(Ordering::SeqCst) {
                    return text(StatusCode::SERVICE_UNAVAILABLE, "draining");
                }
                return match self.store.ping().await {
                    Ok(()) => text(StatusCode::OK, "ready"),
                    Err(e) => {
                        tracing::warn!(error = %chain(&e), "readiness: the store does not answer");
                        text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the session store does not answer",
                        )
                    }
                };
            }
            _ => {}
        }
        if !self.authorized(&req) {
            return text(StatusCode::UNAUTHORIZED, "unauthorized");
        }
        let now = self.clock.now();
        let result = match (method, path.as_str()) {
            (Method::GET, "/metrics") => {
                let mut r = text(StatusCode::OK, &self.metrics.encode());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(r)
            }
            (m, p) if p.starts_with("/sessions/") => match decode(&p["/sessions/".len()..]) {
                Some(k) => self.session(m, &k, now).await,
                None => Ok(text(StatusCode::NOT_FOUND, "no such session")),
            },
            (m, p) if p.starts_with("/subjects/") => match decode(&p["/subjects/".len()..]) {
                Some(s) => self.subject(m, &s, now).await,
                None => Ok(text(StatusCode::BAD_REQUEST, "a subject is UTF-8")),
            },
            _ => Ok(text(StatusCode::NOT_FOUND, "no such endpoint")),
        };
        result.unwrap_or_else(|e| {
            tracing::error!(error = %chain(&e), "admin request failed");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the session store is unavailable",
            )
        })
    }

    async fn session(&self, method: Method, raw: &str, now: Millis) -> Result<Resp, StoreError> {
        let Some(named) = self.named(raw).await? else {
            return Ok(text(StatusCode::NOT_FOUND, "no such session"));
        };
        match method {
            Method::GET => {
                // By handle, the store holds no subject in clear: whether there is one is all
                // it can say (docs/ADMIN.md).
                let found = match &named {
                    Named::Key(key) => self.store.load(key, now).await?.map(|r| {
                        let tagged = r.subject.is_some();
                        (id::handle(key), r, tagged)
                    }),
                    Named::Stored(cell) => self
                        .store
                        .load_stored(cell, now)
                        .await?
                        .map(|(r, tagged)| (cell.handle(), r, tagged)),
                };
                Ok(match found {
                    Some((handle, r, tagged)) => {
                        let mut body = metadata(&handle, &r, r.subject.as_deref(), tagged);
                        body["data"] = serde_json::Value::Object(r.data);
                        json(StatusCode::OK, body)
                    }
                    None => text(StatusCode::NOT_FOUND, "no such session"),
                })
            }
            Method::DELETE => {
                let ended = match &named {
                    Named::Key(key) => {
                        self.store.load(key, now).await?.is_some() && self.store.remove(key).await?
                    }
                    Named::Stored(cell) => {
                        self.store.load_stored(cell, now).await?.is_some()
                            && self.store.remove_stored(cell).await?
                    }
                };
                if ended {
                    self.store.sync().await?;
                    self.metrics.sessions_flushed.inc();
                    tracing::info!("session ended through the admin interface");
                    Ok(Response::builder()
                        .status(StatusCode::NO_CONTENT)
                        .body(Full::new(Bytes::new()))
                        .expect("static response"))
                } else {
                    Ok(text(StatusCode::NOT_FOUND, "no such session"))
                }
            }
            _ => Ok(text(StatusCode::METHOD_NOT_ALLOWED, "use GET or DELETE")),
        }
    }

    async fn subject(
        &self,
        method: Method,
        subject: &str,
        now: Millis,
    ) -> Result<Resp, StoreError> {
        let found = self.store.subject_sessions(subject, now).await?;
        match method {
            Method::GET => {
                let sessions: Vec<_> = found
                    .iter()
                    .map(|(cell, r)| metadata(&cell.handle(), r, Some(subject), true))
                    .collect();
                Ok(json(
                    StatusCode::OK,
                    json!({"subject": subject, "sessions": sessions}),
                ))
            }
            Method::DELETE => {
                let mut ended = 0;
                for (cell, _) in &found {
                    if self.store.remove_stored(cell).await? {
                        ended += 1;
                    }
                }
                self.store.sync().await?;
                self.metrics.sessions_flushed.inc_by(ended);
                tracing::info!(subject, ended, "subject's sessions revoked");
                Ok(json(
                    StatusCode::OK,
                    json!({"subject": subject, "revoked": ended}),
                ))
            }
            _ => Ok(text(StatusCode::METHOD_NOT_ALLOWED, "use GET or DELETE")),
        }
    }
}

/// What a path names: a session by its key, or one the store holds under a handle.
enum Named {
    Key(String),
    Stored(Cell),
}

/// A session's handle and metadata: never its key. `subject` where known (by key, or the
/// subject asked for), and whether it has one.
fn metadata(handle: &str, r: &Record, subject: Option<&str>, tagged: bool) -> serde_json::Value {
    json!({
        "handle": handle,
        "created": rfc3339(r.created),
        "last_activity": rfc3339(r.accessed),
        "last_saved": rfc3339(r.saved),
        "expires": rfc3339(r.deadline),
        "subject": subject,
        "tagged": tagged,
    })
}

/// Serves the admin listener until `stop` turns true.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::error!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_whole() {
        assert!(same_token(b"s3cret-token", b"s3cret-token"));
        for wrong in [
            &b""[..],
            b"s3cret",
            b"s3cret-token-and-more",
            b"S3cret-token",
        ] {
            assert!(!same_token(wrong, b"s3cret-token"));
        }
    }

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(decode("a%3Fx%2F%23").as_deref(), Some("a?x/#"));
        assert_eq!(decode("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(decode("%FF"), None);
    }
}
