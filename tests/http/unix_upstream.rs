//! `upstream = "unix:/path"`: the app listens on a Unix socket (gunicorn `--bind unix:`, uWSGI,
//! Puma, a container in the same pod), and gets its sessions as over TCP.

use std::sync::atomic::Ordering;

use crate::common::*;

#[tokio::test]
async fn an_app_on_a_unix_socket_gets_its_sessions_over_kept_alive_connections() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let accepted = start_unix_app(&sock, echo).await;
    // The address given to the helper is not used: the config names the socket.
    let unused = "127.0.0.1:9".parse().unwrap();
    let s = sidecar_for(unused, &format!("upstream = \"unix:{}\"", sock.display())).await;
    let b = browser();
    for n in 0..5 {
        let r = s.get(&b, "/cart?item=1").incr("n").send().await;
        assert_eq!(r.status(), 200);
        let got = seen(r).await;
        assert_eq!(
            got.session().get("n").and_then(|v| v.as_i64()).unwrap_or(0),
            n
        );
        assert_eq!(got.path, "/cart");
        assert_eq!(got.query.as_deref(), Some("item=1"));
        assert_eq!(
            got.header("host"),
            Some(s.addr.to_string().as_str()),
            "the client's Host"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one keep-alive connection to the app for one client"
    );
}

#[tokio::test]
async fn a_missing_socket_is_a_502_and_a_relative_path_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody-listens.sock");
    let unused = "127.0.0.1:9".parse().unwrap();
    let s = sidecar_for(unused, &format!("upstream = \"unix:{}\"", sock.display())).await;
    let r = s.get(&plain(), "/").incr("n").send().await;
    assert_eq!(r.status(), 502);
    assert!(set_cookies(&r).is_empty());
    assert_eq!(r.text().await.unwrap(), "the application is unreachable\n");
    for bad in ["unix:app.sock", "unix:", "https://x", "ftp://x"] {
        let e = session_sidecar::Config::from_toml(&format!("upstream = \"{bad}\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`upstream`"), "{bad}: {e}");
    }
    let c = session_sidecar::Config::from_toml("upstream = \"unix:/run/app.sock\"").unwrap();
    assert_eq!(c.upstream.to_string(), "unix:/run/app.sock");
}
