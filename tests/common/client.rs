//! The client side: a cookie-keeping browser and a cookie-less client, one request as a test
//! states it (`Visit`), what the echo app's answer says it saw, our `Set-Cookie`, and raw bytes
//! on a fresh connection.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};

use super::apps::Seen;

/// A cookie-keeping client, like a browser.
pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A client that keeps no cookies, for raw Cookie headers.
pub fn plain() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `x-test-reply` value for a list of response headers.
pub fn reply(pairs: &[(&str, &str)]) -> String {
    serde_json::to_string(
        &pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>(),
    )
    .unwrap()
}

/// A GET of `url` with `client`; `Sidecar::get` takes a path instead.
pub fn get(client: &reqwest::Client, url: impl reqwest::IntoUrl) -> Visit {
    Visit(client.get(url))
}

/// One request on its way: what the test asks of the sidecar and of the echo app, then
/// `send` (the answer), `seen` (what the app saw) or `text`. Each panics where no answer
/// comes, as a test should.
#[must_use = "a visit does nothing until it is sent"]
pub struct Visit(pub(super) reqwest::RequestBuilder);

impl Visit {
    pub fn header<K, V>(self, name: K, value: V) -> Visit
    where
        HeaderName: TryFrom<K>,
        <HeaderName as TryFrom<K>>::Error: Into<http::Error>,
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        Visit(self.0.header(name, value))
    }

    pub fn headers(self, pairs: &[(&str, &str)]) -> Visit {
        pairs.iter().fold(self, |v, &(n, val)| v.header(n, val))
    }

    /// A `Cookie` header as given; a `browser()` adds the cookies of its jar to it.
    pub fn cookie<V>(self, cookies: V) -> Visit
    where
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        self.header(reqwest::header::COOKIE, cookies)
    }

    /// The echo app adds one to the session's `key` (`x-test-incr`).
    pub fn incr(self, key: &str) -> Visit {
        self.header("x-test-incr", key)
    }

    /// The echo app answers with these headers, e.g. session changes (`x-test-reply`).
    pub fn reply(self, headers: &[(&str, &str)]) -> Visit {
        self.header("x-test-reply", reply(headers))
    }

    pub fn body(self, body: impl Into<reqwest::Body>) -> Visit {
        Visit(self.0.body(body))
    }

    pub async fn send(self) -> reqwest::Response {
        self.0.send().await.unwrap()
    }

    /// What the echo app saw; the answer must be a success.
    pub async fn seen(self) -> Seen {
        seen(self.send().await).await
    }

    pub async fn text(self) -> String {
        self.send().await.text().await.unwrap()
    }
}

pub async fn seen(resp: reqwest::Response) -> Seen {
    assert!(resp.status().is_success(), "status {}", resp.status());
    resp.json().await.unwrap()
}

/// The `Set-Cookie` headers of a response, for our cookie.
pub fn set_cookies(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .filter(|c| c.starts_with("sessionid="))
        .collect()
}

/// The session key in a `Set-Cookie` value.
pub fn cookie_value(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_string()
}

/// Writes `request` on a fresh connection and reads until the peer closes (or 10 s pass).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
