//! The request head before the session is looked at: our cookie taken out, every header of
//! ours removed in any spelling, hop-by-hop headers dropped, `X-Forwarded-*` set.

use std::net::IpAddr;

use http::HeaderValue;
use http::header::HOST;

use crate::cookie::{Presented, SessionCookie};
use crate::headers;

/// What [`scrub_request_head`] needs to know besides the headers.
pub struct Scrub<'a> {
    pub prefix: &'a str,
    pub peer: IpAddr,
    pub trust_forwarded: bool,
    /// The request is an upgrade the sidecar vouches for: keep `Upgrade`/`Connection`.
    pub upgrade: bool,
    /// `[identity] header`: removed in every spelling, as the sidecar's own are.
    pub identity: Option<&'a http::HeaderName>,
}

/// The whole request-head path before the session is looked at, as one function (so that it
/// can be fuzzed as one): take our cookie out, remove every header of ours in any spelling,
/// drop hop-by-hop headers, set `X-Forwarded-*`, keep `Host`; and the `[identity]` header, in
/// every spelling.
pub fn scrub_request_head(
    headers: &mut http::HeaderMap,
    authority: Option<&http::uri::Authority>,
    cookie: &SessionCookie,
    how: &Scrub<'_>,
) -> Presented {
    let presented = cookie.take(headers);
    headers::take_ours(headers, how.prefix);
    if let Some(identity) = how.identity {
        headers::remove_spellings(headers, identity.as_str());
    }
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| authority.map(|a| a.to_string()));
    headers::strip_hop_by_hop(headers, how.upgrade);
    headers::set_forwarded(headers, how.peer, host.as_deref(), how.trust_forwarded);
    if !headers.contains_key(HOST)
        && let Some(v) = host.as_deref().and_then(|h| HeaderValue::from_str(h).ok())
    {
        headers.insert(HOST, v);
    }
    presented
}

/// The host the client addressed, as the scrub left it in `X-Forwarded-Host` (a trusted proxy's
/// value, or the request's own `Host`).
pub(super) fn own_host(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(&headers::X_FORWARDED_HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
}
