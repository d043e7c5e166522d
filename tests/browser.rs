//! A real browser on the demo: headless Chromium, driven through its DevTools protocol, in front
//! of the example legacy app behind a real sidecar. What a person sees: the counter counting on
//! reload, a login in one tab showing in another, a logout in one tab ending the other's, the
//! cookie as the browser itself stores it, and the test-cookie page with cookies turned off.
//!
//! Skipped, saying so, where no Chromium is installed; `SIDECAR_REQUIRE_BROWSER=1` (CI) makes
//! that a failure. Screenshots go to target/screenshots/, and to docs/screenshots/ with
//! `UPDATE_SCREENSHOTS=1`.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, broadcast, oneshot};
use tokio_tungstenite::tungstenite::Message;

fn chromium_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;
type Sink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

/// One headless Chromium with its own profile, and a DevTools connection to it.
struct Chromium {
    _process: Killed,
    _profile: tempfile::TempDir,
    sink: Mutex<Sink>,
    waiters: Waiters,
    events: broadcast::Sender<Value>,
    next: AtomicU64,
}

/// One tab, attached with its own DevTools session.
struct Tab<'b> {
    browser: &'b Chromium,
    session: String,
}

impl Chromium {
    /// `None` (after saying why) where no Chromium is installed. `cookies_blocked` starts it
    /// with the profile setting "Don't allow sites to save data".
    async fn start(cookies_blocked: bool) -> Option<Chromium> {
        let Some(binary) = chromium_path() else {
            assert!(
                std::env::var_os("SIDECAR_REQUIRE_BROWSER").is_none(),
                "SIDECAR_REQUIRE_BROWSER is set and no chromium is installed"
            );
            eprintln!(
                "skipped: no chromium installed (`apt-get install chromium` runs these tests)"
            );
            return None;
        };
        let profile = tempfile::tempdir().unwrap();
        if cookies_blocked {
            let default = profile.path().join("Default");
            std::fs::create_dir_all(&default).unwrap();
            let prefs = json!({"profile": {"default_content_setting_values": {"cookies": 2}}});
            std::fs::write(default.join("Preferences"), prefs.to_string()).unwrap();
        }
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--window-size=900,520",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let stderr = child.stderr.take().unwrap();
        let process = Killed(child);
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let url = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stderr).lines();
            let url = lines.by_ref().map_while(Result::ok).find_map(|l| {
                l.split_once("DevTools listening on ")
                    .map(|(_, u)| u.to_string())
            });
            // Keep draining, or chromium blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            url
        })
        .await
        .unwrap()
        .expect("chromium printed its DevTools address");
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        let (sink, mut stream) = ws.split();
        let waiters: Waiters = Default::default();
        let (events, _) = broadcast::channel(1024);
        let (w, e) = (waiters.clone(), events.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let v: Value = serde_json::from_str(&text).unwrap();
                match v.get("id").and_then(Value::as_u64) {
                    Some(id) => {
                        if let Some(tx) = w.lock().await.remove(&id) {
                            let _ = tx.send(v);
                        }
                    }
                    None => {
                        let _ = e.send(v);
                    }
                }
            }
        });
        Some(Chromium {
            _process: process,
            _profile: profile,
            sink: Mutex::new(sink),
            waiters,
            events,
            next: AtomicU64::new(1),
        })
    }

    /// Sends a DevTools command (to a tab's session, or to the browser) and returns its result.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().await.insert(id, tx);
        self.sink
            .lock()
            .await
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .unwrap_or_else(|_| panic!("{method}: no answer"))
            .unwrap();
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    async fn tab(&self) -> Tab<'_> {
        let target = self
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        let tab = Tab {
            browser: self,
            session: attached["sessionId"].as_str().unwrap().to_string(),
        };
        tab.call("Page.enable", json!({})).await;
        tab
    }

    /// The cookies in the browser's own store.
    async fn cookies(&self) -> Vec<Value> {
        let all = self.call(None, "Storage.getCookies", json!({})).await;
        all["cookies"].as_array().unwrap().clone()
    }
}

impl Tab<'_> {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params).await
    }

    /// Runs `action` and waits for the page it starts to finish loading.
    async fn load(&self, method: &str, params: Value) -> String {
        let mut events = self.browser.events.subscribe();
        self.call(method, params).await;
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let e = events.recv().await.unwrap();
                if e["method"] == "Page.loadEventFired" && e["sessionId"] == self.session.as_str() {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{method}: the page did not load"));
        self.text().await
    }

    async fn open(&self, url: &str) -> String {
        self.load("Page.navigate", json!({"url": url})).await
    }

    async fn reload(&self) -> String {
        self.load("Page.reload", json!({})).await
    }

    /// What the page shows, as text.
    async fn text(&self) -> String {
        self.eval("document.body ? document.body.innerText : ''")
            .await
    }

    async fn eval(&self, expression: &str) -> String {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        r["result"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Evaluates `expression`, waits for the promise it returns, and gives its string value.
    async fn eval_promise(&self, expression: &str) -> String {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"]
            .as_str()
            .unwrap_or_else(|| panic!("{expression}: {r}"))
            .to_string()
    }

    async fn screenshot(&self, name: &str) {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut dirs = vec![root.join("target/screenshots")];
        if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
            dirs.push(root.join("docs/screenshots"));
        }
        for dir in dirs {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), &png).unwrap();
        }
    }
}

#[tokio::test]
async fn the_visit_counter_counts_across_reloads_in_a_real_browser() {
    let Some(chromium) = Chromium::start(false).await else {
        return;
    };
    let (_app, s) = python_demo("").await;
    let tab = chromium.tab().await;
    let page = tab.open(&s.url("/")).await;
    assert!(
        page.contains("You have visited this page 1 time."),
        "{page}"
    );
    for n in 2..=4 {
        let page = tab.reload().await;
        assert!(
            page.contains(&format!("You have visited this page {n} times.")),
            "{page}"
        );
    }
    tab.screenshot("counter.png").await;
}

#[tokio::test]
async fn login_and_logout_in_one_tab_show_in_the_other() {
    let Some(chromium) = Chromium::start(false).await else {
        return;
    };
    let (_app, s) = python_demo("").await;
    let (one, two) = (chromium.tab().await, chromium.tab().await);
    let cart = two.open(&s.url("/cart")).await;
    assert!(cart.contains("login as ann"), "{cart}");

    let home = one.open(&s.url("/login?user=ann")).await;
    assert!(home.contains("logged in as ann"), "{home}");
    assert!(home.contains("Welcome, ann!"), "{home}");
    one.screenshot("login.png").await;
    let cart = two.reload().await;
    assert!(cart.contains("logged in as ann"), "{cart}");

    let home = two.open(&s.url("/logout")).await;
    assert!(home.contains("You are logged out."), "{home}");
    let cart = one.open(&s.url("/cart")).await;
    assert!(cart.contains("login as ann"), "{cart}");
    assert!(!cart.contains("logged in as"), "{cart}");
}

#[tokio::test]
async fn the_browser_stores_the_cookie_with_the_configured_attributes() {
    let Some(chromium) = Chromium::start(false).await else {
        return;
    };
    for (extra, same_site, session_cookie) in [
        ("", "Lax", false),
        (
            "[cookie]\nsame_site = \"Strict\"\n[expiry]\nexpire_at_browser_close = true\n",
            "Strict",
            true,
        ),
    ] {
        let (_app, s) = python_demo(extra).await;
        let tab = chromium.tab().await;
        tab.open(&s.url("/")).await;
        let cookies = chromium.cookies().await;
        let ours = cookies
            .iter()
            .find(|c| c["name"] == "sessionid" && c["domain"] == "127.0.0.1")
            .unwrap_or_else(|| panic!("no sessionid cookie in {cookies:?}"));
        assert_eq!(ours["httpOnly"], true, "{ours}");
        assert_eq!(ours["sameSite"], same_site, "{ours}");
        assert_eq!(ours["path"], "/", "{ours}");
        assert_eq!(ours["secure"], false, "{ours}");
        assert_eq!(ours["session"], session_cookie, "{ours}");
        // HttpOnly: the page's scripts cannot read it.
        assert!(!tab.eval("document.cookie").await.contains("sessionid"));
        // Browsers share cookies across ports of one host: clear before the next sidecar.
        chromium.call(None, "Storage.clearCookies", json!({})).await;
    }
}

#[tokio::test]
async fn the_test_cookie_page_tells_a_browser_with_cookies_off() {
    let (_app, s) = python_demo("").await;
    let Some(blocked) = Chromium::start(true).await else {
        return;
    };
    let tab = blocked.tab().await;
    let first = tab.open(&s.url("/test-cookie")).await;
    assert!(first.contains("Test cookie set"), "{first}");
    let check = tab.open(&s.url("/test-cookie?check=1")).await;
    assert!(check.contains("does not accept cookies"), "{check}");
    assert!(blocked.cookies().await.is_empty());

    let Some(allowed) = Chromium::start(false).await else {
        return;
    };
    let tab = allowed.tab().await;
    tab.open(&s.url("/test-cookie")).await;
    let check = tab.open(&s.url("/test-cookie?check=1")).await;
    assert!(check.contains("Your browser accepts cookies."), "{check}");
}

/// The page of the polling race: its script polls `/poll` every 20 ms and, in `race(rounds,
/// budget_ms)`, logs in and out `rounds` times (or until `budget_ms` has passed). After each
/// login and each logout it waits until every poll that was in flight has been answered (so that
/// any `Set-Cookie` they carried has been applied), then asks `/whoami` what the app sees.
const RACE_PAGE: &str = r#"<!doctype html>
<title>polling race</title>
<p>A page that polls its session while its user logs in and out.</p>
<script>
let polls = 0, answeredNew = 0, pollFailures = 0;
const pending = new Set();
function poll() {
  const p = fetch('/poll?n=' + polls++, {cache: 'no-store'})
    .then(r => r.ok ? r.json() : Promise.reject(r.status))
    .then(seen => { if (seen.status === 'new') answeredNew++; })
    .catch(() => { pollFailures++; });
  pending.add(p);
  p.finally(() => pending.delete(p));
}
async function settle() { await Promise.allSettled([...pending]); }
async function post(path) {
  const r = await fetch(path, {method: 'POST', cache: 'no-store'});
  await r.text();
  return r.status;
}
async function whoami() {
  const r = await fetch('/whoami', {cache: 'no-store'});
  return r.json();
}
async function race(rounds, budgetMs) {
  const started = performance.now();
  const timer = setInterval(poll, 20);
  const log = [];
  try {
    await new Promise(r => setTimeout(r, 100));
    for (let i = 0; i < rounds && performance.now() - started < budgetMs; i++) {
      const login = await post('/login');
      await settle();
      const afterLogin = await whoami();
      const logout = await post('/logout');
      await settle();
      const afterLogout = await whoami();
      log.push({login, afterLogin, logout, afterLogout});
    }
  } finally {
    clearInterval(timer);
  }
  await settle();
  return JSON.stringify({log, polls, answeredNew, pollFailures,
                         ms: Math.round(performance.now() - started)});
}
</script>
"#;

/// The app of the polling race: `/` is the page (and starts a session, so that every login
/// cycles a live one), `POST /login` logs ann in (cycle, subject, user), `POST /logout` logs out
/// with a flash message (flush, then a fresh session holding the flash); every other path only
/// reads, and answers what the app saw: `{"status": X-Session-Status, "session": X-Session}`.
/// A poll takes the app 10 ms, as a real handler takes some time: polls are also in flight at
/// the sidecar while a login or a logout lands, not only on the way to it.
async fn race_app(req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<AppBody> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let seen = json!({
        "status": header("x-session-status"),
        "session": header("x-session").map(|s| serde_json::from_str::<Value>(&s).unwrap()),
    });
    if req.uri().path() == "/poll" {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resp = hyper::Response::builder().header("cache-control", "no-store");
    let (resp, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/") => (
            resp.header("content-type", "text/html; charset=utf-8")
                .header("X-Session-Set", r#"{"visited":true}"#),
            RACE_PAGE.to_string(),
        ),
        ("POST", "/login") => (
            resp.header("X-Session-Cycle", "1")
                .header("X-Session-Subject", "ann")
                .header("X-Session-Set", r#"{"user":"ann"}"#),
            seen.to_string(),
        ),
        ("POST", "/logout") => (
            resp.header("X-Session-Flush", "1")
                .header("X-Session-Set", r#"{"flash":"You are logged out."}"#),
            seen.to_string(),
        ),
        _ => (
            resp.header("content-type", "application/json"),
            seen.to_string(),
        ),
    };
    resp.body(full(body)).unwrap()
}

/// docs/HEADERS.md "Retired keys", in a real browser: a page polls its session every 20 ms while
/// its user logs in and out, through a relay that adds 15 ms each way, as a network would. Polls
/// sent before a login's (or a logout's) answer reached the browser still carry the old key and
/// are answered after it; Chromium applies `Set-Cookie` in the order answers arrive, so such an
/// answer must not touch the session cookie. After every login the browser is still logged in, as
/// the app sees the browser's next request once every racing poll has been answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_polling_through_logins_and_logouts_stays_logged_in_in_a_real_browser() {
    let Some(chromium) = Chromium::start(false).await else {
        return;
    };
    let app = start_app(race_app).await;
    let s = sidecar_for(app, "").await;
    let relay = common::relay::Relay::start(s.addr, Duration::from_millis(15)).await;
    let tab = chromium.tab().await;
    let page = tab.open(&relay.url("/")).await;
    assert!(page.contains("polls its session"), "{page}");
    // About 250 ms a round: 25 rounds take some 6-7 s; the budget keeps a slow machine within
    // the DevTools call's 20 s.
    let result = tab.eval_promise("race(25, 15000)").await;
    let result: Value = serde_json::from_str(&result).unwrap();
    let log = result["log"].as_array().unwrap();
    let mut logged_out = Vec::new();
    let mut flash_lost = 0;
    for (round, r) in log.iter().enumerate() {
        assert_eq!(
            (&r["login"], &r["logout"]),
            (&json!(200), &json!(200)),
            "{r}"
        );
        let after = &r["afterLogin"];
        if after["status"] != "existing" || after["session"]["user"] != "ann" {
            logged_out.push(format!(
                "round {round}: after the login the app saw {after}"
            ));
        }
        let after = &r["afterLogout"];
        assert!(
            after["session"].get("user").is_none(),
            "still logged in: {r}"
        );
        // Counted, not asserted: a poll that was already at the sidecar when the logout landed
        // answers with the removal of its stale cookie (docs/HEADERS.md §3), and when that answer
        // arrives after the logout's it deletes the flash session's cookie too.
        if after["session"]["flash"].is_null() {
            flash_lost += 1;
        }
    }
    eprintln!(
        "polling race: {} logins and logouts in {} ms, {} polls ({} answered `new`: sent with a \
         key a login or a logout had retired), {} failed polls, {} flash messages lost",
        log.len(),
        result["ms"],
        result["polls"],
        result["answeredNew"],
        result["pollFailures"],
        flash_lost
    );
    assert!(
        logged_out.is_empty(),
        "logged out after {} of {} logins:\n{}",
        logged_out.len(),
        log.len(),
        logged_out.join("\n")
    );
    assert!(
        log.len() >= 10,
        "only {} rounds within the budget",
        log.len()
    );
    // The race was run, not dodged: polls did leave with a key a login or logout had retired.
    assert!(
        result["answeredNew"].as_u64().unwrap() > 0,
        "no poll raced a login or a logout: {result}"
    );
    assert_eq!(result["pollFailures"], 0, "{result}");
}
