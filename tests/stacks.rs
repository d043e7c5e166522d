//! The sidecar in front of the servers legacy apps run on, each from Debian's packages, each
//! running the same example app (examples/stacks/) with its language's helper (helpers/): PHP
//! under Apache's mod_php and PHP's built-in server, Perl CGI under lighttpd, a servlet on
//! Tomcat, a WSGI app under gunicorn and under waitress, a Rack app under puma, Node's `http`
//! module. One scenario
//! drives every stack through the real sidecar binary over real HTTP (the seed texts' visit
//! counter, cart, login, logout with a flash, test cookie, CSRF-protected form; a session near
//! the size limit; client spellings with underscores; a forged request straight to the app's
//! port, refused by the helper's signature check), and a real Chromium drives two of them.
//!
//! A stack whose server is not installed is skipped, saying so; `SIDECAR_REQUIRE_STACKS=1` (CI)
//! makes that a failure. Run one stack: `cargo test --test stacks php_apache`.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::binary::{self, Proc};
use common::chromium::Chromium;
use common::*;
use reqwest::StatusCode;

/// Shared by the sidecar (`[security] upstream_signing_key`) and the app (`SIDECAR_SIGNING_KEY`).
const SIGNING_KEY: &str = "stacks-test-signing-key-0123456789abcdef";

/// What each stack needs installed: its run script checks nothing, the test says what is missing.
fn needs(stack: &str) -> &'static [&'static str] {
    match stack {
        "php-apache" => &["/usr/sbin/apache2", "/usr/lib/apache2/modules/libphp8.2.so"],
        "php-builtin" => &["/usr/bin/php"],
        "perl-cgi" => &["/usr/sbin/lighttpd", "/usr/bin/perl"],
        "java-tomcat" => &["/usr/share/tomcat10/bin/catalina.sh", "/usr/bin/javac"],
        "python-gunicorn" => &["/usr/bin/gunicorn"],
        "python-waitress" => &["/usr/lib/python3/dist-packages/waitress"],
        "ruby-puma" => &["/usr/bin/puma"],
        "node-http" => &["/usr/bin/node"],
        other => panic!("unknown stack {other}"),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One stack's server, started by its run script in a process group of its own; dropped, the
/// whole group gets SIGTERM, then SIGKILL for whatever is left.
struct Server {
    name: &'static str,
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    /// `None` (after saying why) where the stack is not installed, unless CI requires it.
    async fn start(name: &'static str) -> Option<Server> {
        let missing: Vec<_> = needs(name)
            .iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        if !missing.is_empty() {
            assert!(
                std::env::var_os("SIDECAR_REQUIRE_STACKS").is_none(),
                "SIDECAR_REQUIRE_STACKS is set and {name} cannot start: missing {missing:?}"
            );
            eprintln!("skipped {name}: missing {missing:?} (.ci/run installs them)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
        let child = Command::new("bash")
            .arg(root().join("examples/stacks").join(name).join("run.sh"))
            .arg(port.to_string())
            .arg(dir.path().join("work"))
            .env("SIDECAR_SIGNING_KEY", SIGNING_KEY)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        let mut server = Server {
            name,
            child,
            port,
            dir,
        };
        // Up when an unsigned request is refused: the server answers and the app runs.
        let started = Instant::now();
        let direct = plain();
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "{name} exited ({status}) before answering:\n{}",
                    server.log()
                );
            }
            if let Ok(r) = direct.get(server.url("/status")).send().await {
                assert_eq!(
                    r.status(),
                    StatusCode::FORBIDDEN,
                    "{name}: an unsigned request was not refused:\n{}",
                    server.log()
                );
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "{name} did not answer within 90 s:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("{name}: up in {:.1} s", started.elapsed().as_secs_f64());
        Some(server)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// The run script's output and every log file the server wrote under its work directory.
    fn log(&self) -> String {
        let mut out = String::new();
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "log" || x == "txt")
                    || p.file_name().is_some_and(|n| n == "catalina.out")
                {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<_> = text.lines().rev().take(40).collect();
                    out += &format!("--- {}\n", p.display());
                    for l in tail.into_iter().rev() {
                        out += l;
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let kill = |signal: &str| {
            let _ = Command::new("kill")
                .args([signal, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        kill("-TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        kill("-KILL");
        let _ = self.child.wait();
    }
}

/// The real binary in front of a stack, with CSRF tokens and signed headers on.
fn sidecar_in_front(server: &Server) -> Proc {
    let dir = server.dir.path().join("sidecar");
    std::fs::create_dir_all(&dir).unwrap();
    let app = format!("127.0.0.1:{}", server.port).parse().unwrap();
    let config = binary::write_config(
        &dir,
        app,
        &format!("[csrf]\ntoken = true\n[security]\nupstream_signing_key = \"{SIGNING_KEY}\""),
    );
    binary::start(&config)
}

/// Requests through the sidecar, counted; every answer's body is read whole.
struct Driver<'a> {
    stack: &'static str,
    sidecar: &'a Proc,
    sent: AtomicU64,
}

struct Answer {
    status: StatusCode,
    /// The session cookie's `Set-Cookie` values.
    cookies: Vec<String>,
    body: String,
}

impl Driver<'_> {
    async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.stack));
        let status = resp.status();
        let cookies = set_cookies(&resp);
        for name in resp.headers().keys() {
            assert!(
                !name.as_str().starts_with("x-session"),
                "{}: the browser saw {name}",
                self.stack
            );
        }
        let body = resp.text().await.unwrap();
        Answer {
            status,
            cookies,
            body,
        }
    }

    async fn get(&self, client: &reqwest::Client, path: &str) -> Answer {
        self.send(client.get(self.sidecar.url(path))).await
    }

    /// A page that must answer 200 with exactly `body`.
    async fn expect(&self, client: &reqwest::Client, path: &str, body: &str) -> Answer {
        let a = self.get(client, path).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (StatusCode::OK, body),
            "{}: GET {path}",
            self.stack
        );
        a
    }

    /// The CSRF token of the page's form field, as a browser would read it.
    async fn form_token(&self, client: &reqwest::Client) -> String {
        let a = self.get(client, "/form").await;
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{}: /form: {}",
            self.stack,
            a.body
        );
        let at = a
            .body
            .find("name=\"csrfmiddlewaretoken\"")
            .unwrap_or_else(|| panic!("{}: no CSRF field in {}", self.stack, a.body));
        let value = &a.body[at..];
        let value = &value[value.find("value=\"").unwrap() + 7..];
        let token = &value[..value.find('"').unwrap()];
        assert_eq!(token.len(), 128, "{}: token {token}", self.stack);
        token.to_string()
    }
}

fn count_line(n: u64) -> String {
    let times = if n == 1 { "time" } else { "times" };
    format!("You have visited this page {n} {times}.\n")
}

/// The scenario every stack goes through; returns the number of requests it sent.
async fn scenario(server: &Server, sidecar: &Proc) -> u64 {
    let d = Driver {
        stack: server.name,
        sidecar,
        sent: AtomicU64::new(0),
    };

    // The visit counter, then ten concurrent visits of the same browser: all count.
    let ann = browser();
    let first = d.expect(&ann, "/", &count_line(1)).await;
    assert_eq!(first.cookies.len(), 1, "{}: no session cookie", d.stack);
    d.expect(&ann, "/", &count_line(2)).await;
    let visits: Vec<_> = (0..10).map(|_| d.get(&ann, "/")).collect();
    for a in futures_util::future::join_all(visits).await {
        assert_eq!(a.status, StatusCode::OK, "{}: {}", d.stack, a.body);
    }
    d.expect(&ann, "/", &count_line(13)).await;

    // The cart: two tabs of one browser adding at once keep every item.
    let adds: Vec<_> = (0..6)
        .map(|i| {
            format!(
                "/cart/add?item={}{i}",
                if i % 2 == 0 { "pen" } else { "ink" }
            )
        })
        .collect();
    let added = futures_util::future::join_all(adds.iter().map(|p| d.get(&ann, p))).await;
    for (a, p) in added.iter().zip(&adds) {
        let item = p.rsplit('=').next().unwrap();
        assert_eq!(a.body, format!("added {item}\n"), "{}", d.stack);
    }
    let cart = d.get(&ann, "/cart").await.body;
    let items: BTreeSet<_> = cart
        .strip_prefix("cart: ")
        .unwrap_or_else(|| panic!("{}: {cart}", d.stack))
        .trim_end()
        .split(',')
        .map(str::to_string)
        .collect();
    let want: BTreeSet<_> = adds
        .iter()
        .map(|p| p.rsplit('=').next().unwrap().to_string())
        .collect();
    assert_eq!(items, want, "{}: the cart lost an item", d.stack);

    // Several calls on keys in one request mean what they say in program order, whatever order
    // the server sends the headers in (waitress sorts them by name).
    let seq = browser();
    d.expect(&seq, "/sequence", "sequence done\n").await;
    d.expect(&seq, "/sequence/check", "n: 15\nseq: a,b\ngone: none\n")
        .await;

    // Django's test cookie: a browser that keeps cookies, and a client that keeps none.
    let fresh = browser();
    d.expect(&fresh, "/test-cookie", "test cookie set\n").await;
    d.expect(&fresh, "/test-cookie", "cookies work\n").await;
    let cookieless = plain();
    for _ in 0..2 {
        d.expect(&cookieless, "/test-cookie", "test cookie set\n")
            .await;
    }

    // Login: a new key (session fixation), the subject, the user.
    let before = first.cookies[0].clone();
    let login = d
        .expect(&ann, "/login?user=ann", "logged in as ann\n")
        .await;
    assert_eq!(login.cookies.len(), 1, "{}: login set no cookie", d.stack);
    assert_ne!(
        cookie_value(&login.cookies[0]),
        cookie_value(&before),
        "{}: login kept the key",
        d.stack
    );
    d.expect(&ann, "/whoami", "user: ann\nsubject: ann\n").await;

    // A second device of ann's; a password change on the first ends it and renews the first's key.
    let phone = browser();
    d.expect(&phone, "/login?user=ann", "logged in as ann\n")
        .await;
    d.expect(&phone, "/whoami", "user: ann\nsubject: ann\n")
        .await;
    let token = d.form_token(&ann).await;
    let changed = d
        .send(
            ann.post(sidecar.url("/password"))
                .header("X-CSRF-Token", &token),
        )
        .await;
    assert_eq!(
        (changed.status, changed.body.as_str()),
        (StatusCode::OK, "password changed\n"),
        "{}",
        d.stack
    );
    assert_eq!(changed.cookies.len(), 1, "{}: no new key", d.stack);
    d.expect(&phone, "/whoami", "user: anonymous\nsubject: none\n")
        .await;
    d.expect(&ann, "/whoami", "user: ann\nsubject: ann\n").await;

    // The CSRF-protected form: accepted with the field, refused by the sidecar without it.
    let token = d.form_token(&ann).await;
    let posted = d
        .send(ann.post(sidecar.url("/form")).form(&[
            ("csrfmiddlewaretoken", token.as_str()),
            ("comment", "hello"),
        ]))
        .await;
    assert_eq!(
        (posted.status, posted.body.as_str()),
        (StatusCode::OK, "form accepted: hello\n"),
        "{}",
        d.stack
    );
    let forged = d
        .send(ann.post(sidecar.url("/form")).form(&[("comment", "evil")]))
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN, "{}", d.stack);
    let status = d.get(&ann, "/status").await.body;
    assert!(
        status.starts_with("status: existing\nexpiry-age: ")
            && status.ends_with("keys: cart,comment,user,visits\n"),
        "{}: {status}",
        d.stack
    );

    // Logout: a fresh session holding only the flash, shown once.
    d.expect(&ann, "/logout", "logged out\n").await;
    d.expect(
        &ann,
        "/whoami",
        "user: anonymous\nsubject: none\nflash: You have been logged out.\n",
    )
    .await;
    d.expect(&ann, "/whoami", "user: anonymous\nsubject: none\n")
        .await;

    // Logged out everywhere: both of bob's browsers.
    let (laptop, tablet) = (browser(), browser());
    for b in [&laptop, &tablet] {
        d.expect(b, "/login?user=bob", "logged in as bob\n").await;
    }
    d.expect(&laptop, "/logout-everywhere", "logged out everywhere\n")
        .await;
    d.expect(&tablet, "/whoami", "user: anonymous\nsubject: none\n")
        .await;
    d.expect(
        &laptop,
        "/whoami",
        "user: anonymous\nsubject: none\nflash: You were logged out everywhere.\n",
    )
    .await;

    // Expiry: what the app sets is what the cookie and the next request say.
    let timed = browser();
    let set = d
        .expect(&timed, "/expiry?seconds=300", "expiry: 300\n")
        .await;
    assert!(
        set.cookies.iter().any(|c| c.contains("Max-Age=300")),
        "{}: {:?}",
        d.stack,
        set.cookies
    );
    let status = d.get(&timed, "/status").await.body;
    let age: u64 = status
        .lines()
        .nth(1)
        .and_then(|l| l.strip_prefix("expiry-age: "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}: {status}", d.stack));
    assert!((290..=300).contains(&age), "{}: {status}", d.stack);
    let browser_close = d.expect(&timed, "/expiry?seconds=0", "expiry: 0\n").await;
    assert!(
        browser_close
            .cookies
            .iter()
            .all(|c| !c.contains("Max-Age") && !c.contains("Expires")),
        "{}: {:?}",
        d.stack,
        browser_close.cookies
    );

    // Sessions near the size limit reach the app through its server's head limit: 7 KiB, and
    // one exactly at the sidecar's own limit (`{"big":"x…"}`, 8192 bytes of JSON: Apache's and
    // gunicorn's defaults refuse a header line that long, Tomcat's and lighttpd's a head that
    // large). One byte beyond it the sidecar refuses (502) and keeps the session as it was.
    let big = browser();
    for bytes in [7000, 8182] {
        d.expect(
            &big,
            &format!("/big?bytes={bytes}"),
            &format!("stored {bytes}\n"),
        )
        .await;
        d.expect(&big, "/big/size", &format!("big: {bytes}\n"))
            .await;
    }
    let refused = d.get(&big, "/big?bytes=8183").await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_GATEWAY,
        "{}: {}",
        d.stack,
        refused.body
    );
    d.expect(&big, "/big/size", "big: 8182\n").await;

    // Spellings of our headers a client may send (CGI, WSGI and PHP read `X_Session` as
    // `X-Session`): the sidecar removes them all, the app sees nobody.
    let spoofer = plain();
    let spoofed = d
        .send(
            spoofer
                .get(sidecar.url("/whoami"))
                .header("X_Session", r#"{"user":"admin"}"#)
                .header("X_Session_Subject", "admin")
                .header("x-session-subject", "admin")
                .header("X-Session", r#"{"user":"admin"}"#),
        )
        .await;
    assert_eq!(
        spoofed.body, "user: anonymous\nsubject: none\n",
        "{}",
        d.stack
    );

    // Load: eight browsers at once, each counting twenty visits and adding ten cart items from
    // concurrent requests; every count and every item lands.
    let crowd: Vec<_> = (0..8).map(|_| browser()).collect();
    let rounds = crowd.iter().enumerate().map(|(b, client)| {
        let d = &d;
        async move {
            d.expect(client, "/", &count_line(1)).await;
            let paths: Vec<_> = (0..10)
                .map(|i| format!("/cart/add?item=b{b}i{i}"))
                .collect();
            let visits = (0..19).map(|_| d.get(client, "/"));
            let adds = paths.iter().map(|p| d.get(client, p));
            let (visits, adds) = futures_util::future::join(
                futures_util::future::join_all(visits),
                futures_util::future::join_all(adds),
            )
            .await;
            for a in visits.iter().chain(&adds) {
                assert_eq!(a.status, StatusCode::OK, "{}: {}", d.stack, a.body);
            }
            d.expect(client, "/", &count_line(21)).await;
            let cart = d.get(client, "/cart").await.body;
            let items = cart
                .trim_end()
                .trim_start_matches("cart: ")
                .split(',')
                .count();
            assert_eq!(items, 10, "{}: browser {b}: {cart}", d.stack);
        }
    });
    futures_util::future::join_all(rounds).await;

    // HEAD: the counter page's head, no body.
    let head = d.send(ann.head(sidecar.url("/"))).await;
    assert_eq!(
        (head.status, head.body.as_str()),
        (StatusCode::OK, ""),
        "{}",
        d.stack
    );

    // Straight to the app's port, around the sidecar: forged headers (with and without a made-up
    // signature) are refused by the helper's signature check.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let forgeries = [
        vec![
            ("X-Session", r#"{"user":"admin"}"#.to_string()),
            ("X-Session-Subject", "admin".to_string()),
            ("X-Session-Status", "existing".to_string()),
        ],
        vec![
            ("X-Session", r#"{"user":"admin"}"#.to_string()),
            (
                "X-Session-Signature",
                format!("v1; t={now}; h=x-session; s={}", "0".repeat(64)),
            ),
        ],
        vec![("X_Session", r#"{"user":"admin"}"#.to_string())],
    ];
    let direct = plain();
    for forged in forgeries {
        let mut req = direct.get(server.url("/whoami"));
        for (name, value) in &forged {
            req = req.header(*name, value);
        }
        d.sent.fetch_add(1, Ordering::Relaxed);
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let body = resp.text().await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::FORBIDDEN, "forged session headers refused\n"),
            "{}: {forged:?}",
            d.stack
        );
    }

    // The helper spoke only the dashed spellings the sidecar applies, and never a bad answer
    // beyond the one refused on purpose.
    let log = sidecar.log();
    assert!(
        !log.contains("ignored a session header"),
        "{}: {log}",
        d.stack
    );
    assert!(!log.contains("answered 5xx"), "{}: {log}", d.stack);
    d.sent.load(Ordering::Relaxed)
}

async fn run(name: &'static str) {
    let Some(server) = Server::start(name).await else {
        return;
    };
    let sidecar = sidecar_in_front(&server);
    let started = Instant::now();
    let sent = scenario(&server, &sidecar).await;
    eprintln!(
        "{name}: scenario passed, {sent} requests in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn php_under_apache_mod_php() {
    run("php-apache").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn php_builtin_server() {
    run("php-builtin").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn perl_cgi_under_lighttpd() {
    run("perl-cgi").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn java_servlet_on_tomcat() {
    run("java-tomcat").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_wsgi_under_gunicorn() {
    run("python-gunicorn").await;
}

/// Waitress sorts response headers by name: the helper's changes must mean the same in any order.
#[tokio::test(flavor = "multi_thread")]
async fn python_wsgi_under_waitress() {
    run("python-waitress").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ruby_rack_under_puma() {
    run("ruby-puma").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_http_module() {
    run("node-http").await;
}

/// A real browser on two stacks: the counter counting on reload, the CSRF form filled in and
/// submitted as a person would, a login shown on the next page.
async fn in_chromium(name: &'static str) {
    let Some(chromium) = Chromium::start(false).await else {
        return;
    };
    let Some(server) = Server::start(name).await else {
        return;
    };
    let sidecar = sidecar_in_front(&server);
    let tab = chromium.tab().await;
    let page = tab.open(&sidecar.url("/")).await;
    assert!(page.contains(count_line(1).trim()), "{name}: {page}");
    let page = tab.reload().await;
    assert!(page.contains(count_line(2).trim()), "{name}: {page}");
    tab.open(&sidecar.url("/form")).await;
    let page = tab
        .load(
            "Runtime.evaluate",
            serde_json::json!({"expression":
                "document.forms[0].comment.value = 'from a browser'; document.forms[0].submit()"}),
        )
        .await;
    assert!(
        page.contains("form accepted: from a browser"),
        "{name}: {page}"
    );
    tab.open(&sidecar.url("/login?user=ann")).await;
    let page = tab.open(&sidecar.url("/whoami")).await;
    assert!(page.contains("user: ann"), "{name}: {page}");
    let cookies = chromium.cookies().await;
    let ours: Vec<_> = cookies
        .iter()
        .filter(|c| c["name"] == "sessionid")
        .collect();
    assert_eq!(ours.len(), 1, "{name}: {cookies:?}");
    assert_eq!(ours[0]["httpOnly"], true, "{name}");
    let page = tab.reload().await;
    assert!(page.contains("user: ann"), "{name}: {page}");
}

#[tokio::test(flavor = "multi_thread")]
async fn php_under_apache_in_a_real_browser() {
    in_chromium("php-apache").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_http_in_a_real_browser() {
    in_chromium("node-http").await;
}
