//! Live reload, on the real binary with a real SIGHUP: what may change does, on connections
//! that stay open and for requests in flight; what may not is refused, named in the log, and
//! the running configuration stays (docs/CONFIGURATION.md, "Reloading the configuration").

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::binary::*;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

const OLD_SECRET: &str = "the secret the sidecar started with, 32 bytes or more";
const NEW_SECRET: &str = "the secret it was rotated to, also 32 bytes or more";

/// Writes the config in `dir`: the app, `body` (top-level keys, then tables), the store in
/// `dir`, and the `[admin]` table's lines.
fn write(dir: &Path, app: SocketAddr, body: &str, admin: &str) -> PathBuf {
    let path = dir.join("sidecar.toml");
    let store = dir.join("sessions").display().to_string();
    let text = format!(
        "listen = \"127.0.0.1:0\"\nupstream = \"http://{app}\"\n{body}\n\
         [store]\npath = {store:?}\n[admin]\n{admin}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

const NO_ADMIN: &str = "listen = \"\"";

/// Rewrites the config in `dir` and sends SIGHUP; returns once the sidecar logged its `n`th
/// reload.
async fn reload(p: &Proc, dir: &Path, app: SocketAddr, body: &str, n: usize) {
    write(dir, app, body, NO_ADMIN);
    p.signal("-HUP");
    p.await_log("configuration reloaded", n).await;
}

/// One connection to the sidecar, held open across reloads: a request that cannot be sent on it
/// means the connection was dropped.
struct Connection(hyper::client::conn::http1::SendRequest<Empty<Bytes>>);

impl Connection {
    async fn open(addr: std::net::SocketAddr) -> Connection {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        Connection(send)
    }

    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> http::Response<Bytes> {
        let mut req = http::Request::get(path).header("host", "app.test");
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let resp = self
            .0
            .send_request(req.body(Empty::new()).unwrap())
            .await
            .expect("the connection stayed open");
        let (parts, body) = resp.into_parts();
        http::Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    }
}

/// Visitors counting through the sidecar without pause, each on its own keep-alive
/// connections, each checking that every answer is a 200 and its count never starts over.
struct Traffic {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    visitors: Vec<tokio::task::JoinHandle<(i64, reqwest::Client)>>,
}

impl Traffic {
    fn start(url: String, n: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let visitors = (0..n)
            .map(|_| {
                let (url, stop, answered) = (url.clone(), stop.clone(), answered.clone());
                tokio::spawn(async move {
                    let client = browser();
                    let mut count = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let resp = get(&client, &url).incr("n").send().await;
                        assert_eq!(resp.status(), 200);
                        assert_eq!(seen(resp).await.session()["n"].as_i64().unwrap_or(0), count);
                        count += 1;
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    (count, client)
                })
            })
            .collect();
        Traffic {
            stop,
            answered,
            visitors,
        }
    }

    /// Waits (polling the count, which moves by itself) for `n` more answers.
    async fn answers(&self, n: usize) {
        let target = self.answered.load(Ordering::SeqCst) + n;
        while self.answered.load(Ordering::SeqCst) < target {
            assert!(
                self.visitors.iter().all(|v| !v.is_finished()),
                "a visitor failed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Each visitor's count and its client (its cookies).
    async fn stop(self) -> Vec<(i64, reqwest::Client)> {
        self.stop.store(true, Ordering::SeqCst);
        let mut out = Vec::new();
        for v in self.visitors {
            out.push(v.await.expect("a visitor failed"));
        }
        out
    }
}

fn our_set_cookie(resp: &http::Response<Bytes>) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("sessionid=") || c.starts_with("sid="))
}

#[tokio::test]
async fn rotating_the_secret_under_traffic_logs_no_visitor_out() {
    let (app, gate) = gated_app().await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, OLD_SECRET).unwrap();
    let file = format!("[security]\nsecret_key_file = {:?}", secret_file.display());
    let p = start(&write(dir.path(), app, &file, NO_ADMIN));

    // A visitor seen only before the rotation: its cookie is signed, and its record sealed,
    // with the old secret alone.
    let idle = browser();
    let first = p.get(&idle, "/").incr("n").send().await;
    assert_eq!(first.status(), 200);

    // Visitors counting without pause, each checking that its count never starts over.
    const VISITORS: usize = 16;
    let traffic = Traffic::start(p.url("/"), VISITORS);
    // A request in flight while the secret changes: its change still lands.
    let slow = browser();
    let in_flight = tokio::spawn({
        let visit = p.get(&slow, "/gate").incr("n");
        async move { visit.send().await.status() }
    });
    gate.wait_arrival().await;
    traffic.answers(VISITORS * 10).await;
    // The new secret from the secret file, the old one kept as a fallback.
    std::fs::write(&secret_file, NEW_SECRET).unwrap();
    let rotation = format!("{file}\nsecret_key_fallbacks = [{OLD_SECRET:?}]");
    reload(&p, dir.path(), app, &rotation, 1).await;
    gate.open(1);
    assert_eq!(in_flight.await.unwrap(), 200);
    let resp = p.get(&slow, "/").send().await;
    assert_eq!(
        seen(resp).await.session()["n"],
        1,
        "the in-flight change landed"
    );
    // Every visitor is seen (and re-signed, re-sealed by its change) under the new secret.
    traffic.answers(VISITORS * 20).await;
    // The idle visitor's old cookie and record still open through the fallback.
    let resp = p.get(&idle, "/").send().await;
    assert_eq!(seen(resp).await.session()["n"], 1);

    // Dropping the fallback: every visitor seen since the rotation holds a cookie signed, and a
    // record sealed, with the new secret alone.
    reload(&p, dir.path(), app, &file, 2).await;
    traffic.answers(VISITORS * 10).await;
    let seen_since = traffic.stop().await;
    let total: i64 = seen_since.iter().map(|(count, _)| count).sum();
    assert!(total > (VISITORS * 30) as i64, "{total} requests");
    // The idle visitor, last seen before the rotation, is the only one the old secret held.
    let s = p.get(&idle, "/").seen().await;
    assert_eq!(
        s.status(),
        "new",
        "the old secret no longer verifies anything"
    );
    let log = p.log();
    assert!(log.contains("secrets_rotated=true"), "{log}");
    assert!(!log.contains(OLD_SECRET) && !log.contains(NEW_SECRET));
    p.signal("-TERM");
    let (status, _) = tokio::task::spawn_blocking(move || p.wait()).await.unwrap();
    assert!(status.success());

    // Restarted with the new secret alone, on the same store: the cookies were re-signed and
    // the records re-sealed with it, not only read through the fallback.
    let p = start(&dir.path().join("sidecar.toml"));
    for (count, client) in seen_since {
        let resp = p.get(&client, "/").send().await;
        assert_eq!(seen(resp).await.session()["n"], count);
    }
    p.signal("-TERM");
    let _ = tokio::task::spawn_blocking(move || p.wait()).await;
}

#[tokio::test]
async fn cookie_attributes_expiry_skip_paths_upstream_and_admin_token_change_on_an_open_connection()
{
    let first_app = start_app(echo).await;
    let second_app = start_app(|req| async move {
        let mut resp = echo(req).await;
        resp.headers_mut()
            .insert("x-app", http::HeaderValue::from_static("second"));
        resp
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let token = |t: &str| format!("listen = {admin:?}\ntoken = {t:?}");
    let p = start(&write(dir.path(), first_app, "", &token("first-token")));
    let mut conn = Connection::open(p.addr).await;

    let resp = conn.get("/", &[("x-test-incr", "n")]).await;
    assert!(resp.headers().get("x-app").is_none());
    let set = our_set_cookie(&resp).unwrap();
    assert!(
        set.contains("SameSite=Lax") && set.contains("Max-Age=1209600"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    let resp = conn.get("/static/a.css", &[("cookie", &cookie)]).await;
    let seen: Seen = serde_json::from_slice(resp.body()).unwrap();
    assert_eq!(seen.status(), "existing");
    let admin_get = |token: &'static str| {
        let url = format!("http://{admin}/metrics");
        async move {
            plain()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(admin_get("first-token").await, 200);

    let after = "skip_paths = [\"/static/\"]\n[cookie]\nsame_site = \"Strict\"\n\
                 [expiry]\ncookie_age = 600";
    write(dir.path(), second_app, after, &token("second-token"));
    p.signal("-HUP");
    p.await_log("configuration reloaded", 1).await;

    // The same connection: the new app, the new attributes and age, the same session.
    let resp = conn
        .get("/", &[("cookie", &cookie), ("x-test-incr", "n")])
        .await;
    assert_eq!(resp.headers()["x-app"], "second");
    let seen: Seen = serde_json::from_slice(resp.body()).unwrap();
    assert_eq!(seen.session()["n"], 1);
    let set = our_set_cookie(&resp).unwrap();
    assert!(
        set.contains("SameSite=Strict") && set.contains("Max-Age=600"),
        "{set}"
    );
    let resp = conn.get("/static/a.css", &[("cookie", &cookie)]).await;
    let seen: Seen = serde_json::from_slice(resp.body()).unwrap();
    assert!(seen.header("x-session").is_none(), "a skip path now");
    assert_eq!(admin_get("first-token").await, 401);
    assert_eq!(admin_get("second-token").await, 200);
    p.signal("-TERM");
    let _ = tokio::task::spawn_blocking(move || p.wait()).await;
}

#[tokio::test]
async fn a_reload_that_changes_a_key_read_only_at_start_is_refused_naming_it_and_changes_nothing() {
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), app, "", NO_ADMIN);
    let p = start(&config);
    let mut conn = Connection::open(p.addr).await;

    // listen and store.path cannot change live; the cookie name could, but the whole reload is
    // refused.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"")
        .replace("sessions\"", "elsewhere\"")
        + "[cookie]\nname = \"sid\"\n";
    std::fs::write(&config, text).unwrap();
    p.signal("-HUP");
    p.await_log("reload refused", 2).await;
    let log = p.log();
    assert!(
        log.contains("config key `listen` is read only at start"),
        "{log}"
    );
    assert!(
        log.contains("config key `store.path` is read only at start"),
        "{log}"
    );
    let resp = conn.get("/", &[("x-test-incr", "n")]).await;
    let set = our_set_cookie(&resp).unwrap();
    assert!(set.starts_with("sessionid="), "the old config stays: {set}");

    // A file that no longer validates: refused, naming the key; fixed, it is taken.
    write(
        dir.path(),
        app,
        "[cookie]\nsame_site = \"Sometimes\"",
        NO_ADMIN,
    );
    p.signal("-HUP");
    p.await_log("reload refused", 3).await;
    assert!(p.log().contains("cookie.same_site"), "{}", p.log());
    let resp = conn.get("/", &[("x-test-incr", "n")]).await;
    assert!(our_set_cookie(&resp).unwrap().contains("SameSite=Lax"));
    // A file gone (a config map being replaced): refused, naming the file.
    std::fs::remove_file(&config).unwrap();
    p.signal("-HUP");
    p.await_log("reload refused", 4).await;
    assert!(p.log().contains("cannot read config file"), "{}", p.log());
    let resp = conn.get("/", &[("x-test-incr", "n")]).await;
    assert_eq!(resp.status(), 200);
    reload(&p, dir.path(), app, "[cookie]\nsame_site = \"Strict\"", 1).await;
    let resp = conn.get("/", &[("x-test-incr", "n")]).await;
    assert!(our_set_cookie(&resp).unwrap().contains("SameSite=Strict"));
    p.signal("-TERM");
    let (status, _) = tokio::task::spawn_blocking(move || p.wait()).await.unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn log_level_changes_live_unless_rust_log_rules() {
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), app, "log_level = \"info,access=off\"", NO_ADMIN);
    let mut cmd = Command::new(BIN);
    cmd.args(["--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG");
    let p = start_with(cmd);
    let client = plain();
    p.get(&client, "/first").send().await;
    reload(&p, dir.path(), app, "log_level = \"info\"", 1).await;
    p.get(&client, "/second").send().await;
    p.await_log("path=\"/second\"", 1).await;
    assert!(!p.log().contains("path=\"/first\""), "{}", p.log());
    p.signal("-TERM");
    let _ = tokio::task::spawn_blocking(move || p.wait()).await;

    // With RUST_LOG set, it keeps the filter and the reload says so.
    let dir = tempfile::tempdir().unwrap();
    let p = start(&write(dir.path(), app, "", NO_ADMIN));
    reload(&p, dir.path(), app, "log_level = \"warn\"", 1).await;
    p.get(&client, "/third").send().await;
    p.await_log("path=\"/third\"", 1).await;
    assert!(p.log().contains("RUST_LOG is set"), "{}", p.log());
    p.signal("-TERM");
    let _ = tokio::task::spawn_blocking(move || p.wait()).await;
}

#[tokio::test]
async fn reloads_in_a_row_under_traffic_drop_no_request_and_lose_no_change() {
    let apps = [start_app(echo).await, start_app(echo).await];
    let dir = tempfile::tempdir().unwrap();
    let p = start(&write(dir.path(), apps[0], "", NO_ADMIN));
    const VISITORS: usize = 8;
    const RELOADS: usize = 20;
    let traffic = Traffic::start(p.url("/"), VISITORS);
    // The app moves between two addresses and the expiry policy changes, reload after reload.
    for n in 1..=RELOADS {
        let body = format!("[expiry]\ncookie_age = {}", 600 + n);
        reload(&p, dir.path(), apps[n % 2], &body, n).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let total: i64 = traffic.stop().await.iter().map(|(count, _)| count).sum();
    assert!(total >= (VISITORS * RELOADS) as i64, "{total} requests");
    p.signal("-TERM");
    let (status, _) = tokio::task::spawn_blocking(move || p.wait()).await.unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_new_sweep_interval_is_taken_live_and_frequent_reloads_do_not_postpone_the_sweep() {
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let expiry = |every: u64| format!("[expiry]\ncookie_age = 1\nsweep_interval = {every}");
    let p = start(&write(dir.path(), app, &expiry(3600), NO_ADMIN));
    let resp = p.get(&browser(), "/").incr("n").send().await;
    assert_eq!(set_cookies(&resp).len(), 1, "a session was stored");
    // From an hour to two seconds; then the same file again and again, faster than that.
    reload(&p, dir.path(), app, &expiry(2), 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut reloads = 1;
    while !p.log().contains("swept expired records") {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        reloads += 1;
        reload(&p, dir.path(), app, &expiry(2), reloads).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(reloads >= 3, "{reloads} reloads while the sweep was due");
    p.signal("-TERM");
    let _ = tokio::task::spawn_blocking(move || p.wait()).await;
}

/// The `X-Session-Signature` the app got, checked with `key` as docs/SIGNING.md says.
fn signed_with(seen: &Seen, key: &str) -> bool {
    use hmac::Mac;
    let Some(sig) = seen.header("x-session-signature") else {
        return false;
    };
    let fields: std::collections::HashMap<&str, &str> = sig
        .split(';')
        .skip(1)
        .filter_map(|p| p.trim().split_once('='))
        .collect();
    let mut msg = format!("v1\n{}\n", fields["t"]);
    for name in fields["h"].split(' ') {
        msg += &format!("{name}:{}\n", seen.header(name).unwrap());
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(msg.as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex == fields["s"]
}

#[tokio::test]
async fn the_upstream_signing_key_and_the_identity_header_change_live() {
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let p = start(&write(dir.path(), app, "", NO_ADMIN));
    let mut conn = Connection::open(p.addr).await;
    let seen =
        |resp: http::Response<Bytes>| -> Seen { serde_json::from_slice(resp.body()).unwrap() };
    let first = seen(conn.get("/", &[("x-webauth-user", "admin")]).await);
    assert!(first.header("x-session-signature").is_none());
    assert_eq!(
        first.header("x-webauth-user"),
        Some("admin"),
        "not ours yet"
    );

    let with = |key: &str| {
        format!(
            "[security]\nupstream_signing_key = {key:?}\n[identity]\nheader = \"X-WEBAUTH-USER\""
        )
    };
    reload(&p, dir.path(), app, &with(OLD_SECRET), 1).await;
    let signed = seen(conn.get("/", &[("x-webauth-user", "admin")]).await);
    assert!(signed_with(&signed, OLD_SECRET), "{:?}", signed.headers);
    assert_eq!(
        signed.header("x-webauth-user"),
        None,
        "a client's spelling is removed"
    );

    reload(&p, dir.path(), app, &with(NEW_SECRET), 2).await;
    let rotated = seen(conn.get("/", &[]).await);
    assert!(signed_with(&rotated, NEW_SECRET), "{:?}", rotated.headers);
    assert!(!signed_with(&rotated, OLD_SECRET));
    p.signal("-TERM");
    let _ = tokio::task::spawn_blocking(move || p.wait()).await;
}
