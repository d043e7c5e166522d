//! Cross-site request forgery defences for the app behind the sidecar (`[csrf]`,
//! docs/PROTECTING.md). The sidecar owns the session cookie, so it can refuse a forged request
//! before the app sees it:
//!
//! - the origin check, as Go 1.25's `CrossOriginProtection` does it: an unsafe request is
//!   refused when the browser says it comes from another site (`Sec-Fetch-Site`), or, from a
//!   browser too old to say, when its `Origin` is not the request's own host;
//! - a per-session token for apps that want the classic pattern (Django's `{% csrf_token %}`):
//!   derived from the session key, handed to the app masked with fresh random bytes on every
//!   request (so a compressed page does not leak it, BREACH), and required back on unsafe
//!   requests in a header or an urlencoded form field; compared in constant time.

use hmac::{Hmac, Mac};
use http::{HeaderMap, Method, header};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::session::id::hex;

/// Methods that must not change anything (RFC 9110 §9.2.1); every other one is checked.
pub fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// The origin check on an unsafe request: `Err` with the reason when it comes from elsewhere.
/// `host` is the request's own host (with its port, as the browser wrote it); `trusted` the
/// configured origins, lower-cased.
pub fn check_origin(
    headers: &HeaderMap,
    host: Option<&str>,
    trusted: &[String],
) -> Result<(), String> {
    let origin = headers.get(header::ORIGIN);
    if let Some(o) = origin.and_then(|o| o.to_str().ok())
        && trusted.iter().any(|t| t.eq_ignore_ascii_case(o))
    {
        return Ok(());
    }
    // Browsers since 2023 say where a request comes from; a request typed in the address bar
    // or from a bookmark is `none`.
    if let Some(site) = headers.get("sec-fetch-site") {
        return match site.as_bytes() {
            b"same-origin" | b"none" => Ok(()),
            other => Err(format!(
                "cross-origin request refused (Sec-Fetch-Site: {})",
                String::from_utf8_lossy(other).escape_debug()
            )),
        };
    }
    // No Sec-Fetch-Site: not a browser, or an old one. Without Origin either, nothing says it
    // is cross-site (old browsers send no Origin on same-origin form posts).
    let Some(origin) = origin else {
        return Ok(());
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, authority)| authority);
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(format!(
            "cross-origin request refused (Origin: {})",
            String::from_utf8_lossy(origin.as_bytes()).escape_debug()
        )),
    }
}

const TOKEN_LABEL: &[u8] = b"session-sidecar csrf token v1";
const SECRET_LEN: usize = 32;

/// The session's token secret: HMAC-SHA256 keyed by the session key. It changes with the key
/// (a login cycles it) and says nothing about the key.
fn secret(session_key: &str) -> [u8; SECRET_LEN] {
    let mut mac = Hmac::<Sha256>::new_from_slice(session_key.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(TOKEN_LABEL);
    mac.finalize().into_bytes().into()
}

fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    text.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// The token for the app to embed: a fresh random mask and the secret XOR the mask, in hex
/// (128 characters), different on every request, valid for the session's key.
pub fn masked(session_key: &str) -> String {
    let secret = secret(session_key);
    let mut out = [0u8; 2 * SECRET_LEN];
    rand::thread_rng().fill_bytes(&mut out[..SECRET_LEN]);
    for i in 0..SECRET_LEN {
        out[SECRET_LEN + i] = out[i] ^ secret[i];
    }
    hex(&out)
}

/// Whether `presented` (masked, or the bare secret in hex) is the token of `session_key`.
pub fn verify(session_key: &str, presented: &[u8]) -> bool {
    let secret = secret(session_key);
    let Some(bytes) = unhex(presented.trim_ascii()) else {
        return false;
    };
    let unmasked: Vec<u8> = match bytes.len() {
        SECRET_LEN => bytes,
        n if n == 2 * SECRET_LEN => (0..SECRET_LEN)
            .map(|i| bytes[i] ^ bytes[SECRET_LEN + i])
            .collect(),
        _ => return false,
    };
    unmasked.ct_eq(&secret).into()
}

/// The value of `field` in an `application/x-www-form-urlencoded` body, if present.
pub fn form_field<'a>(body: &'a [u8], field: &str) -> Option<std::borrow::Cow<'a, [u8]>> {
    body.split(|&b| b == b'&').find_map(|pair| {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        let decode = |raw: &'a [u8]| -> std::borrow::Cow<'a, [u8]> {
            if raw.contains(&b'+') {
                let spaced: Vec<u8> = raw
                    .iter()
                    .map(|&b| if b == b'+' { b' ' } else { b })
                    .collect();
                std::borrow::Cow::Owned(percent_encoding::percent_decode(&spaced).collect())
            } else {
                percent_encoding::percent_decode(raw).into()
            }
        };
        (decode(name).as_ref() == field.as_bytes()).then(|| decode(value))
    })
}

/// Whether a request's `Content-Type` is an urlencoded form.
pub fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_origin_check_follows_fetch_metadata_then_origin() {
        let host = Some("shop.example:8080");
        let trusted = vec!["https://sso.example".to_string()];
        let check = |pairs: &[(&str, &str)]| check_origin(&headers(pairs), host, &trusted);
        // Fetch metadata decides when a browser sends it.
        assert!(check(&[("sec-fetch-site", "same-origin")]).is_ok());
        assert!(check(&[("sec-fetch-site", "none")]).is_ok());
        assert!(check(&[("sec-fetch-site", "cross-site")]).is_err());
        assert!(
            check(&[("sec-fetch-site", "same-site")]).is_err(),
            "a sibling subdomain may be hostile"
        );
        assert!(
            check(&[("sec-fetch-site", "Same-Origin")]).is_err(),
            "tokens are lower case"
        );
        assert!(
            check(&[
                ("sec-fetch-site", "cross-site"),
                ("origin", "http://shop.example:8080")
            ])
            .is_err(),
            "the browser's word wins over a matching Origin"
        );
        // A trusted origin passes whatever else the request says.
        assert!(
            check(&[
                ("sec-fetch-site", "cross-site"),
                ("origin", "https://SSO.example")
            ])
            .is_ok()
        );
        assert!(
            check(&[
                ("sec-fetch-site", "cross-site"),
                ("origin", "https://sso.example.evil")
            ])
            .is_err()
        );
        // Older browsers: Origin against the request's own host.
        assert!(check(&[("origin", "http://shop.example:8080")]).is_ok());
        assert!(
            check(&[("origin", "https://SHOP.example:8080")]).is_ok(),
            "scheme unknown behind a proxy"
        );
        assert!(
            check(&[("origin", "http://shop.example")]).is_err(),
            "another port"
        );
        assert!(check(&[("origin", "http://evil.example")]).is_err());
        assert!(
            check(&[("origin", "null")]).is_err(),
            "sandboxed or privacy-sensitive"
        );
        // Nothing at all: not a browser, or an old one posting to its own origin.
        assert!(check(&[]).is_ok());
        assert!(check_origin(&headers(&[("origin", "http://x")]), None, &[]).is_err());
    }

    #[test]
    fn tokens_are_masked_per_request_and_bound_to_the_session_key() {
        let key = "a".repeat(64);
        let (t1, t2) = (masked(&key), masked(&key));
        assert_eq!(t1.len(), 128);
        assert_ne!(t1, t2, "a fresh mask every time");
        assert!(verify(&key, t1.as_bytes()) && verify(&key, t2.as_bytes()));
        assert!(
            verify(&key, t1.to_uppercase().as_bytes()),
            "hex in either case"
        );
        assert!(
            verify(&key, hex(&secret(&key)).as_bytes()),
            "the bare secret"
        );
        assert!(!verify(&"b".repeat(64), t1.as_bytes()), "another session's");
        assert!(!verify(&key, b""));
        assert!(!verify(&key, &t1.as_bytes()[..127]));
        assert!(!verify(&key, format!("{t1}00").as_bytes()));
        assert!(!verify(&key, "zz".repeat(64).as_bytes()));
        for i in 0..t1.len() {
            let mut bad = t1.clone().into_bytes();
            bad[i] = if bad[i] == b'0' { b'1' } else { b'0' };
            assert!(!verify(&key, &bad), "a changed digit at {i}");
        }
        // The token says nothing of the key: not in it, not the handle.
        assert!(
            !t1.contains(&key) && !hex(&secret(&key)).contains(&crate::session::id::handle(&key))
        );
    }

    #[test]
    fn the_form_field_is_found_decoded() {
        let body = b"a=1&csrfmiddlewaretoken=ab%63d&x";
        assert_eq!(
            form_field(body, "csrfmiddlewaretoken").as_deref(),
            Some(&b"abcd"[..])
        );
        assert_eq!(
            form_field(b"my+field=a+b", "my field").as_deref(),
            Some(&b"a b"[..])
        );
        assert_eq!(form_field(b"x", "x").as_deref(), Some(&b""[..]));
        assert!(form_field(b"a=1&b=2", "c").is_none());
        assert!(form_field(b"", "c").is_none());
        assert!(is_form(&headers(&[(
            "content-type",
            "application/x-www-form-urlencoded; charset=UTF-8"
        )])));
        assert!(!is_form(&headers(&[(
            "content-type",
            "multipart/form-data; boundary=x"
        )])));
        assert!(!is_form(&headers(&[])));
    }
}
