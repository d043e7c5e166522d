//! A real browser for the tests: headless Chromium with its own profile, driven through its
//! DevTools protocol (a tab navigates, reloads, evaluates script, screenshots; the browser's own
//! cookie store is read). `Chromium::start` says why and gives `None` where no Chromium is
//! installed, unless `SIDECAR_REQUIRE_BROWSER` is set (CI), which makes that a failure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, broadcast, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::Killed;

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
pub struct Chromium {
    _process: Killed,
    _profile: tempfile::TempDir,
    sink: Mutex<Sink>,
    waiters: Waiters,
    events: broadcast::Sender<Value>,
    next: AtomicU64,
}

/// One tab, attached with its own DevTools session.
pub struct Tab<'b> {
    browser: &'b Chromium,
    session: String,
}

impl Chromium {
    /// `None` (after saying why) where no Chromium is installed. `cookies_blocked` starts it
    /// with the profile setting "Don't allow sites to save data".
    pub async fn start(cookies_blocked: bool) -> Option<Chromium> {
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
    pub async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
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

    pub async fn tab(&self) -> Tab<'_> {
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
    pub async fn cookies(&self) -> Vec<Value> {
        let all = self.call(None, "Storage.getCookies", json!({})).await;
        all["cookies"].as_array().unwrap().clone()
    }
}

impl Tab<'_> {
    pub async fn call(&self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params).await
    }

    /// Runs `action` and waits for the page it starts to finish loading.
    pub async fn load(&self, method: &str, params: Value) -> String {
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

    pub async fn open(&self, url: &str) -> String {
        self.load("Page.navigate", json!({"url": url})).await
    }

    pub async fn reload(&self) -> String {
        self.load("Page.reload", json!({})).await
    }

    /// What the page shows, as text.
    pub async fn text(&self) -> String {
        self.eval("document.body ? document.body.innerText : ''")
            .await
    }

    pub async fn eval(&self, expression: &str) -> String {
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
    pub async fn eval_promise(&self, expression: &str) -> String {
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

    pub async fn screenshot(&self, name: &str) {
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
