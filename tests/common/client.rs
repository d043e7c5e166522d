//! The client side: a cookie-keeping browser and a cookie-less client, what the echo app's
//! answer says it saw, our `Set-Cookie`, and raw bytes on a fresh connection.

use std::net::SocketAddr;
use std::time::Duration;

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
