//! docs/HEADERS.md §9: several sidecars on one Redis share the sessions, and every clause holds across
//! them. A real redis-server is started per test (skipped, saying so, when it is not installed).

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

/// Two sidecars in front of the same app, sharing one Redis.
async fn pair(server: &RedisServer) -> (Sidecar, Sidecar) {
    let app = start_app(echo).await;
    let store = server.store_toml("pair:");
    (
        sidecar_for(app, &store).await,
        sidecar_for(app, &store).await,
    )
}

fn cookie_of(resp: &reqwest::Response) -> String {
    format!("sessionid={}", cookie_value(&set_cookies(resp)[0]))
}

#[tokio::test]
async fn a_session_created_through_one_sidecar_works_through_the_other() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b) = pair(&server).await;
    let resp = a.get(&plain(), "/").incr("n").send().await;
    let cookie = cookie_of(&resp);
    let resp = b.get(&plain(), "/").cookie(&cookie).incr("n").send().await;
    assert!(set_cookies(&resp).len() == 1);
    let seen_b = seen(resp).await;
    assert_eq!(seen_b.status(), "existing");
    assert_eq!(seen_b.session(), json!({"n": 1}));
    let seen_a = a.get(&plain(), "/").cookie(&cookie).seen().await;
    assert_eq!(seen_a.session(), json!({"n": 2}));
}

#[tokio::test]
async fn concurrent_requests_through_both_sidecars_merge_per_key() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b) = pair(&server).await;
    let resp = a.get(&plain(), "/").incr("start").send().await;
    let cookie = cookie_of(&resp);
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let through = if i % 2 == 0 { &a } else { &b };
            let visit = through
                .get(&plain(), "/")
                .cookie(&cookie)
                .header("x-test-delay-ms", "30")
                .reply(&[("X-Session-Set", &format!(r#"{{"k{i}":{i}}}"#))]);
            tokio::spawn(async move {
                let r = visit.send().await;
                assert_eq!(r.status(), 200);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let data = b.get(&plain(), "/").cookie(&cookie).seen().await.session();
    assert_eq!(data.as_object().unwrap().len(), 41, "{data}");
}

#[tokio::test]
async fn a_logout_through_one_ends_the_session_on_the_other_at_once() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b) = pair(&server).await;
    let resp = a.get(&plain(), "/").incr("n").send().await;
    let cookie = cookie_of(&resp);
    let out = a
        .get(&plain(), "/logout")
        .cookie(&cookie)
        .reply(&[("X-Session-Flush", "1")])
        .send()
        .await;
    assert!(set_cookies(&out)[0].contains("Max-Age=0"));
    let resp = b.get(&plain(), "/").cookie(&cookie).incr("n").send().await;
    // The key the logout retired is known as retired through the other sidecar too: new to
    // the app, and its answer touches no cookie (docs/HEADERS.md "Retired keys").
    assert!(set_cookies(&resp).is_empty(), "{:?}", set_cookies(&resp));
    let seen_b = seen(resp).await;
    assert_eq!(seen_b.status(), "new");
    assert_eq!(seen_b.session(), json!({}));
}

#[tokio::test]
async fn a_cycle_through_one_is_honoured_by_the_other() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b) = pair(&server).await;
    let resp = a.get(&plain(), "/").incr("n").send().await;
    let old = cookie_of(&resp);
    let login = a
        .get(&plain(), "/login")
        .cookie(&old)
        .reply(&[("X-Session-Cycle", "1"), ("X-Session-Subject", "u1")])
        .send()
        .await;
    let new = cookie_of(&login);
    let stale = b.get(&plain(), "/").cookie(&old).seen().await;
    assert_eq!(
        stale.status(),
        "new",
        "the old key stops working everywhere"
    );
    let seen_new = b.get(&plain(), "/").cookie(&new).seen().await;
    assert_eq!(seen_new.session(), json!({"n": 1}));
    assert_eq!(subject_handles(&b.store, "u1", b.now()).await.len(), 1);
}

#[tokio::test]
async fn redis_down_is_a_503_and_service_resumes_when_it_returns() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let port = server.port;
    let (a, _b) = pair(&server).await;
    let resp = a.get(&plain(), "/").incr("n").send().await;
    let cookie = cookie_of(&resp);
    server.stop();
    for incr in [false, true] {
        let mut visit = a.get(&plain(), "/").cookie(&cookie);
        if incr {
            visit = visit.incr("n");
        }
        let resp = visit.send().await;
        assert_eq!(resp.status(), 503);
        assert!(set_cookies(&resp).is_empty(), "no cookie changed");
        assert!(resp.text().await.unwrap().contains("session store"));
    }
    let resp = a.get(&plain(), "/").incr("n").send().await;
    assert_eq!(resp.status(), 503, "no fresh session either");
    assert!(set_cookies(&resp).is_empty());
    let _back = RedisServer::start_on(port).unwrap();
    let mut resumed = false;
    for _ in 0..100 {
        let resp = a.get(&plain(), "/").incr("n").send().await;
        if resp.status() == 200 {
            resumed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(resumed, "the sidecar reconnected by itself");
}

#[tokio::test]
async fn a_redis_slower_than_the_command_timeout_is_a_503_not_a_hang() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let app = start_app(echo).await;
    let store = server
        .store_toml("slow:")
        .replace("command_timeout = 2", "command_timeout = 1");
    let s = sidecar_for(app, &store).await;
    let resp = s.get(&plain(), "/").incr("n").send().await;
    let cookie = cookie_of(&resp);
    server.stall(3.0);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let resp = s.get(&plain(), "/").cookie(&cookie).incr("n").send().await;
    assert_eq!(resp.status(), 503, "after {:?}", started.elapsed());
    assert!(set_cookies(&resp).is_empty());
    assert!(
        started.elapsed() < std::time::Duration::from_millis(2800),
        "answered within the timeout, not after the stall"
    );
}

/// A redis-server that speaks TLS only, with a certificate from a throwaway CA (openssl).
struct TlsRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_redis() -> Option<TlsRedis> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(d)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
    };
    if !matches!(run(&["version"]), Ok(true)) {
        skipped("openssl is not installed; it makes the test certificates");
        return None;
    }
    std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    for args in [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=test CA",
        ][..],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    ] {
        assert!(run(args).unwrap(), "openssl {args:?}");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = match std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.pem",
        ])
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            skipped(&format!("redis-server is not installed ({e})"));
            return None;
        }
    };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(TlsRedis { port, dir, child });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("TLS redis-server did not start");
}

#[tokio::test]
async fn rediss_with_a_private_ca_serves_sessions_and_an_untrusted_certificate_is_refused() {
    let Some(redis) = tls_redis() else { return };
    let ca = redis.dir.path().join("ca.pem");
    let url = format!("rediss://127.0.0.1:{}/0", redis.port);
    let app = start_app(echo).await;
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{url}\"\ntls_ca_file = {:?}\n",
        ca.display().to_string()
    );
    let s = sidecar_for(app, &store).await;
    let b = browser();
    s.get(&b, "/").incr("n").send().await;
    let seen = s.get(&b, "/").incr("n").seen().await;
    assert_eq!(seen.session(), json!({"n": 1}));
    // Without the CA the server's certificate is not trusted: the store does not open.
    let cfg = session_sidecar::Config::from_toml(&format!(
        "[store]\nbackend = \"redis\"\nurl = \"{url}\"\nconnect_timeout = 2"
    ))
    .unwrap();
    let err = match session_sidecar::Deps::open(&cfg).await {
        Ok(_) => panic!("an untrusted certificate was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cannot open the session store"), "{err}");
}

/// The admin listener names sessions by handle on Redis too (found with SCAN), never by key,
/// and ending one by its handle through one sidecar ends it for the other.
#[tokio::test]
async fn sessions_are_shown_and_ended_by_handle_across_sidecars() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b) = pair(&server).await;
    let r = a
        .get(&plain(), "/login")
        .reply(&[
            ("X-Session-Set", r#"{"user":"ann"}"#),
            ("X-Session-Subject", "ann"),
        ])
        .send()
        .await;
    let cookie = cookie_of(&r);
    let key = cookie.trim_start_matches("sessionid=").to_string();
    let listed = get(&plain(), format!("http://{}/subjects/ann", b.admin))
        .text()
        .await;
    assert!(!listed.contains(&key), "the key leaked: {listed}");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let handle = listed["sessions"][0]["handle"]
        .as_str()
        .unwrap()
        .to_string();
    let shown = get(&plain(), format!("http://{}/sessions/{handle}", b.admin))
        .text()
        .await;
    assert!(!shown.contains(&key), "the key leaked: {shown}");
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["data"], json!({"user": "ann"}));
    let del = plain()
        .delete(format!("http://{}/sessions/{handle}", b.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    let after = a.get(&plain(), "/").cookie(&cookie).seen().await;
    assert_eq!(after.status(), "new");
}

/// A TCP relay to Redis that can cut the network the way a firewall or `docker network
/// disconnect` does: the connections open at the cut stay open and carry nothing, ever; once
/// healed, new connections pass.
struct Relay {
    addr: std::net::SocketAddr,
    cuts: std::sync::Arc<std::sync::atomic::AtomicU64>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn to(port: u16) -> Relay {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            cuts: Default::default(),
            down: Default::default(),
        };
        let (cuts, down) = (relay.cuts.clone(), relay.down.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap();
                let born = cuts.load(SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to) in [(cr, sw), (sr, cw)] {
                    let (cuts, down) = (cuts.clone(), down.clone());
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16384];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            while down.load(SeqCst) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if cuts.load(SeqCst) != born {
                                // Cut off for good, and never closed: a half-open connection.
                                let _keep = (&from, &to);
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        relay
    }

    fn cut(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.down.store(true, SeqCst);
        self.cuts.fetch_add(1, SeqCst);
    }

    fn heal(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The network between the sidecar and Redis is cut and comes back, but the connection open at
/// the cut never does (as after `docker network disconnect`/`connect`, a firewall's dropped
/// state, a peer that moved): the sidecar answers 503 within the timeout meanwhile, and serves
/// again once the network is back, on a new connection, instead of timing out on the dead one.
#[tokio::test]
async fn after_a_network_cut_a_dead_connection_is_replaced_and_service_resumes() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let relay = Relay::to(server.port).await;
    let app = start_app(echo).await;
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"redis://{}/0\"\nkey_prefix = \"cut:\"\ncommand_timeout = 1\nconnect_timeout = 1\n",
        relay.addr
    );
    let s = sidecar_for(app, &store).await;
    let resp = s.get(&plain(), "/").incr("n").send().await;
    let cookie = cookie_of(&resp);

    relay.cut();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let resp = s.get(&plain(), "/").cookie(&cookie).incr("n").send().await;
        assert_eq!(resp.status(), 503);
        assert!(started.elapsed() < Duration::from_millis(2500));
    }
    relay.heal();
    let healed = std::time::Instant::now();
    loop {
        let resp = s.get(&plain(), "/").cookie(&cookie).incr("n").send().await;
        if resp.status() == 200 {
            assert_eq!(seen(resp).await.session(), json!({"n": 1}));
            break;
        }
        assert_eq!(resp.status(), 503);
        assert!(
            healed.elapsed() < Duration::from_secs(15),
            "still 503 {:?} after the network came back",
            healed.elapsed()
        );
    }
}

/// Every session record the sidecars wrote under `prefix`, as Redis holds it.
async fn stored_records(server: &RedisServer, prefix: &str) -> Vec<Vec<u8>> {
    let client = redis::Client::open(server.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}s:*"))
        .query_async(&mut c)
        .await
        .unwrap();
    let mut out = Vec::new();
    for k in keys {
        out.push(
            redis::cmd("GET")
                .arg(&k)
                .query_async::<Vec<u8>>(&mut c)
                .await
                .unwrap(),
        );
    }
    out
}

fn shows(records: &[Vec<u8>], word: &str) -> bool {
    records
        .iter()
        .any(|r| r.windows(word.len()).any(|w| w == word.as_bytes()))
}

const SECRET_A: &str = "first secret of this deployment, 32+ bytes long";
const SECRET_B: &str = "second secret of this deployment, 32+ bytes long";

#[tokio::test]
async fn with_a_secret_redis_holds_no_session_data_and_rotation_and_older_records_still_read() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let app = start_app(echo).await;
    let prefix = "sealed:";
    let store = server.store_toml(prefix);
    let secret = |key: &str, fallbacks: &[&str]| {
        format!("[security]\nsecret_key = {key:?}\nsecret_key_fallbacks = {fallbacks:?}\n")
    };
    let visit = async |sidecar: &Sidecar, cookie: &str| {
        sidecar
            .get(&plain(), "/")
            .cookie(cookie)
            .incr("n")
            .reply(&[("X-Session-Set", r#"{"note": "plaintext-marker"}"#)])
            .send()
            .await
    };
    // An existing deployment: signed cookies, records in clear (encryption turned off).
    let before = sidecar_for(
        app,
        &format!("{store}encrypt = false\n{}", secret(SECRET_A, &[])),
    )
    .await;
    let resp = visit(&before, "").await;
    let cookie = cookie_of(&resp);
    assert_eq!(seen(resp).await.status(), "new");
    assert!(shows(
        &stored_records(&server, prefix).await,
        "plaintext-marker"
    ));

    // The same secret, encryption on (the default with a secret): the clear record still reads,
    // and the next write seals it.
    let sealed = sidecar_for(app, &format!("{store}{}", secret(SECRET_A, &[]))).await;
    let s = seen(visit(&sealed, &cookie).await).await;
    assert_eq!(s.status(), "existing");
    assert_eq!(s.session()["n"], 1);
    let records = stored_records(&server, prefix).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0][9], 5, "format 5: sealed, under the key's digest");
    for word in ["plaintext-marker", "note", "\"n\""] {
        assert!(!shows(&records, word), "{word} readable in Redis");
    }

    // A new secret with the old one as a fallback: the cookie verifies, the record opens, and
    // the next write seals it under the new key.
    let rotated = sidecar_for(app, &format!("{store}{}", secret(SECRET_B, &[SECRET_A]))).await;
    let s = seen(visit(&rotated, &cookie).await).await;
    assert_eq!(s.status(), "existing");
    assert_eq!(s.session()["n"], 2);
    let s = seen(visit(&rotated, &cookie).await).await;
    assert_eq!(s.session()["n"], 3);

    // A sidecar that cannot open the record (encryption turned off again) does not misread it:
    // the visitor is new, as in Django when session data does not verify.
    let blind = sidecar_for(
        app,
        &format!("{store}encrypt = false\n{}", secret(SECRET_B, &[SECRET_A])),
    )
    .await;
    let s = seen(visit(&blind, &cookie).await).await;
    assert_eq!(s.status(), "new");
    assert_eq!(s.session(), json!({}));
    // Nothing was lost for the sidecars that hold the key.
    let s = seen(visit(&rotated, &cookie).await).await;
    assert_eq!(s.session()["n"], 4);
}

/// The commands clients send to Redis while `f` runs, as Redis's `MONITOR` reports them: one
/// line per command a client sent (one round trip each, nothing pipelined here), a script's
/// inner commands marked `lua` and not counted.
async fn commands_during(server: &RedisServer, f: impl AsyncFnOnce()) -> usize {
    use std::io::BufRead;
    let mut monitor = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "MONITOR"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli comes with redis-server");
    let mut lines = std::io::BufReader::new(monitor.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "OK", "MONITOR started");
    f().await;
    // A marker through another connection: everything before it has been reported.
    redis_cli(server.port, &["ECHO", "end-of-measure"]);
    let mut count = 0;
    for line in lines {
        let line = line.unwrap();
        if line.contains("end-of-measure") {
            break;
        }
        if !line.contains(" lua]") {
            count += 1;
        }
    }
    let _ = monitor.kill();
    let _ = monitor.wait();
    count
}

#[tokio::test]
async fn round_trips_per_request_counted_by_redis_itself() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let app = start_app(echo).await;
    let sidecar = sidecar_for(
        app,
        &format!(
            "skip_paths = [\"/static/\"]\n{}",
            server.store_toml("trips:")
        ),
    )
    .await;
    let client = browser();
    let count = async || {
        let r = sidecar.get(&client, "/").incr("n").send().await;
        assert_eq!(r.status(), 200);
    };
    count().await;
    let counter = commands_during(&server, async || {
        for _ in 0..20 {
            count().await;
        }
    })
    .await as f64
        / 20.0;
    let get = async |path: &str| {
        let r = sidecar.get(&client, path).send().await;
        assert_eq!(r.status(), 200);
    };
    let read = commands_during(&server, async || {
        for _ in 0..20 {
            get("/").await;
        }
    })
    .await as f64
        / 20.0;
    let skipped = commands_during(&server, async || {
        for _ in 0..20 {
            get("/static/x").await;
        }
    })
    .await as f64
        / 20.0;
    eprintln!("round trips per request: counter {counter}, read-only {read}, skip_paths {skipped}");
    // A counter: the load (GET) and the swap (one EVALSHA). A read-only request: the load only;
    // the liveness check after its response is answered by the end notices (no notice about
    // the key since the load), tests below show it still catches every end.
    assert_eq!(counter, 2.0);
    assert_eq!(read, 1.0);
    assert_eq!(skipped, 0.0);
}

/// A visitor's session through `a`: its cookie.
async fn counted(a: &Sidecar) -> String {
    let resp = a.get(&plain(), "/").incr("n").send().await;
    cookie_of(&resp)
}

/// A read-only request through `a` that the app holds for `ms`, started now.
fn slow_read(a: &Sidecar, cookie: &str, ms: u64) -> tokio::task::JoinHandle<reqwest::Response> {
    let visit = a
        .get(&plain(), "/")
        .cookie(cookie)
        .header("x-test-delay-ms", ms.to_string());
    tokio::spawn(visit.send())
}

#[tokio::test]
async fn a_read_only_request_in_flight_hears_through_redis_that_another_sidecar_ended_its_session()
{
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b) = pair(&server).await;
    let through_b = async |cookie: &str, reply_headers: &[(&str, &str)]| {
        let r = b
            .get(&plain(), "/")
            .cookie(cookie)
            .reply(reply_headers)
            .send()
            .await;
        assert_eq!(r.status(), 200);
    };
    // Logout in another tab, through the other sidecar: the read-only response drops the cookie.
    let cookie = counted(&a).await;
    let read = slow_read(&a, &cookie, 600);
    tokio::time::sleep(Duration::from_millis(200)).await;
    through_b(&cookie, &[("X-Session-Flush", "1")]).await;
    let resp = read.await.unwrap();
    assert_eq!(resp.status(), 200);
    let set = set_cookies(&resp);
    assert!(
        set.len() == 1 && set[0].contains("Max-Age=0"),
        "stale cookie deleted: {set:?}"
    );
    // Its expiry brought forward to a moment that passes while the request is in flight.
    let cookie = counted(&a).await;
    let read = slow_read(&a, &cookie, 1_800);
    tokio::time::sleep(Duration::from_millis(200)).await;
    through_b(&cookie, &[("X-Session-Expiry", "1")]).await;
    // The sidecars' clocks are the tests' own: `a`'s moves past the new deadline.
    a.clock.advance(Duration::from_secs(2));
    let resp = read.await.unwrap();
    let set = set_cookies(&resp);
    assert!(
        set.len() == 1 && set[0].contains("Max-Age=0"),
        "expired meanwhile: {set:?}"
    );
    // A login (cycle) in flight: the old key forwards to the new session, which goes on; the
    // read-only response carries no cookie (the cycle's response gave the browser the new one).
    let cookie = counted(&a).await;
    let read = slow_read(&a, &cookie, 600);
    tokio::time::sleep(Duration::from_millis(200)).await;
    through_b(&cookie, &[("X-Session-Cycle", "1")]).await;
    let resp = read.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(set_cookies(&resp).is_empty(), "{:?}", set_cookies(&resp));
    // And an unchanged session keeps its cookie untouched.
    let cookie = counted(&a).await;
    let resp = slow_read(&a, &cookie, 300).await.unwrap();
    assert!(set_cookies(&resp).is_empty());
}

#[tokio::test]
async fn a_sidecar_whose_user_may_not_publish_end_notices_refuses_to_start() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // A Redis 7 ACL user starts without channels: the other sidecars would never hear of the
    // sessions it ends.
    redis_cli(
        server.port,
        &[
            "ACL",
            "SETUSER",
            "nochan",
            "on",
            ">pw",
            "~*",
            "+@all",
            "resetchannels",
        ],
    );
    let url = server.url().replace("redis://", "redis://nochan:pw@");
    let text = format!(
        "upstream = \"http://127.0.0.1:9\"\n{}",
        server.store_toml("acl:").replace(&server.url(), &url)
    );
    let config = session_sidecar::config::Config::from_toml(&text).unwrap();
    let err = match session_sidecar::Deps::open(&config).await {
        Ok(_) => panic!("started without the right to publish"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("cannot publish end notices on \"acl:ended\"") && err.contains("&acl:ended"),
        "{err}"
    );
    assert!(
        !err.contains("pw@"),
        "password kept out of the message: {err}"
    );
    // Granted the channel, the same user serves.
    redis_cli(server.port, &["ACL", "SETUSER", "nochan", "&acl:ended"]);
    assert!(session_sidecar::Deps::open(&config).await.is_ok());
}

#[tokio::test]
async fn after_its_connection_is_killed_a_sidecar_listens_again_and_misses_no_end() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b) = pair(&server).await;
    let cookie = counted(&a).await;
    let read_only = async || {
        let r = a.get(&plain(), "/").cookie(&cookie).send().await;
        assert_eq!(r.status(), 200);
        assert!(set_cookies(&r).is_empty());
    };
    read_only().await;
    // Every client connection dropped by the server: both sidecars reconnect by themselves.
    redis_cli(server.port, &["CLIENT", "KILL", "SKIPME", "yes"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Back to one round trip per read-only request once `a` has subscribed again.
    let mut trips = 0;
    for _ in 0..50 {
        trips = commands_during(&server, async || {
            for _ in 0..5 {
                read_only().await;
            }
        })
        .await;
        if trips == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(trips, 5, "listening again after the reconnection");
    // And the notices flow again: a logout through `b` reaches a read-only request on `a`.
    let read = slow_read(&a, &cookie, 600);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = b
        .get(&plain(), "/logout")
        .cookie(&cookie)
        .reply(&[("X-Session-Flush", "1")])
        .send()
        .await;
    assert_eq!(out.status(), 200);
    let set = set_cookies(&read.await.unwrap());
    assert!(set.len() == 1 && set[0].contains("Max-Age=0"), "{set:?}");
}
