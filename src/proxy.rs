//! The per-request pipeline, top to bottom: take our cookie → load the session → strip and
//! inject headers → forward → take the change headers → apply them atomically → set or delete
//! the cookie → stream the body back.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HOST, HeaderName, HeaderValue, SET_COOKIE, UPGRADE, VARY};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

use crate::config::Config;
use crate::cookie::{Presented, SessionCookie};
use crate::error::{Body, ProxyError};
use crate::headers;
use crate::metrics::{HeaderLabel, Metrics, Status};
use crate::session::changes::{self, Change};
use crate::session::store::{Liveness, Store, UpdateError, Updated};
use crate::session::{Clock, Data, Millis, Policy, Record, id, json, seconds_until};
use crate::upstream::Upstream;

/// What the access log says about a request, gathered on the way.
#[derive(Default)]
struct Access {
    /// The request carried our cookie, or the response sets or deletes it (`Vary: Cookie`).
    carried: bool,
    /// `new`, `existing`, or `-` on a skip path or before the session was looked at.
    session: &'static str,
    /// Data operations the upstream asked for.
    ops: usize,
    upstream_ms: f64,
}

/// What the response does with the browser's cookie.
#[derive(Debug, PartialEq)]
enum CookieAction {
    Keep,
    Set(String, Option<u64>),
    Remove,
}

/// The request headers the sidecar adds, named with the configured prefix.
struct Names {
    data: HeaderName,
    status: HeaderName,
    expiry_age: HeaderName,
    id: HeaderName,
}

pub struct Sidecar {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    policy: Arc<Policy>,
    cookie: SessionCookie,
    upstream: Upstream,
    names: Names,
    metrics: Arc<Metrics>,
}

fn header_name(prefix: &str, suffix: &str) -> HeaderName {
    HeaderName::from_bytes(format!("{prefix}{suffix}").as_bytes())
        .expect("the prefix was validated as a header name")
}

impl Sidecar {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        policy: Arc<Policy>,
        metrics: Arc<Metrics>,
    ) -> Sidecar {
        let p = &config.header_prefix;
        let names = Names {
            data: header_name(p, ""),
            status: header_name(p, "-status"),
            expiry_age: header_name(p, "-expiry-age"),
            id: header_name(p, "-id"),
        };
        Sidecar {
            cookie: SessionCookie::new(
                config.cookie.clone(),
                config.secret_key.as_deref(),
                &config.secret_key_fallbacks,
            ),
            upstream: Upstream::new(config.upstream.clone(), config.upstream_timeout),
            config,
            store,
            clock,
            policy,
            names,
            metrics,
        }
    }

    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = std::time::Instant::now();
        let logged = tracing::enabled!(target: "access", tracing::Level::INFO)
            .then(|| (req.method().clone(), req.uri().path().to_string()));
        let mut info = Access::default();
        let result = self.proxy(req, peer, &mut info).await;
        let mut resp = result.unwrap_or_else(|e| {
            if let ProxyError::BadHeader(b) = &e {
                let header = b.header.clone();
                self.metrics
                    .bad_upstream_headers
                    .get_or_create(&HeaderLabel { header })
                    .inc();
            }
            let status = e.status().as_u16().to_string();
            self.metrics
                .refusals
                .get_or_create(&Status { status })
                .inc();
            e.into_response()
        });
        self.metrics
            .observe_request(resp.status().as_u16(), started.elapsed());
        if info.carried && !varies_on_cookie(resp.headers()) {
            resp.headers_mut()
                .append(VARY, HeaderValue::from_static("Cookie"));
        }
        if let Some((method, path)) = logged {
            // The path without the query string: queries often carry secrets.
            tracing::info!(
                target: "access",
                %method,
                path,
                status = resp.status().as_u16(),
                bytes = hyper::body::Body::size_hint(resp.body()).exact(),
                latency_ms = started.elapsed().as_secs_f64() * 1000.0,
                upstream_ms = info.upstream_ms,
                session = info.session,
                ops = info.ops,
                "request"
            );
        }
        resp
    }

    async fn proxy(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        info: &mut Access,
    ) -> Result<Response<Body>, ProxyError> {
        self.check_head(&req)?;
        let mut req = req;
        let client_upgrade = req
            .headers()
            .contains_key(UPGRADE)
            .then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let prefix = self.config.header_prefix.as_str();
        let presented = self.cookie.take(&mut parts.headers);
        let skip = self
            .config
            .skip_paths
            .iter()
            .any(|p| parts.uri.path().starts_with(p.as_str()));
        info.carried = presented.carried && !skip;
        headers::take_ours(&mut parts.headers, prefix);
        let upgrade = client_upgrade.is_some();
        let host = parts
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()));
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        headers::set_forwarded(
            &mut parts.headers,
            peer.ip(),
            host.as_deref(),
            self.config.trust_forwarded,
        );
        if !parts.headers.contains_key(HOST)
            && let Some(v) = host.as_deref().and_then(|h| HeaderValue::from_str(h).ok())
        {
            parts.headers.insert(HOST, v);
        }

        if skip {
            let (mut rparts, rbody, upgrades) = self
                .forward(
                    Request::from_parts(parts, body),
                    client_upgrade,
                    &mut info.upstream_ms,
                )
                .await?;
            let taken = headers::take_ours(&mut rparts.headers, prefix);
            if !taken.is_empty() {
                tracing::warn!(
                    status = rparts.status.as_u16(),
                    "ignored session headers from the upstream on a skip path"
                );
            }
            return Ok(finish(rparts, rbody, upgrades));
        }

        let now = self.clock.now();
        let mut loaded = None;
        for key in &presented.keys {
            if let Some((r, version)) = self.store.load_versioned(key, now).await? {
                loaded = Some((key.clone(), r, version));
                break;
            }
        }
        let empty = Data::new();
        let snapshot = loaded.as_ref().map_or(&empty, |(_, r, _)| &r.data);
        let h = &mut parts.headers;
        h.insert(
            &self.names.data,
            HeaderValue::from_str(&json::encode_ascii(snapshot)).expect("ASCII JSON"),
        );
        let (status, age) = match &loaded {
            Some((_, r, _)) => ("existing", self.expiry_age(r, now)),
            None => ("new", self.policy.new_session_age()),
        };
        info.session = status;
        h.insert(&self.names.status, HeaderValue::from_static(status));
        h.insert(&self.names.expiry_age, HeaderValue::from(age));
        if self.config.expose_id
            && let Some((key, _, _)) = &loaded
        {
            h.insert(&self.names.id, HeaderValue::from_str(key).expect("hex key"));
        }

        let (mut rparts, rbody, upgrades) = self
            .forward(
                Request::from_parts(parts, body),
                client_upgrade,
                &mut info.upstream_ms,
            )
            .await?;
        let taken = headers::take_ours(&mut rparts.headers, prefix);
        if rparts.status.is_server_error() {
            if !taken.is_empty() {
                tracing::warn!(
                    status = rparts.status.as_u16(),
                    "upstream answered 5xx: its session headers were ignored"
                );
            }
            return Ok(finish(rparts, rbody, upgrades));
        }
        let (change, unknown) = headers::parse_changes(&taken, prefix, snapshot)?;
        info.ops = change.ops.len();
        for name in unknown {
            tracing::warn!(
                header = name,
                "ignored an unknown session header from the upstream"
            );
        }
        // The changes land against the store as it is now, not as it was when the request came
        // in: a session that expired meanwhile must not be revived.
        let now = self.clock.now();
        let action = match self.apply(loaded, &presented, &change, now).await {
            // Name the headers that carried the oversized data, as for any bad change header.
            Err(ProxyError::TooLarge(t)) => {
                let names: Vec<String> = taken
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .filter(|n| matches!(&n[prefix.len()..], "" | "-set" | "-delete"))
                    .map(headers::display_name)
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                return Err(ProxyError::BadHeader(headers::BadHeader {
                    header: names.join(", "),
                    problem: t.to_string(),
                }));
            }
            other => other?,
        };
        let mut resp = finish(rparts, rbody, upgrades);
        let h = resp.headers_mut();
        match action {
            CookieAction::Keep => return Ok(resp),
            CookieAction::Set(key, max_age) => {
                h.append(SET_COOKIE, self.cookie.set(&key, max_age, now));
            }
            CookieAction::Remove => {
                h.append(SET_COOKIE, self.cookie.removal());
            }
        }
        info.carried = true; // sets or deletes the cookie: Vary either way
        Ok(resp)
    }

    /// The configured limits on the request head (431 beyond them).
    fn check_head(&self, req: &Request<Incoming>) -> Result<(), ProxyError> {
        let count = req.headers().len();
        if count > self.config.max_headers {
            return Err(ProxyError::HeadTooLarge(format!(
                "{count} request headers, more than the {} allowed",
                self.config.max_headers
            )));
        }
        let uri = req.uri();
        let bytes = req.method().as_str().len()
            + uri.authority().map_or(0, |a| a.as_str().len())
            + uri.path_and_query().map_or(1, |p| p.as_str().len())
            + req
                .headers()
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if bytes > self.config.max_header_bytes {
            return Err(ProxyError::HeadTooLarge(format!(
                "the request head is {bytes} bytes, more than the {} allowed",
                self.config.max_header_bytes
            )));
        }
        Ok(())
    }

    /// Whole seconds left for a loaded session, counting this request as activity.
    fn expiry_age(&self, r: &Record, now: Millis) -> u64 {
        let accessed = if self.policy.touch_due(r, now) {
            now
        } else {
            r.accessed
        };
        seconds_until(self.policy.deadline_if_accessed(r, accessed), now)
    }

    fn cookie_for(&self, key: String, record: &Record, now: Millis) -> CookieAction {
        let max_age = (!self.policy.browser_close(record))
            .then(|| seconds_until(self.policy.expires_at(record), now));
        CookieAction::Set(key, max_age)
    }

    /// Applies one response's changes (CONTRACT §2 order) and says what to do with the cookie.
    async fn apply(
        &self,
        loaded: Option<(String, Record, Vec<u8>)>,
        presented: &Presented,
        change: &Change,
        now: Millis,
    ) -> Result<CookieAction, ProxyError> {
        let force = self.policy.save_every_request;
        let Some((key, snapshot, version)) = loaded else {
            return self.fresh(change, now, presented.carried).await;
        };
        if change.flush {
            // Refuse an oversized fresh session before the old one is gone.
            changes::apply(
                &mut Record::new(now),
                change,
                &self.policy,
                now,
                self.config.max_session_bytes,
                false,
            )?;
            self.store.remove(&key).await?;
            self.metrics.sessions_flushed.inc();
            tracing::info!("session flushed");
            let action = self.fresh(change, now, true).await?;
            self.store.sync().await?;
            return Ok(action);
        }
        if change.is_empty() && !force {
            // The session may have ended while the upstream worked: then drop the stale cookie.
            if self.store.liveness(&key, now).await? == Liveness::Ended {
                return Ok(CookieAction::Remove);
            }
            if self.policy.touch_due(&snapshot, now)
                && let Err(e) = self.store.touch(&key, now).await
            {
                tracing::error!(error = %e, "recording session activity failed");
            }
            return Ok(CookieAction::Keep);
        }
        let new_key = change.cycle.then(id::generate);
        let updated = self
            .store
            .update(
                &key,
                Some((&snapshot, &version)),
                change,
                new_key.as_deref(),
                now,
                force,
            )
            .await
            .map_err(|e| match e {
                UpdateError::TooLarge(t) => ProxyError::TooLarge(t),
                UpdateError::Store(s) => ProxyError::Store(s),
            })?;
        let action = match updated {
            Updated::Ended => {
                let mut would = snapshot;
                let effect =
                    changes::apply(&mut would, change, &self.policy, now, usize::MAX, force)
                        .expect("no size limit");
                if effect.save {
                    return Err(ProxyError::SessionEnded);
                }
                return Ok(CookieAction::Remove);
            }
            Updated::Unchanged { .. } => return Ok(CookieAction::Keep),
            Updated::Removed { forwarded: true }
            | Updated::Saved {
                forwarded: true, ..
            } => CookieAction::Keep,
            Updated::Removed { forwarded: false } => CookieAction::Remove,
            Updated::Saved { key, record, .. } => {
                self.metrics.merges.inc();
                if change.cycle {
                    self.metrics.sessions_cycled.inc();
                    tracing::info!("session key cycled");
                }
                self.cookie_for(key, &record, now)
            }
        };
        self.store.sync().await?;
        Ok(action)
    }

    /// A visitor without a live session: store a new one if the change leaves data.
    async fn fresh(
        &self,
        change: &Change,
        now: Millis,
        stale: bool,
    ) -> Result<CookieAction, ProxyError> {
        let mut record = Record::new(now);
        let effect = changes::apply(
            &mut record,
            change,
            &self.policy,
            now,
            self.config.max_session_bytes,
            self.policy.save_every_request,
        )?;
        if !effect.save || record.deadline <= now {
            return Ok(if stale {
                CookieAction::Remove
            } else {
                CookieAction::Keep
            });
        }
        loop {
            let key = id::generate();
            if self.store.create(&key, &record).await? {
                self.store.sync().await?;
                self.metrics.sessions_created.inc();
                tracing::debug!("session created");
                return Ok(self.cookie_for(key, &record, now));
            }
        }
    }

    /// Sends the request upstream; for a switched protocol, pairs the two upgrade handles.
    async fn forward(
        &self,
        req: Request<Incoming>,
        client_upgrade: Option<OnUpgrade>,
        upstream_ms: &mut f64,
    ) -> Result<
        (
            http::response::Parts,
            Incoming,
            Option<(OnUpgrade, OnUpgrade)>,
        ),
        ProxyError,
    > {
        let started = std::time::Instant::now();
        let sent = self.upstream.send(req).await;
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.upstream_duration.observe(elapsed);
        *upstream_ms = elapsed * 1000.0;
        let mut resp = sent?;
        let upgrades = match client_upgrade {
            Some(c) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                Some((c, hyper::upgrade::on(&mut resp)))
            }
            _ => None,
        };
        let (parts, body) = resp.into_parts();
        Ok((parts, body, upgrades))
    }
}

/// Builds the client's response from the upstream's: hop-by-hop removed, body streamed, and an
/// upgraded connection spliced once both sides have switched protocols.
fn finish(
    mut rparts: http::response::Parts,
    rbody: Incoming,
    upgrades: Option<(OnUpgrade, OnUpgrade)>,
) -> Response<Body> {
    let switching = rparts.status == StatusCode::SWITCHING_PROTOCOLS && upgrades.is_some();
    headers::strip_hop_by_hop(&mut rparts.headers, switching);
    if let Some((client, upstream)) = upgrades {
        tokio::spawn(splice(client, upstream));
    }
    Response::from_parts(rparts, rbody.map_err(Into::into).boxed())
}

/// Whether a `Vary` header already names `Cookie` (or `*`).
fn varies_on_cookie(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("cookie") || t.trim() == "*")
}

async fn splice(client: OnUpgrade, upstream: OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::warn!(error = %e, "protocol upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection closed");
    }
}
