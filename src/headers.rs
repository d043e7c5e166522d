//! Header work that is not about cookies: hop-by-hop removal, `X-Forwarded-*`, recognising the
//! sidecar's own `X-Session*` names, and parsing the upstream's change headers into a [`Change`].

use std::net::IpAddr;

use http::header::{
    CONNECTION, FORWARDED, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

use crate::session::changes::{Change, Op, Revoke, diff, integer};
use crate::session::{Data, ExpiryMode};

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded; names listed in `Connection` join them.
/// `HTTP2-Settings` belongs to an h2c upgrade (RFC 7540 §3.2.1). Names, not strings: removing by a
/// string parses it on every request.
pub static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("http2-settings"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
];

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Other spellings of "who the client is" that only a trusted proxy in front may set.
pub static UNTRUSTED_FORWARDING: [HeaderName; 2] =
    [FORWARDED, HeaderName::from_static("x-real-ip")];

/// Removes hop-by-hop headers. For an upgrade (WebSocket) the `Upgrade` header and
/// `Connection: upgrade` are kept, because the next hop must see them to switch protocols.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names instead of ten removals, each of
    // which hashes its name.
    if !headers
        .keys()
        .any(|n| *n == UPGRADE || HOP_BY_HOP.contains(n))
    {
        if keep_upgrade {
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if !(keep_upgrade && name == UPGRADE) {
            headers.remove(&name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// How a header name relates to the sidecar's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ours<'a> {
    /// Not the sidecar's.
    No,
    /// The dashed spelling, e.g. `x-session-set`: the suffix (`""`, `"-set"`, ...).
    Dashed(&'a str),
    /// Another spelling CGI, WSGI and PHP read as the same name (`x_session_set`): stripped,
    /// never applied.
    Other,
}

/// Whether two bytes of header names read the same to CGI: `_` and `-` are one.
fn same_byte(a: u8, b: u8) -> bool {
    a == b || (matches!(a, b'-' | b'_') && matches!(b, b'-' | b'_'))
}

/// Whether `name` (lower-case, as `HeaderName` keeps it) belongs to the sidecar, comparing as
/// CGI does: `_` reads as `-` (docs/HEADERS.md §0).
pub fn ours<'a>(name: &'a str, prefix: &str) -> Ours<'a> {
    let (n, p) = (name.as_bytes(), prefix.as_bytes());
    if n.len() < p.len() {
        return Ours::No;
    }
    if !n.iter().zip(p).all(|(&a, &b)| same_byte(a, b)) {
        return Ours::No;
    }
    let rest = &name[p.len()..];
    if !(rest.is_empty() || rest.starts_with(['-', '_'])) {
        return Ours::No;
    }
    if &n[..p.len()] == p && !rest.contains('_') {
        Ours::Dashed(rest)
    } else {
        Ours::Other
    }
}

/// Removes `name` (lower case) in every spelling CGI reads as the same: `_` for `-`.
pub fn remove_spellings(headers: &mut HeaderMap, name: &str) {
    let same = |n: &HeaderName| {
        n.as_str().len() == name.len()
            && n.as_str()
                .bytes()
                .zip(name.bytes())
                .all(|(a, b)| same_byte(a, b))
    };
    let found: Vec<HeaderName> = headers.keys().filter(|n| same(n)).cloned().collect();
    for n in found {
        headers.remove(n);
    }
}

/// Whether `name` belongs to the sidecar in any spelling.
pub fn is_ours(name: &str, prefix: &str) -> bool {
    ours(name, prefix) != Ours::No
}

/// Removes every header that belongs to the sidecar and returns them in order.
pub fn take_ours(headers: &mut HeaderMap, prefix: &str) -> Vec<(HeaderName, HeaderValue)> {
    if !headers.keys().any(|n| is_ours(n.as_str(), prefix)) {
        return Vec::new();
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_ours(n.as_str(), prefix))
        .cloned()
        .collect();
    let mut taken = Vec::new();
    for name in names {
        for value in headers.get_all(&name) {
            taken.push((name.clone(), value.clone()));
        }
        headers.remove(&name);
    }
    taken
}

/// The protocols of an `Upgrade` request, if the sidecar vouches for every one of them
/// (`allowed` holds lower-case names, e.g. `websocket`). Anything else, `h2c` above all, must go
/// upstream as a plain request: a spliced connection would carry later requests unscrubbed.
pub fn vouched_upgrade(headers: &HeaderMap, allowed: &[String]) -> bool {
    let mut any = false;
    for value in headers.get_all(UPGRADE) {
        let Ok(text) = value.to_str() else {
            return false;
        };
        for proto in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let name = proto.split('/').next().unwrap_or("").trim();
            if !allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                return false;
            }
            any = true;
        }
    }
    any
}

/// Appends the peer to `X-Forwarded-For` and sets `X-Forwarded-Proto/-Host` unless a trusted
/// proxy in front already did.
pub fn set_forwarded(headers: &mut HeaderMap, peer: IpAddr, host: Option<&str>, trust: bool) {
    if headers.contains_key(&X_FORWARDED_FOR) {
        let mut chain = String::new();
        for v in headers.get_all(&X_FORWARDED_FOR) {
            if let Ok(text) = v.to_str() {
                chain.push_str(text);
                chain.push_str(", ");
            }
        }
        use std::fmt::Write;
        let _ = write!(chain, "{peer}");
        if let Ok(v) = HeaderValue::from_str(&chain) {
            headers.insert(&X_FORWARDED_FOR, v);
        }
    } else {
        headers.insert(&X_FORWARDED_FOR, peer_value(peer));
    }
    if !trust {
        for name in &UNTRUSTED_FORWARDING {
            headers.remove(name);
        }
    }
    if !(trust && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !(trust && headers.contains_key(&X_FORWARDED_HOST)) {
        match host.and_then(|h| HeaderValue::from_str(h).ok()) {
            Some(v) => {
                headers.insert(&X_FORWARDED_HOST, v);
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
}

/// The peer's address as a header value. A worker thread serves one connection's requests
/// after another, often from the same address (a load balancer's, or a keep-alive client's):
/// the last one is kept, so that a request seldom formats an address.
fn peer_value(peer: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((ip, value)) if *ip == peer => value.clone(),
        _ => {
            let value = HeaderValue::from_str(&peer.to_string())
                .expect("an IP address is a valid header value");
            *last = Some((peer, value.clone()));
            value
        }
    })
}

/// A change header the upstream got wrong: answered with 502 naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{header}: {problem}")]
pub struct BadHeader {
    pub header: String,
    pub problem: String,
}

/// `x-session-set` → `X-Session-Set`, for messages.
pub fn display_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut c = part.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Parses the upstream's change headers (already taken out of the response).
///
/// `snapshot` is what the upstream was sent; a full `X-Session` is diffed against it (or against
/// an empty session when the same response flushes). Returns the names of unknown headers too,
/// and of other spellings (`X_Session_Set`), which are never applied, for the caller to log.
pub fn parse_changes(
    taken: &[(HeaderName, HeaderValue)],
    prefix: &str,
    snapshot: &Data,
) -> Result<(Change, Vec<String>), BadHeader> {
    let mut change = Change::default();
    let mut unknown = Vec::new();
    let bad = |name: &HeaderName, problem: String| BadHeader {
        header: display_name(name.as_str()),
        problem,
    };
    let mut dashed = Vec::with_capacity(taken.len());
    for (name, value) in taken {
        match ours(name.as_str(), prefix) {
            Ours::Dashed(suffix) => dashed.push((name, suffix, value)),
            _ => unknown.push(name.as_str().to_string()),
        }
    }
    for &(name, suffix, value) in &dashed {
        match suffix {
            "-flush" => change.flush |= flag(value).map_err(|p| bad(name, p))?,
            "-cycle" => change.cycle |= flag(value).map_err(|p| bad(name, p))?,
            _ => {}
        }
    }
    let empty = Data::new();
    let baseline = if change.flush { &empty } else { snapshot };
    for &(name, suffix, value) in &dashed {
        match suffix {
            "" => {
                let full = object(value).map_err(|p| bad(name, p))?;
                change.ops.extend(diff(baseline, &full));
            }
            "-set" => {
                let set = object(value).map_err(|p| bad(name, p))?;
                change
                    .ops
                    .extend(set.into_iter().map(|(k, v)| Op::Set(k, v)));
            }
            "-delete" => {
                let keys = string_list(value).map_err(|p| bad(name, p))?;
                change.ops.extend(keys.into_iter().map(Op::Delete));
            }
            "-incr" => {
                let by = integers(value).map_err(|p| bad(name, p))?;
                change
                    .ops
                    .extend(by.into_iter().map(|(k, n)| Op::Incr(k, n)));
            }
            "-append" => {
                let lists = lists(value).map_err(|p| bad(name, p))?;
                change
                    .ops
                    .extend(lists.into_iter().map(|(k, items)| Op::Append(k, items)));
            }
            "-expiry" => change.expiry = Some(expiry(value).map_err(|p| bad(name, p))?),
            "-subject" => change.subject = Some(subject(value).map_err(|p| bad(name, p))?),
            "-revoke" => change.revoke = Some(revoke(value).map_err(|p| bad(name, p))?),
            "-flush" | "-cycle" => {}
            _ => unknown.push(display_name(name.as_str())),
        }
    }
    Ok((change, unknown))
}

fn flag(value: &HeaderValue) -> Result<bool, String> {
    let text = std::str::from_utf8(value.as_bytes()).unwrap_or("").trim();
    match text.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(format!(
            "expected 1, true, 0 or false, got {:?}",
            shorten(text)
        )),
    }
}

fn object(value: &HeaderValue) -> Result<Data, String> {
    match crate::session::json::parse_object(value.as_bytes()) {
        Ok(Some(map)) => Ok(map),
        Ok(None) => Err("expected a JSON object".into()),
        Err(e) => Err(format!("malformed JSON ({e})")),
    }
}

/// `{"key": integer, ...}`: JSON integer tokens of any size.
fn integers(value: &HeaderValue) -> Result<Vec<(String, num_bigint::BigInt)>, String> {
    object(value)?
        .into_iter()
        .map(|(k, v)| {
            let n = match &v {
                serde_json::Value::Number(n) => integer(n),
                _ => None,
            };
            match n {
                Some(n) => Ok((k, n)),
                None => Err(format!(
                    "expected a JSON object of integers, but {k:?} is {}",
                    shorten(&v.to_string())
                )),
            }
        })
        .collect()
}

/// `{"key": [items], ...}`.
fn lists(value: &HeaderValue) -> Result<Vec<(String, Vec<serde_json::Value>)>, String> {
    object(value)?
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::Array(items) => Ok((k, items)),
            other => Err(format!(
                "expected a JSON object of lists, but {k:?} is {}",
                shorten(&other.to_string())
            )),
        })
        .collect()
}

fn string_list(value: &HeaderValue) -> Result<Vec<String>, String> {
    serde_json::from_slice::<Vec<String>>(value.as_bytes())
        .map_err(|e| format!("expected a JSON array of strings ({e})"))
}

fn revoke(value: &HeaderValue) -> Result<Revoke, String> {
    let text = std::str::from_utf8(value.as_bytes()).unwrap_or("").trim();
    match text.to_ascii_lowercase().as_str() {
        "others" => Ok(Revoke::Others),
        "all" => Ok(Revoke::All),
        _ => Err(format!("expected others or all, got {:?}", shorten(text))),
    }
}

fn expiry(value: &HeaderValue) -> Result<ExpiryMode, String> {
    let text = std::str::from_utf8(value.as_bytes()).unwrap_or("").trim();
    if text.eq_ignore_ascii_case("default") {
        return Ok(ExpiryMode::Default);
    }
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u64>() {
            Ok(0) => Ok(ExpiryMode::BrowserClose),
            Ok(n) if n <= 100 * 365 * 24 * 3600 => Ok(ExpiryMode::Seconds(n)),
            _ => Err(format!("{text} seconds is too large")),
        };
    }
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            format!(
                "expected seconds, 0, an RFC 3339 timestamp or \"default\", got {:?}",
                shorten(text)
            )
        })?;
    Ok(ExpiryMode::At(
        (at.unix_timestamp_nanos() / 1_000_000) as i64,
    ))
}

fn subject(value: &HeaderValue) -> Result<Option<String>, String> {
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Ok(None);
    }
    if bytes.len() > 200 || !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err("expected 1 to 200 visible ASCII characters".into());
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

fn shorten(text: &str) -> String {
    text.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const P: &str = "x-session";

    fn pairs(list: &[(&str, &str)]) -> Vec<(HeaderName, HeaderValue)> {
        list.iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn ownership_follows_the_prefix_and_a_dash() {
        assert!(is_ours("x-session", P));
        assert!(is_ours("x-session-set", P));
        assert!(!is_ours("x-sessionfoo", P));
        assert!(is_ours("x-sess-set", "x-sess"));
        assert!(!is_ours("x-session-set", "x-sess"));
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-public", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-public"));
    }

    #[test]
    fn changes_parse_in_the_contract_order() {
        let snap = json!({"a": 1, "b": 2}).as_object().unwrap().clone();
        let (c, unknown) = parse_changes(
            &pairs(&[
                ("x-session", r#"{"a":1,"c":3}"#),
                ("x-session-set", r#"{"d":"é"}"#),
                ("x-session-delete", r#"["zz"]"#),
                ("x-session-cycle", "TRUE"),
                ("x-session-expiry", "0"),
                ("x-session-subject", "user-7"),
                ("x-session-foo", "1"),
            ]),
            P,
            &snap,
        )
        .unwrap();
        assert!(c.cycle && !c.flush);
        assert_eq!(
            c.ops,
            vec![
                Op::Set("c".into(), json!(3)),
                Op::Delete("b".into()),
                Op::Set("d".into(), json!("é")),
                Op::Delete("zz".into()),
            ]
        );
        assert_eq!(c.expiry, Some(ExpiryMode::BrowserClose));
        assert_eq!(c.subject, Some(Some("user-7".into())));
        assert_eq!(unknown, vec!["X-Session-Foo".to_string()]);
    }

    #[test]
    fn after_a_flush_the_full_session_is_the_fresh_content() {
        let snap = json!({"user": 1}).as_object().unwrap().clone();
        let (c, _) = parse_changes(
            &pairs(&[("x-session-flush", "1"), ("x-session", r#"{"user":1}"#)]),
            P,
            &snap,
        )
        .unwrap();
        assert!(c.flush);
        assert_eq!(c.ops, vec![Op::Set("user".into(), json!(1))]);
    }

    #[test]
    fn bad_headers_are_named() {
        let snap = Data::new();
        for (name, value, named) in [
            ("x-session-set", "{not json", "X-Session-Set"),
            ("x-session", "[1]", "X-Session"),
            ("x-session-delete", r#"{"a":1}"#, "X-Session-Delete"),
            ("x-session-flush", "yes", "X-Session-Flush"),
            ("x-session-expiry", "tomorrow", "X-Session-Expiry"),
            ("x-session-expiry", "-5", "X-Session-Expiry"),
        ] {
            let e = parse_changes(&pairs(&[(name, value)]), P, &snap).unwrap_err();
            assert_eq!(e.header, named, "{e}");
        }
    }

    #[test]
    fn expiry_accepts_seconds_zero_timestamps_and_default() {
        let one = |v: &str| {
            parse_changes(&pairs(&[("x-session-expiry", v)]), P, &Data::new())
                .unwrap()
                .0
                .expiry
                .unwrap()
        };
        assert_eq!(one("300"), ExpiryMode::Seconds(300));
        assert_eq!(one("0"), ExpiryMode::BrowserClose);
        assert_eq!(one("Default"), ExpiryMode::Default);
        assert_eq!(one("1970-01-01T00:01:00Z"), ExpiryMode::At(60_000));
    }
}
