//! The same legacy app in Rust, with hyper and no session code of its own: it reads `X-Session`
//! and answers `X-Session-Set` / `-Cycle` / `-Flush`. Run it, then the sidecar in front of it:
//!
//! ```text
//! cargo run --example legacy_app -- 8000
//! cargo run -- --config config/sidecar.toml      # then open http://127.0.0.1:8080/
//! ```

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};

fn respond(status: u16, body: String, changes: &[(&str, String)]) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "text/html; charset=utf-8");
    for (name, value) in changes {
        b = b.header(*name, value);
    }
    if status == 303 {
        b = b.header("location", "/");
    }
    b.body(Full::new(Bytes::from(body))).unwrap()
}

async fn app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let session: Map<String, Value> = req
        .headers()
        .get("x-session")
        .and_then(|v| serde_json::from_slice(v.as_bytes()).ok())
        .unwrap_or_default();
    let user = session
        .get("user")
        .and_then(Value::as_str)
        .unwrap_or("nobody");
    let query = req.uri().query().unwrap_or("");
    Ok(match req.uri().path() {
        "/" => {
            let visits = session
                .get("num_visits")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                + 1;
            respond(
                200,
                format!("<h1>Hello, {user}</h1><p>You have visited this page {visits} times.</p>"),
                &[("X-Session-Set", json!({ "num_visits": visits }).to_string())],
            )
        }
        "/cart/add" => {
            let item = query.strip_prefix("item=").unwrap_or("thing");
            let mut cart = session.get("cart").cloned().unwrap_or(json!([]));
            cart.as_array_mut().unwrap().push(json!(item));
            respond(
                200,
                format!("<p>Cart: {cart}</p>"),
                &[("X-Session-Set", json!({ "cart": cart }).to_string())],
            )
        }
        "/login" => {
            let name = query.strip_prefix("user=").unwrap_or("ann");
            respond(
                303,
                String::new(),
                &[
                    ("X-Session-Cycle", "1".into()),
                    ("X-Session-Set", json!({ "user": name }).to_string()),
                    ("X-Session-Subject", name.to_string()),
                ],
            )
        }
        "/logout" => respond(303, String::new(), &[("X-Session-Flush", "1".into())]),
        _ => respond(404, "<p>No such page.</p>".into(), &[]),
    })
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("legacy app (Rust) on http://127.0.0.1:{port}; reach it through the sidecar");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(app))
                .await;
        });
    }
}
