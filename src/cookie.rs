//! The session cookie: taking it out of the request, verifying it, and building the
//! `Set-Cookie` that sets or deletes it.
//!
//! With `secret_key` the value is signed with the cookie crate's HMAC-SHA256 signing (constant
//! time verification); `secret_key_fallbacks` still verify so a key can be rotated.

use cookie::{Cookie, CookieJar, Key};
use http::header::{COOKIE, HeaderMap, HeaderValue};
use time::OffsetDateTime;

use crate::config::{CookieConfig, SameSite};
use crate::session::{Millis, id};

/// What the request carried under our cookie name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Presented {
    /// The request carried at least one cookie with our name.
    pub carried: bool,
    /// The values that verified and are shaped like one of our keys, in request order (at most
    /// [`MAX_CANDIDATES`]): a browser sends several when stale copies linger under other paths.
    pub keys: Vec<String>,
}

/// How many copies of our cookie are looked up at most.
pub const MAX_CANDIDATES: usize = 4;

pub struct SessionCookie {
    config: CookieConfig,
    /// Signing keys, newest first; empty when cookies are unsigned.
    keys: Vec<Key>,
    /// The attributes every `Set-Cookie` of ours carries (`; HttpOnly; SameSite=Lax; Path=/`
    /// ...), formatted once by the cookie crate.
    attributes: String,
}

/// Stretches an operator's secret of any length into the 64 bytes the cookie crate wants.
fn derive_key(secret: &str) -> Key {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"session-sidecar cookie"), secret.as_bytes());
    let mut okm = [0u8; 64];
    hk.expand(b"signing", &mut okm)
        .expect("64 bytes is a valid HKDF-SHA256 output length");
    Key::from(&okm)
}

impl SessionCookie {
    pub fn new(config: CookieConfig, secret: Option<&str>, fallbacks: &[String]) -> SessionCookie {
        let keys = secret
            .into_iter()
            .chain(fallbacks.iter().map(String::as_str))
            .map(derive_key)
            .collect();
        let mut jar = SessionCookie {
            config,
            keys,
            attributes: String::new(),
        };
        let bare = jar.base(String::new()).to_string();
        jar.attributes = bare[jar.config.name.len() + 1..].to_string();
        jar
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether the request carries a cookie with our name (before [`take`](Self::take)).
    pub fn carried(&self, headers: &HeaderMap) -> bool {
        let name = self.config.name.as_bytes();
        headers
            .get_all(COOKIE)
            .iter()
            .any(|v| pairs(v.as_bytes()).any(|(n, _, _)| n == name))
    }

    /// Removes our cookie from the request's `Cookie` headers and says what it held. The other
    /// cookies pass byte for byte, whatever bytes they hold (a page script may set `theme=été`),
    /// joined into one `Cookie` header as an HTTP/1.1 upstream expects (RFC 9113 §8.2.3).
    pub fn take(&self, headers: &mut HeaderMap) -> Presented {
        let mut presented = Presented::default();
        let name = self.config.name.as_bytes();
        let count = headers.get_all(COOKIE).iter().count();
        if count == 0 || (count == 1 && !self.carried(headers)) {
            return presented;
        }
        let mut kept: Vec<u8> = Vec::new();
        for value in headers.get_all(COOKIE) {
            for (n, v, piece) in pairs(value.as_bytes()) {
                if n == name {
                    presented.carried = true;
                    if presented.keys.len() < MAX_CANDIDATES
                        && let Ok(raw) = std::str::from_utf8(v)
                        && let Some(key) = self.verify(raw.trim_matches('"'))
                        && !presented.keys.contains(&key)
                    {
                        presented.keys.push(key);
                    }
                } else {
                    if !kept.is_empty() {
                        kept.extend_from_slice(b"; ");
                    }
                    kept.extend_from_slice(piece);
                }
            }
        }
        headers.remove(COOKIE);
        if !kept.is_empty()
            && let Ok(v) = HeaderValue::from_bytes(&kept)
        {
            headers.insert(COOKIE, v);
        }
        presented
    }

    /// Whether an upstream `Set-Cookie` value sets or deletes a cookie of our name.
    pub fn is_ours_set_cookie(&self, value: &HeaderValue) -> bool {
        let bytes = value.as_bytes();
        let first = bytes.split(|&b| b == b';').next().unwrap_or(bytes);
        let name = first.split(|&b| b == b'=').next().unwrap_or(first);
        name.trim_ascii() == self.config.name.as_bytes()
    }

    /// The session key inside a cookie value, if it verifies.
    pub fn verify(&self, raw: &str) -> Option<String> {
        let key = if self.keys.is_empty() {
            raw.to_string()
        } else {
            let cookie = Cookie::new(self.config.name.clone(), raw.to_string());
            let jar = CookieJar::new();
            self.keys
                .iter()
                .find_map(|k| jar.signed(k).verify(cookie.clone()))?
                .value()
                .to_string()
        };
        id::is_well_formed(&key).then_some(key)
    }

    /// The cookie value for `key`, signed with the newest secret when signing is on.
    pub fn encode(&self, key: &str) -> String {
        match self.keys.first() {
            None => key.to_string(),
            Some(k) => {
                let mut jar = CookieJar::new();
                jar.signed_mut(k)
                    .add(Cookie::new(self.config.name.clone(), key.to_string()));
                jar.get(&self.config.name)
                    .expect("just added")
                    .value()
                    .to_string()
            }
        }
    }

    /// `Set-Cookie` for `key`; `max_age` in seconds, `None` for a browser-session cookie.
    ///
    /// The same text as the cookie crate makes (a test holds that), built from the attributes
    /// formatted once and the expiry formatted once per second and worker: formatting a date
    /// costs more than all the rest of a request's cookie work.
    pub fn set(&self, key: &str, max_age: Option<u64>, now: Millis) -> HeaderValue {
        let value = self.encode(key);
        let mut text = String::with_capacity(
            self.config.name.len() + value.len() + self.attributes.len() + 64,
        );
        text.push_str(&self.config.name);
        text.push('=');
        text.push_str(&value);
        text.push_str(&self.attributes);
        if let Some(secs) = max_age {
            expiry(&mut text, secs, now);
        }
        HeaderValue::from_str(&text).expect("cookie attributes are validated visible ASCII")
    }

    /// `Set-Cookie` that makes the browser drop the cookie (same Path and Domain).
    pub fn removal(&self) -> HeaderValue {
        let mut c = self.base(String::new());
        c.set_max_age(time::Duration::ZERO);
        c.set_expires(OffsetDateTime::UNIX_EPOCH);
        header(&c)
    }

    fn base(&self, value: String) -> Cookie<'static> {
        let cfg = &self.config;
        let mut c = Cookie::new(cfg.name.clone(), value);
        c.set_path(cfg.path.clone());
        if let Some(d) = &cfg.domain {
            c.set_domain(d.clone());
        }
        c.set_secure(cfg.secure);
        c.set_http_only(cfg.http_only);
        c.set_same_site(match cfg.same_site {
            SameSite::Strict => cookie::SameSite::Strict,
            SameSite::Lax => cookie::SameSite::Lax,
            SameSite::None => cookie::SameSite::None,
        });
        if cfg.partitioned {
            c.set_partitioned(true);
        }
        c
    }
}

/// The `name=value` pieces of a `Cookie` header as bytes, trimmed, empty pieces skipped:
/// `(name, value, piece)`.
fn pairs(header: &[u8]) -> impl Iterator<Item = (&[u8], &[u8], &[u8])> {
    header
        .split(|&b| b == b';')
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty())
        .map(|p| match p.iter().position(|&b| b == b'=') {
            Some(i) => (p[..i].trim_ascii(), p[i + 1..].trim_ascii(), p),
            None => (p, &p[p.len()..], p),
        })
}

fn at(now: Millis) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(now / 1000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Appends `; Max-Age=…; Expires=…` as the cookie crate writes them, remembering the last text
/// per worker thread (requests in the same second share it).
fn expiry(text: &mut String, max_age: u64, now: Millis) {
    thread_local! {
        static LAST: std::cell::RefCell<(i64, u64, String)> =
            const { std::cell::RefCell::new((i64::MIN, 0, String::new())) };
    }
    let second = now / 1000; // as `at` rounds
    LAST.with_borrow_mut(|(at_second, age, tail)| {
        if *at_second != second || *age != max_age {
            let mut c = Cookie::new("", "");
            c.set_max_age(time::Duration::seconds(max_age as i64));
            c.set_expires(at(now) + time::Duration::seconds(max_age as i64));
            // `=; Max-Age=…; Expires=…`: the attributes come last in the crate's order.
            *tail = c.to_string()[1..].to_string();
            (*at_second, *age) = (second, max_age);
        }
        text.push_str(tail);
    });
}

fn header(c: &Cookie) -> HeaderValue {
    HeaderValue::from_str(&c.to_string()).expect("cookie attributes are validated visible ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jar(secret: Option<&str>, fallbacks: &[&str]) -> SessionCookie {
        let cfg = crate::config::Config::from_toml("").unwrap();
        let fb: Vec<String> = fallbacks.iter().map(|s| s.to_string()).collect();
        SessionCookie::new(cfg.cookie, secret, &fb)
    }

    fn headers(cookie: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(cookie).unwrap());
        h
    }

    /// What `set` made before it was taken apart for speed: the cookie crate's whole text.
    fn set_by_the_crate(j: &SessionCookie, key: &str, max_age: Option<u64>, now: Millis) -> String {
        let mut c = j.base(j.encode(key));
        if let Some(secs) = max_age {
            c.set_max_age(time::Duration::seconds(secs as i64));
            c.set_expires(at(now) + time::Duration::seconds(secs as i64));
        }
        c.to_string()
    }

    #[test]
    fn set_cookie_text_is_the_cookie_crates_whatever_the_attributes_and_times() {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        let configs = [
            "",
            "[cookie]\nsecure = true\nsame_site = \"Strict\"\ndomain = \"example.com\"\npath = \"/app\"",
            "[cookie]\nhttp_only = false\nsame_site = \"None\"\nsecure = true\nname = \"sid\"",
        ];
        for toml in configs {
            let cfg = crate::config::Config::from_toml(toml).unwrap();
            for secret in [None, Some("s3cret")] {
                let j = SessionCookie::new(cfg.cookie.clone(), secret, &[]);
                let mut now: Millis = 1_764_000_000_123;
                for _ in 0..500 {
                    // Mostly the same second again, sometimes the next, sometimes far away.
                    now += match rng.gen_range(0..10) {
                        0 => rng.gen_range(-10_000_000..10_000_000),
                        1..=3 => rng.gen_range(0..2_000),
                        _ => 0,
                    };
                    let max_age = [None, Some(0), Some(1), Some(1_209_600)][rng.gen_range(0..4)];
                    let key = id::generate();
                    assert_eq!(
                        j.set(&key, max_age, now).to_str().unwrap(),
                        set_by_the_crate(&j, &key, max_age, now),
                        "{toml} {max_age:?} {now}"
                    );
                }
            }
        }
    }

    #[test]
    fn our_cookie_is_removed_and_others_pass() {
        let key = id::generate();
        let mut h = headers(&format!("a=1; sessionid={key}; b=\"x y\""));
        let p = jar(None, &[]).take(&mut h);
        assert_eq!(p.keys, vec![key]);
        assert_eq!(h.get(COOKIE).unwrap(), "a=1; b=\"x y\"");
    }

    #[test]
    fn only_our_cookie_leaves_no_cookie_header() {
        let mut h = headers("sessionid=garbage");
        let p = jar(None, &[]).take(&mut h);
        assert!(p.carried && p.keys.is_empty());
        assert!(h.get(COOKIE).is_none());
    }

    #[test]
    fn signed_values_verify_and_forgeries_do_not() {
        let j = jar(Some("new secret"), &["old secret"]);
        let key = id::generate();
        let value = j.encode(&key);
        assert_ne!(value, key);
        assert_eq!(j.verify(&value).as_deref(), Some(key.as_str()));
        assert_eq!(j.verify(&key), None, "an unsigned key is a forgery");
        let old = jar(Some("old secret"), &[]).encode(&key);
        assert_eq!(
            j.verify(&old).as_deref(),
            Some(key.as_str()),
            "fallback verifies"
        );
        let other = jar(Some("someone else"), &[]).encode(&key);
        assert_eq!(j.verify(&other), None);
    }

    #[test]
    fn set_cookie_carries_the_configured_attributes() {
        let j = jar(None, &[]);
        let v = j.set("k", Some(60), 0).to_str().unwrap().to_string();
        for part in [
            "sessionid=k",
            "HttpOnly",
            "SameSite=Lax",
            "Path=/",
            "Max-Age=60",
            "Expires=Thu, 01 Jan 1970 00:01:00 GMT",
        ] {
            assert!(v.contains(part), "{part} missing in {v}");
        }
        let v = j.set("k", None, 0).to_str().unwrap().to_string();
        assert!(!v.contains("Max-Age") && !v.contains("Expires"), "{v}");
        let v = j.removal().to_str().unwrap().to_string();
        assert!(v.contains("Max-Age=0") && v.contains("Path=/"), "{v}");
    }
}
