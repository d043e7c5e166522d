//! The real binary as operators run it: SIGKILL durability, SIGTERM drain, the CLI commands and
//! start-up errors (docs/HEADERS.md §4, §6, §7).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::binary::*;
use common::*;

#[tokio::test]
async fn acknowledged_changes_survive_sigkill() {
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), app, "");
    let p = start(&config);
    let sessions: Vec<reqwest::Client> = (0..8).map(|_| browser()).collect();
    let mut acked = vec![0u32; sessions.len()];
    for round in 0..5 {
        // Concurrent increments, one per session, so the commits are grouped.
        let tasks: Vec<_> = sessions
            .iter()
            .map(|b| {
                let visit = p.get(b, "/").incr("n");
                tokio::spawn(async move { visit.send().await.status() })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), 200, "round {round}");
            acked[i] += 1;
        }
    }
    p.signal("-KILL");
    let (status, _) = p.wait();
    assert!(!status.success());
    let p = start(&config);
    for (i, b) in sessions.iter().enumerate() {
        // The cookie jars hold host-only cookies for 127.0.0.1, so they go to the new port too.
        let seen = p.get(b, "/").seen().await;
        assert_eq!(seen.status(), "existing", "session {i} lost");
        assert_eq!(
            seen.session()["n"],
            serde_json::json!(acked[i]),
            "session {i}"
        );
    }
    p.signal("-KILL");
    let _ = p.wait();
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0() {
    let (app, gate) = gated_app().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), app, "shutdown_grace = 20");
    let p = start(&config);
    let url = p.url("/gate");
    let inflight = tokio::spawn(async move { get(&plain(), url).incr("n").send().await });
    gate.wait_arrival().await;
    p.signal("-TERM");
    // The listener closes: new connections are refused.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(p.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "new connections are refused during the drain");
    gate.open(1);
    let resp = inflight.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(set_cookies(&resp).len(), 1);
    let body = resp.text().await.unwrap();
    assert!(body.contains("\"method\""), "the whole response arrived");
    let (status, log) = tokio::task::spawn_blocking(move || p.wait()).await.unwrap();
    assert!(status.success(), "exit 0 after a clean drain: {log}");
    assert!(log.contains("stopped cleanly"), "{log}");
}

#[tokio::test]
async fn a_drain_that_runs_out_of_grace_exits_non_zero_and_says_how_many_were_cut() {
    let (app, gate) = gated_app().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), app, "shutdown_grace = 1");
    let p = start(&config);
    let url = p.url("/gate");
    let _stuck = tokio::spawn(async move { plain().get(url).send().await });
    gate.wait_arrival().await;
    p.signal("-TERM");
    let (status, log) = tokio::task::spawn_blocking(move || p.wait()).await.unwrap();
    assert!(!status.success());
    assert!(log.contains("1 request(s) still in flight"), "{log}");
}

#[tokio::test]
async fn session_keys_and_secrets_never_appear_in_logs_or_error_bodies() {
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        app,
        "expose_id = true\n[security]\nsecret_key = \"log-test-secret-0123456789abcdef0123\"",
    );
    let mut cmd = Command::new(BIN);
    cmd.args(["--config", config.to_str().unwrap()])
        .env("RUST_LOG", "debug");
    let p = start_with(cmd);
    let b = browser();
    let resp = p.get(&b, "/").incr("n").send().await;
    let cookie = cookie_value(&set_cookies(&resp)[0]);
    let key = cookie[cookie.len() - 64..].to_string();
    let mut bodies = String::new();
    let big = format!(r#"{{"big":"{}"}}"#, "x".repeat(9000));
    for r in [
        [("X-Session-Cycle", "1")],
        [("X-Session-Set", "{bad")],
        [("X-Session-Set", &big)],
        [("X-Session-Flush", "1")],
    ] {
        let resp = p.get(&b, "/?token=query-secret").reply(&r).send().await;
        if resp.status() != 200 {
            // Only the sidecar's own answers: the echo app's bodies show what it was sent.
            bodies.push_str(&resp.text().await.unwrap());
        }
    }
    // A forged cookie and an over-long head are refused and logged too.
    let forged = p
        .get(&plain(), "/")
        .cookie(format!("sessionid={cookie}x"))
        .send()
        .await;
    assert_eq!(forged.status(), 200);
    p.signal("-TERM");
    let (_, log) = tokio::task::spawn_blocking(move || p.wait()).await.unwrap();
    assert!(
        bodies.contains("malformed JSON") && bodies.contains("max_session_bytes"),
        "{bodies}"
    );
    for secret in [
        key.as_str(),
        cookie.as_str(),
        "log-test-secret",
        "query-secret",
    ] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
        assert!(
            !bodies.contains(secret),
            "{secret} in an error body: {bodies}"
        );
    }
    assert!(
        log.contains("X-Session-Set"),
        "the bad header was logged: {log}"
    );
}

#[test]
fn check_config_validates_masks_secrets_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[security]\nsecret_key = \"hunter2hunter2hunter2hunter2hunter2\"\n",
    )
    .unwrap();
    let (ok, out) = run_cli(&["check-config", "--config", good.to_str().unwrap()], &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("********") && !out.contains("hunter2"),
        "{out}"
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[cookie]\nsame_site = \"Sometimes\"\n").unwrap();
    let (ok, out) = run_cli(&["check-config", "--config", bad.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(
        out.contains("cookie.same_site") && out.contains("Sometimes"),
        "{out}"
    );
    let (ok, out) = run_cli(
        &["check-config", "--config", good.to_str().unwrap()],
        &[("SESSION_SIDECAR_NOPE", "1")],
    );
    assert!(!ok && out.contains("SESSION_SIDECAR_NOPE"), "{out}");
    let (ok, out) = run_cli(
        &["check-config", "--config", good.to_str().unwrap()],
        &[("SESSION_SIDECAR_EXPIRY__COOKIE_AGE", "60")],
    );
    assert!(ok && out.contains("cookie_age = 60"), "{out}");
}

#[test]
fn the_documented_example_config_checks_out() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/config/sidecar.toml");
    let (ok, out) = run_cli(&["check-config", "--config", cfg], &[]);
    assert!(ok, "{out}");
}

#[test]
fn an_invalid_config_exits_before_binding_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:0\"\nupstream_timeout = -3\n").unwrap();
    let (ok, out) = run_cli(&["--config", bad.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(out.contains("upstream_timeout"), "{out}");
    let (ok, out) = run_cli(
        &[
            "--config",
            dir.path().join("missing.toml").to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok && out.contains("missing.toml"), "{out}");
}

#[tokio::test]
async fn environment_overrides_configure_the_running_sidecar() {
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    // The file points at a dead upstream; the environment fixes it.
    let config = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), "");
    let mut cmd = Command::new(BIN);
    cmd.args(["--config", config.to_str().unwrap()])
        .env("SESSION_SIDECAR_UPSTREAM", format!("http://{app}"))
        .env("SESSION_SIDECAR_COOKIE__NAME", "sid");
    let p = start_with(cmd);
    let resp = p.get(&plain(), "/").incr("n").send().await;
    assert_eq!(resp.status(), 200);
    let c = resp
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(c.starts_with("sid="), "{c}");
    p.signal("-TERM");
    let _ = tokio::task::spawn_blocking(move || p.wait()).await;
}

#[tokio::test]
async fn clear_expired_removes_expired_sessions_and_refuses_a_held_store() {
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), app, "");
    let cfg = config.to_str().unwrap().to_string();
    let p = start(&config);
    // Two sessions that expire after one second of inactivity, one that lives on.
    for _ in 0..2 {
        p.get(&plain(), "/")
            .reply(&[("X-Session-Set", r#"{"a":1}"#), ("X-Session-Expiry", "1")])
            .send()
            .await;
    }
    p.get(&plain(), "/").incr("n").send().await;
    let (ok, out) = run_cli(&["clear-expired", "--config", &cfg], &[]);
    assert!(!ok, "the running sidecar holds the store: {out}");
    assert!(out.contains("in use by another process"), "{out}");
    let (ok, out) = run_cli(&["check-config", "--config", &cfg], &[]);
    assert!(
        ok,
        "check-config never opens the store, so a held store is no obstacle: {out}"
    );
    // SIGINT stops it as cleanly as SIGTERM.
    p.signal("-INT");
    let (status, _) = tokio::task::spawn_blocking(move || p.wait()).await.unwrap();
    assert!(status.success());
    // Real time has to pass here: the binary runs on the system clock.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (ok, out) = run_cli(&["clear-expired", "--config", &cfg], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("removed 2 expired session(s)"), "{out}");
    let (ok, out) = run_cli(&["clear-expired", "--config", &cfg], &[]);
    assert!(ok && out.contains("removed 0 expired"), "{out}");
}

#[tokio::test]
async fn sigterm_under_load_cuts_no_request_and_keeps_every_change() {
    const N: usize = 24;
    let (app, gate) = gated_app().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), app, "shutdown_grace = 30");
    let p = start(&config);
    let clients: Vec<reqwest::Client> = (0..N).map(|_| browser()).collect();
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut visit = p.get(b, "/gate").incr("n");
            if i % 2 == 0 {
                // Half of them stream a 4 MiB body back while the sidecar drains.
                visit = visit.header("x-test-body-size", (4u64 << 20).to_string());
            }
            tokio::spawn(async move {
                let resp = visit.send().await;
                let status = resp.status();
                let cookies = set_cookies(&resp).len();
                let body = resp.bytes().await.expect("the body arrived whole").len();
                (status, cookies, body)
            })
        })
        .collect();
    for _ in 0..N {
        gate.wait_arrival().await;
    }
    p.signal("-TERM");
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(p.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "new connections are refused while draining");
    gate.open(N);
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, cookies, body) = t.await.unwrap();
        assert_eq!(status, 200, "request {i}");
        assert_eq!(cookies, 1, "request {i} got its session cookie");
        if i % 2 == 0 {
            assert_eq!(body, 4 << 20, "request {i} was not cut mid-response");
        }
    }
    let (status, log) = tokio::task::spawn_blocking(move || p.wait()).await.unwrap();
    assert!(status.success(), "{log}");
    // The store was flushed: every change is there after a restart.
    let p = start(&config);
    for (i, b) in clients.iter().enumerate() {
        let seen = p.get(b, "/").seen().await;
        assert_eq!(seen.session(), serde_json::json!({"n": 1}), "client {i}");
    }
    p.signal("-TERM");
    let _ = tokio::task::spawn_blocking(move || p.wait()).await;
}

#[test]
fn an_admin_listener_that_cannot_bind_stops_the_start_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\n[store]\npath = {:?}\n[admin]\nlisten = \"{}\"\n",
            dir.path().join("s").display().to_string(),
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let (ok, out) = run_cli(&["--config", cfg.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(out.contains("admin.listen"), "{out}");
}

#[tokio::test]
async fn the_cli_shows_and_ends_sessions_through_the_admin_listener() {
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let admin_port = free_port();
    let write = |token: &str| {
        write_admin_config(
            dir.path(),
            app,
            &format!("listen = \"127.0.0.1:{admin_port}\"\ntoken = \"{token}\""),
        )
    };
    let path = write("cli-token");
    let cfg = path.to_str().unwrap().to_string();
    let (ok, out) = run_cli(&["subjects", "list", "u1", "--config", &cfg], &[]);
    assert!(!ok && out.contains("is the sidecar running?"), "{out}");
    let p = start(&path);
    let b = browser();
    p.get(&b, "/")
        .reply(&[("X-Session-Set", r#"{"a":1}"#), ("X-Session-Subject", "u1")])
        .send()
        .await;
    let (ok, out) = run_cli(&["subjects", "list", "u1", "--config", &cfg], &[]);
    assert!(ok, "{out}");
    let listed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let key = listed["sessions"][0]["handle"]
        .as_str()
        .unwrap()
        .to_string();
    let (ok, out) = run_cli(&["sessions", "show", &key, "--config", &cfg], &[]);
    assert!(ok && out.contains("\"a\":1"), "{out}");
    let (ok, out) = run_cli(&["subjects", "revoke", "u1", "--config", &cfg], &[]);
    assert!(ok && out.contains("\"revoked\":1"), "{out}");
    let (ok, out) = run_cli(&["sessions", "delete", &key, "--config", &cfg], &[]);
    assert!(!ok && out.contains("not found"), "{out}");
    // Subjects holding URL syntax reach the listener whole: revoking `a?x/#` is not revoking `a`.
    for subject in ["a", "a?x/#%41"] {
        p.get(&browser(), "/")
            .reply(&[
                ("X-Session-Set", r#"{"a":1}"#),
                ("X-Session-Subject", subject),
            ])
            .send()
            .await;
    }
    let (ok, out) = run_cli(&["subjects", "revoke", "a?x/#%41", "--config", &cfg], &[]);
    assert!(ok && out.contains("\"revoked\":1"), "{out}");
    let (ok, out) = run_cli(&["subjects", "list", "a", "--config", &cfg], &[]);
    let listed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        ok && listed["sessions"].as_array().unwrap().len() == 1,
        "{out}"
    );
    write("wrong-token");
    let (ok, out) = run_cli(&["subjects", "list", "u1", "--config", &cfg], &[]);
    assert!(!ok && out.contains("refused the token"), "{out}");
    p.signal("-TERM");
    let _ = tokio::task::spawn_blocking(move || p.wait()).await;
}

#[tokio::test]
async fn one_access_log_event_per_request_in_json_without_the_query() {
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), app, "log_format = \"json\"");
    let p = start(&config);
    p.get(&plain(), "/shop/cart?token=query-secret")
        .incr("n")
        .send()
        .await;
    p.signal("-TERM");
    let (_, log) = tokio::task::spawn_blocking(move || p.wait()).await.unwrap();
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect();
    assert_eq!(access.len(), 1, "{log}");
    let f = &access[0]["fields"];
    assert_eq!(f["path"], "/shop/cart");
    assert_eq!(f["status"], 200);
    assert_eq!(f["session"], "new");
    assert_eq!(f["ops"], 1);
    assert!(
        f["latency_ms"].as_f64().is_some() && f["upstream_ms"].as_f64().is_some(),
        "{f}"
    );
    assert!(!log.contains("query-secret"), "{log}");
}

/// The system calls a durable write makes, as `strace` sees them: sled's own flush uses
/// `sync_file_range`, which a power cut can defeat; the sidecar must `fdatasync` its
/// write-ahead log (which holds the change) before the response that acknowledges it leaves.
#[tokio::test]
async fn a_durable_write_fdatasyncs_the_store_before_it_is_acknowledged() {
    if Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is needed (apt-get install strace; .ci/run installs it)");
    }
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), app, "");
    let p = start(&config);
    let trace = dir.path().join("trace.txt");
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-y",
            "-e",
            "trace=fdatasync,fsync,sync_file_range",
            "-o",
        ])
        .arg(&trace)
        .args(["-p", &p.child.id().to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut errs = BufReader::new(strace.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("attached") {
        line.clear();
        assert!(
            errs.read_line(&mut line).unwrap() > 0,
            "strace could not attach"
        );
    }
    let r = p.get(&browser(), "/").incr("visits").send().await;
    assert_eq!(r.status(), 200);
    assert_eq!(set_cookies(&r).len(), 1, "the write was acknowledged");
    Command::new("kill")
        .args(["-INT", &strace.id().to_string()])
        .status()
        .unwrap();
    let _ = strace.wait();
    let calls = std::fs::read_to_string(&trace).unwrap();
    let store = dir.path().join("sessions");
    let synced = calls
        .lines()
        .filter(|l| {
            l.contains("fdatasync(")
                && ["wal-a", "wal-b"]
                    .iter()
                    .any(|f| l.contains(&format!("{}>", store.join(f).display())))
        })
        .count();
    assert!(synced >= 1, "no fdatasync of the write-ahead log:\n{calls}");
    p.signal("-TERM");
    let (status, _) = p.wait();
    assert!(status.success());
}

/// `session-sidecar healthcheck` (a container's HEALTHCHECK, no curl): 0 while ready, 1 when
/// nothing answers; it finds a listener bound on every address through loopback, and the admin
/// token can come from a file as container secrets do.
#[tokio::test]
async fn healthcheck_reports_readiness_through_the_admin_listener() {
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let admin_port = free_port();
    let token = dir.path().join("token");
    std::fs::write(&token, "a-token-from-a-file\n").unwrap();
    let path = write_admin_config(
        dir.path(),
        app,
        &format!(
            "listen = \"0.0.0.0:{admin_port}\"\ntoken_file = {:?}",
            token.display().to_string()
        ),
    );
    let cfg = path.to_str().unwrap().to_string();
    let (ok, out) = run_cli(&["healthcheck", "--config", &cfg], &[]);
    assert!(!ok && out.contains("is the sidecar running?"), "{out}");
    let p = start(&path);
    let (ok, out) = run_cli(&["healthcheck", "--config", &cfg], &[]);
    assert!(ok && out.contains("ready"), "{out}");
    // The token from the file guards the other endpoints.
    let r = get(&plain(), format!("http://127.0.0.1:{admin_port}/metrics"))
        .send()
        .await;
    assert_eq!(r.status(), 401);
    let r = plain()
        .get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .bearer_auth("a-token-from-a-file")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    p.signal("-TERM");
    let (status, _) = p.wait();
    assert!(status.success());
}

/// Behind a trusted proxy that says visitors came over HTTPS, a cookie without `Secure` would
/// also travel over plain HTTP: the sidecar says so once, at the first such request.
#[tokio::test]
async fn an_insecure_cookie_behind_an_https_proxy_is_warned_about_once() {
    let app = start_app(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let p = start(&write_config(dir.path(), app, "trust_forwarded = true"));
    let client = plain();
    let get = async |proto: &str| {
        let r = p
            .get(&client, "/")
            .header("x-forwarded-proto", proto)
            .send()
            .await;
        assert_eq!(r.status(), 200);
    };
    get("http").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let warned = |log: &str| log.matches("set [cookie] secure = true").count();
    assert_eq!(
        warned(&p.log.lock().unwrap()),
        0,
        "plain HTTP: nothing to warn about"
    );
    get("https").await;
    get("HTTPS").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.signal("-TERM");
    let (_, log) = p.wait();
    assert_eq!(warned(&log), 1, "{log}");
    // Secure cookies, or an untrusted X-Forwarded-Proto: no warning.
    for extra in ["trust_forwarded = true\n[cookie]\nsecure = true", ""] {
        let dir = tempfile::tempdir().unwrap();
        let p = start(&write_config(dir.path(), app, extra));
        let r = p
            .get(&plain(), "/")
            .header("x-forwarded-proto", "https")
            .send()
            .await;
        assert_eq!(r.status(), 200);
        p.signal("-TERM");
        let (_, log) = p.wait();
        assert_eq!(warned(&log), 0, "{extra}: {log}");
    }
}
