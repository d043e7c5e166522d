//! The per-request pipeline, as named phases over one request: admit (head limits, skip paths,
//! the scrub, the CSRF origin check) → present (open the session, add our headers) → forward
//! (and take our headers out of the answer) → absorb (parse and commit the change) → render (the
//! cookie, `Vary`) → the access log.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{HeaderName, HeaderValue, SET_COOKIE, UPGRADE, VARY};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

use crate::config::Config;
use crate::cookie::{Presented, SessionCookie};
use crate::csrf;
use crate::drain::Tracker;
use crate::error::{Body, ProxyError};
use crate::headers::{self, Ours};
use crate::metrics::{HeaderLabel, Metrics, Status};
use crate::session::{Clock, Millis};
use crate::session::{CommitError, CookieOp, Gate, Loaded, Outcome, Sessions};
use crate::settings::Settings;
use crate::signing::Signer;
use crate::upstream::{RequestBody, ResponseBody, Upstream};

mod inject;
mod scrub;

use inject::{Names, header_name};
use scrub::own_host;
pub use scrub::{Scrub, scrub_request_head};

/// What the access log says about a request, gathered on the way.
#[derive(Default)]
struct Access {
    /// The answer depends on our cookie (`Vary: Cookie`): the request carried it, or the
    /// answer sets or deletes it.
    vary_cookie: bool,
    /// `new`, `existing`, or `-` on a skip path or before the session was looked at.
    session: &'static str,
    /// Data operations the upstream asked for.
    ops: usize,
    upstream_ms: f64,
}

/// A creation limit and the client address it counts.
type Client = (Arc<crate::limits::CreationLimit>, IpAddr);

/// What the admit phase hands on: the scrubbed request and what was learned about it.
struct Admitted {
    parts: http::request::Parts,
    body: Incoming,
    /// A skip path: proxied with no session work.
    skip: bool,
    /// The client's side of an upgrade the sidecar vouches for.
    upgrade: Option<OnUpgrade>,
    /// Asked before this request's answer may create a session (`[limits]`).
    client: Option<Client>,
    presented: Presented,
    /// An unsafe method carrying our cookie on a path `[csrf]` guards.
    guarded: bool,
}

/// The app's answer, our headers taken out of it.
struct Answered {
    parts: http::response::Parts,
    body: ResponseBody,
    upgrades: Option<(OnUpgrade, OnUpgrade)>,
    taken: Vec<(HeaderName, HeaderValue)>,
}

/// One worker's request handler. What a reload may change lives in a [`Pipeline`], swapped
/// whole: a request takes the one current when it arrives and keeps it to its end, so a reload
/// drops no connection and changes no request half-way.
pub struct Worker {
    current: ArcSwap<Pipeline>,
}

/// What every worker shares for the life of the process (a reload keeps it).
#[derive(Clone)]
pub struct Shared {
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub tracker: Arc<Tracker>,
}

impl Worker {
    pub fn new(settings: &Settings, shared: Shared) -> Worker {
        let c = &settings.config;
        let upstream = Upstream::new(c.upstream.clone(), c.upstream_timeout);
        Worker {
            current: ArcSwap::from_pointee(Pipeline::new(settings, upstream, shared)),
        }
    }

    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let pipeline = self.current.load_full();
        pipeline.handle(req, peer).await
    }

    /// Takes reloaded settings for the requests that arrive from now on. The worker's idle
    /// connections to the app are kept when its address did not change.
    pub fn reload(&self, settings: &Settings) {
        let old = self.current.load();
        let c = &settings.config;
        let upstream = old.upstream.reconfigured(&c.upstream, c.upstream_timeout);
        let shared = old.shared.clone();
        self.current
            .store(Arc::new(Pipeline::new(settings, upstream, shared)));
    }
}

/// The request pipeline under one configuration.
pub struct Pipeline {
    config: Arc<Config>,
    sessions: Arc<Sessions>,
    cookie: Arc<SessionCookie>,
    upstream: Upstream,
    names: Names,
    /// `[security] upstream_signing_key`.
    signer: Option<Signer>,
    /// `[limits] new_sessions_per_minute`, shared by every worker.
    creation_limit: Option<Arc<crate::limits::CreationLimit>>,
    shared: Shared,
}

impl Pipeline {
    fn new(settings: &Settings, upstream: Upstream, shared: Shared) -> Pipeline {
        let config = settings.config.clone();
        let p = &config.header_prefix;
        let names = Names {
            data: header_name(p, ""),
            status: header_name(p, "-status"),
            expiry_age: header_name(p, "-expiry-age"),
            id: header_name(p, "-id"),
            csrf: header_name(p, "-csrf"),
            subject: header_name(p, "-subject"),
            signature: header_name(p, "-signature"),
            identity: config.identity_header.clone(),
        };
        Pipeline {
            signer: config.upstream_signing_key.as_deref().map(Signer::new),
            cookie: settings.cookie.clone(),
            upstream,
            sessions: settings.sessions.clone(),
            config,
            names,
            creation_limit: settings.creation_limit.clone(),
            shared,
        }
    }

    /// Warns once per process when a trusted proxy says visitors came over HTTPS while the
    /// cookie is not `Secure`: the browser would send the session key over plain HTTP too.
    fn warn_if_insecure(&self, headers: &http::HeaderMap) {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        static WARNED: AtomicBool = AtomicBool::new(false);
        if self.config.trust_forwarded
            && !self.config.cookie.secure
            && !WARNED.load(Relaxed)
            && headers
                .get(&headers::X_FORWARDED_PROTO)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
            && !WARNED.swap(true, Relaxed)
        {
            tracing::warn!(
                "visitors reach the sidecar over HTTPS (X-Forwarded-Proto from the trusted proxy) \
                 but [cookie] secure = false: browsers would send the session cookie over plain \
                 HTTP too; set [cookie] secure = true"
            );
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = std::time::Instant::now();
        let logged = tracing::enabled!(target: "access", tracing::Level::INFO)
            .then(|| (req.method().clone(), req.uri().path().to_string()));
        let mut info = Access::default();
        let result = self.proxy(req, peer, &mut info).await;
        let mut resp = result.unwrap_or_else(|e| {
            if let ProxyError::BadHeader(b) = &e {
                let header = b.header.clone();
                self.shared
                    .metrics
                    .bad_upstream_headers
                    .get_or_create(&HeaderLabel { header })
                    .inc();
            }
            let status = e.status().as_u16().to_string();
            self.shared
                .metrics
                .refusals
                .get_or_create(&Status { status })
                .inc();
            e.into_response()
        });
        self.shared
            .metrics
            .observe_request(resp.status().as_u16(), started.elapsed());
        if info.vary_cookie && !varies_on_cookie(resp.headers()) {
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

    /// One request, as named phases over one context: admit → present → forward → absorb →
    /// render (the access log is written by [`Pipeline::handle`]).
    async fn proxy(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        info: &mut Access,
    ) -> Result<Response<Body>, ProxyError> {
        let mut admitted = self.admit(req, peer, info)?;
        let upgrade = admitted.upgrade.take();
        if admitted.skip {
            let request = Request::from_parts(admitted.parts, RequestBody::Streamed(admitted.body));
            let answer = self.forward_and_take(request, upgrade, info).await?;
            if !answer.taken.is_empty() {
                tracing::warn!(
                    status = answer.parts.status.as_u16(),
                    "ignored session headers from the upstream on a skip path"
                );
            }
            return Ok(self.finish(answer.parts, answer.body, answer.upgrades));
        }
        let (request, loaded, client) = self.present(admitted, info).await?;
        let answer = self.forward_and_take(request, upgrade, info).await?;
        let (outcome, now) = match self.absorb(&answer, loaded, client, info).await? {
            Some(committed) => committed,
            None => return Ok(self.finish(answer.parts, answer.body, answer.upgrades)),
        };
        let resp = self.finish(answer.parts, answer.body, answer.upgrades);
        Ok(self.render(resp, outcome, now, info))
    }

    /// Admit: skip paths, head limits, the upgrades vouched for, the scrubbed head (our headers
    /// and cookie out, `X-Forwarded-*` in), and the CSRF origin check — before anything is
    /// loaded or forwarded.
    fn admit(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        info: &mut Access,
    ) -> Result<Admitted, ProxyError> {
        let skip = self
            .config
            .skip_paths
            .iter()
            .any(|p| req.uri().path().starts_with(p.as_str()));
        // Known before anything can fail, so that every answer to a cookie-carrying request,
        // the sidecar's own 431 included, says `Vary: Cookie`.
        info.vary_cookie = !skip && self.cookie.carried(req.headers());
        self.check_head(&req)?;
        let mut req = req;
        let vouched = headers::vouched_upgrade(req.headers(), &self.config.upgrades);
        if req.headers().contains_key(UPGRADE) && !vouched {
            tracing::debug!("an upgrade the sidecar does not vouch for goes up as a plain request");
        }
        let upgrade = vouched.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // Read before the scrub appends the peer to X-Forwarded-For; only a creation limit needs it.
        let client = self.creation_limit.as_ref().map(|limit| {
            let addr =
                crate::limits::client_addr(&parts.headers, peer.ip(), self.config.trust_forwarded);
            (limit.clone(), addr)
        });
        let presented = scrub_request_head(
            &mut parts.headers,
            parts.uri.authority(),
            &self.cookie,
            &Scrub {
                prefix: &self.config.header_prefix,
                peer: peer.ip(),
                trust_forwarded: self.config.trust_forwarded,
                upgrade: vouched,
                identity: self.names.identity.as_ref(),
            },
        );
        self.warn_if_insecure(&parts.headers);
        let guarded = !skip
            && presented.carried
            && !csrf::is_safe(&parts.method)
            && self.config.csrf.guards(parts.uri.path());
        if guarded && self.config.csrf.check_origin {
            csrf::check_origin(
                &parts.headers,
                own_host(&parts.headers),
                &self.config.csrf.trusted_origins,
            )
            .map_err(ProxyError::Forbidden)?;
        }
        Ok(Admitted {
            parts,
            body,
            skip,
            upgrade,
            client,
            presented,
            guarded,
        })
    }

    /// Present: open the request's session, check the CSRF token, and hand the app our headers.
    async fn present(
        &self,
        admitted: Admitted,
        info: &mut Access,
    ) -> Result<(Request<RequestBody>, Loaded, Option<Client>), ProxyError> {
        let Admitted {
            mut parts,
            body,
            client,
            presented,
            guarded,
            ..
        } = admitted;
        let now = self.shared.clock.now();
        let mut loaded = self
            .sessions
            .open(&presented.keys, presented.carried, now)
            .await?;
        let mut body = RequestBody::Streamed(body);
        if let Some(token) = &self.config.csrf.token {
            if guarded && let Some(key) = loaded.key() {
                body = self.check_token(token, key, &parts.headers, body).await?;
            }
            // The app's token for the session, or for the one its answer would create.
            let t = csrf::masked(loaded.key_or_next());
            parts
                .headers
                .insert(&self.names.csrf, HeaderValue::from_str(&t).expect("hex"));
        }
        self.inject(&mut parts.headers, &loaded, now, info);
        Ok((Request::from_parts(parts, body), loaded, client))
    }

    /// Forward: the request to the app, and our headers taken out of its answer (and any
    /// `Set-Cookie` of the app's for our cookie dropped) before anything else looks at it.
    async fn forward_and_take(
        &self,
        request: Request<RequestBody>,
        upgrade: Option<OnUpgrade>,
        info: &mut Access,
    ) -> Result<Answered, ProxyError> {
        let (mut parts, body, upgrades) = self
            .forward(request, upgrade, &mut info.upstream_ms)
            .await?;
        let taken = headers::take_ours(&mut parts.headers, &self.config.header_prefix);
        self.drop_our_set_cookie(&mut parts.headers);
        Ok(Answered {
            parts,
            body,
            upgrades,
            taken,
        })
    }

    /// Absorb: the app's change headers parsed and committed against the store as it is now.
    /// `None` when nothing is to be committed (the app answered 5xx).
    async fn absorb(
        &self,
        answer: &Answered,
        mut loaded: Loaded,
        client: Option<Client>,
        info: &mut Access,
    ) -> Result<Option<(Outcome, Millis)>, ProxyError> {
        let prefix = self.config.header_prefix.as_str();
        if answer.parts.status.is_server_error() {
            if !answer.taken.is_empty() {
                tracing::warn!(
                    status = answer.parts.status.as_u16(),
                    "upstream answered 5xx: its session headers were ignored"
                );
            }
            self.sessions
                .activity(&loaded, self.shared.clock.now())
                .await;
            return Ok(None);
        }
        let (change, unknown) = match headers::parse_changes(&answer.taken, prefix, loaded.data()) {
            Ok(parsed) => parsed,
            Err(bad) => {
                self.sessions
                    .activity(&loaded, self.shared.clock.now())
                    .await;
                return Err(bad.into());
            }
        };
        info.ops = change.ops.len();
        for name in unknown {
            tracing::warn!(
                header = name,
                "ignored a session header from the upstream (unknown name or spelling)"
            );
        }
        // The changes land against the store as it is now, not as it was when the request came
        // in: a session that expired meanwhile must not be revived.
        let now = self.shared.clock.now();
        if let Some((limit, client)) = client {
            loaded.set_gate(Gate(Box::new(move || limit.admit(client))));
        }
        match self.sessions.commit(loaded, &change, now).await {
            Ok(outcome) => Ok(Some((outcome, now))),
            Err(CommitError::Ended) => Err(ProxyError::SessionEnded),
            Err(CommitError::TooMany(secs)) => Err(ProxyError::TooManySessions(secs)),
            Err(CommitError::Unavailable(e)) => Err(e.into()),
            // Name the headers that carried what does not fit, as for any bad change header.
            Err(CommitError::Unfit(unfit)) => {
                let names: std::collections::BTreeSet<String> = answer
                    .taken
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .filter(|n| {
                        matches!(headers::ours(n, prefix), Ours::Dashed(s) if unfit.suffixes().contains(&s))
                    })
                    .map(headers::display_name)
                    .collect();
                Err(ProxyError::BadHeader(headers::BadHeader {
                    header: names.into_iter().collect::<Vec<_>>().join(", "),
                    problem: unfit.to_string(),
                }))
            }
        }
    }

    /// Render: what the commit decided for the browser's cookie, and the metrics it moves.
    fn render(
        &self,
        mut resp: Response<Body>,
        outcome: Outcome,
        now: Millis,
        info: &mut Access,
    ) -> Response<Body> {
        self.count(&outcome);
        let h = resp.headers_mut();
        match outcome.cookie {
            CookieOp::Keep => return resp,
            CookieOp::Set { key, max_age } => {
                h.append(SET_COOKIE, self.cookie.set(&key, max_age, now));
            }
            CookieOp::Remove => {
                h.append(SET_COOKIE, self.cookie.removal());
            }
        }
        info.vary_cookie = true; // sets or deletes the cookie: Vary either way
        resp
    }

    fn count(&self, outcome: &Outcome) {
        let m = &self.shared.metrics;
        if outcome.created {
            m.sessions_created.inc();
        }
        if outcome.flushed {
            m.sessions_flushed.inc();
        }
        if outcome.cycled {
            m.sessions_cycled.inc();
        }
        if outcome.revoked > 0 {
            m.sessions_revoked.inc_by(outcome.revoked as u64);
        }
        if outcome.merged {
            m.merges.inc();
        }
        if outcome.dropped {
            m.retired_key_changes_dropped.inc();
        }
    }

    /// The session cookie's name belongs to the sidecar: an upstream `Set-Cookie` for it would
    /// overwrite or delete the visitor's session in the browser.
    fn drop_our_set_cookie(&self, headers: &mut http::HeaderMap) {
        if !headers
            .get_all(SET_COOKIE)
            .iter()
            .any(|v| self.cookie.is_ours_set_cookie(v))
        {
            return;
        }
        let kept: Vec<HeaderValue> = headers
            .get_all(SET_COOKIE)
            .iter()
            .filter(|v| !self.cookie.is_ours_set_cookie(v))
            .cloned()
            .collect();
        headers.remove(SET_COOKIE);
        for v in kept {
            headers.append(SET_COOKIE, v);
        }
        tracing::warn!(
            cookie = self.cookie.name(),
            "dropped the upstream's Set-Cookie for the session cookie's name"
        );
    }

    /// The per-session CSRF token of an unsafe request: from the configured header, or from the
    /// field of an urlencoded form (read up to `max_form_bytes`, then handed on as read).
    async fn check_token(
        &self,
        token: &crate::config::CsrfToken,
        key: &str,
        headers: &http::HeaderMap,
        body: RequestBody,
    ) -> Result<RequestBody, ProxyError> {
        if let Some(presented) = headers.get(&token.header) {
            return if csrf::verify(key, presented.as_bytes()) {
                Ok(body)
            } else {
                Err(ProxyError::Forbidden("CSRF token incorrect".into()))
            };
        }
        let (Some(field), RequestBody::Streamed(incoming)) = (&token.field, body) else {
            return Err(ProxyError::Forbidden("CSRF token missing".into()));
        };
        if !csrf::is_form(headers) {
            return Err(ProxyError::Forbidden("CSRF token missing".into()));
        }
        let limit = token.max_form_bytes;
        let read = http_body_util::Limited::new(incoming, limit).collect();
        let form = match tokio::time::timeout(self.config.header_read_timeout, read).await {
            Err(_) => {
                return Err(ProxyError::ClientTimeout(
                    self.config.header_read_timeout.as_secs(),
                ));
            }
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(ProxyError::FormTooLarge(limit));
            }
            Ok(Err(e)) => return Err(ProxyError::ClientBody(e)),
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        match csrf::form_field(&form, field) {
            Some(t) if csrf::verify(key, &t) => Ok(RequestBody::Read(Some(form))),
            Some(_) => Err(ProxyError::Forbidden("CSRF token incorrect".into())),
            None => Err(ProxyError::Forbidden("CSRF token missing".into())),
        }
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

    /// Builds the client's response from the upstream's: hop-by-hop removed, body streamed, and
    /// an upgraded connection spliced once both sides have switched protocols (counted, so the
    /// drain waits for it).
    fn finish(
        &self,
        mut rparts: http::response::Parts,
        rbody: ResponseBody,
        upgrades: Option<(OnUpgrade, OnUpgrade)>,
    ) -> Response<Body> {
        let switching = rparts.status == StatusCode::SWITCHING_PROTOCOLS && upgrades.is_some();
        headers::strip_hop_by_hop(&mut rparts.headers, switching);
        // The app's HTTP version is the upstream hop's business, not the client's: an app
        // answering HTTP/1.0 (Python's http.server, many CGI servers) must not make the client's
        // answer HTTP/1.0 and close its connection. hyper answers each client in its own version
        // (HTTP/1.0 to a 1.0 client, HTTP/2 to h2c) and frames a body of unknown length by it:
        // chunked for HTTP/1.1, close-delimited for 1.0.
        rparts.version = http::Version::HTTP_11;
        if let Some((client, upstream)) = upgrades.filter(|_| switching) {
            let guard = self.shared.tracker.splice();
            let tracker = self.shared.tracker.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = splice(client, upstream) => {}
                    _ = tracker.cut() => tracing::debug!("upgraded connection closed at the end of the grace"),
                }
                drop(guard);
            });
        }
        Response::from_parts(rparts, rbody.map_err(Into::into).boxed())
    }

    /// Sends the request upstream; for a switched protocol, pairs the two upgrade handles.
    async fn forward(
        &self,
        req: Request<RequestBody>,
        client_upgrade: Option<OnUpgrade>,
        upstream_ms: &mut f64,
    ) -> Result<
        (
            http::response::Parts,
            ResponseBody,
            Option<(OnUpgrade, OnUpgrade)>,
        ),
        ProxyError,
    > {
        let started = std::time::Instant::now();
        let sent = self.upstream.send(req).await;
        let elapsed = started.elapsed().as_secs_f64();
        self.shared.metrics.upstream_duration.observe(elapsed);
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
