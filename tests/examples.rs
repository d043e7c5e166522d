//! The example legacy apps behind a real sidecar, driven as a browser would: they must keep
//! showing what the README promises.

mod common;

use std::process::{Command, Stdio};

use common::*;

#[tokio::test]
async fn the_python_legacy_app_counts_visits_keeps_a_cart_and_logs_in_and_out() {
    let (_app, s) = python_demo("").await;
    let b = browser();
    for n in 1..=3 {
        let page = s.get(&b, "/").text().await;
        let want = format!("You have visited this page {n} time");
        assert!(page.contains(&want), "{page}");
    }
    s.get(&b, "/cart/add?item=book").send().await;
    s.get(&b, "/cart/add?item=pen").send().await;
    let cart = s.get(&b, "/cart").text().await;
    assert!(cart.contains("<li>book</li><li>pen</li>"), "{cart}");

    let login = s.get(&b, "/login?user=ann").send().await;
    assert_eq!(login.status(), 303);
    assert_eq!(set_cookies(&login).len(), 1, "a new key at login");
    let home = s.get(&b, "/").text().await;
    assert!(
        home.contains("logged in as <b>ann</b>") && home.contains("Welcome, ann!"),
        "{home}"
    );
    assert!(
        home.contains("You have visited this page 4 times"),
        "data survives the cycle: {home}"
    );
    let home = s.get(&b, "/").text().await;
    assert!(!home.contains("Welcome, ann!"), "flash shown once: {home}");

    s.get(&b, "/logout").send().await;
    let home = s.get(&b, "/").text().await;
    assert!(
        home.contains("You are logged out.") && home.contains("login as ann"),
        "{home}"
    );
    assert!(
        home.contains("You have visited this page 1 time."),
        "{home}"
    );

    let fresh = browser();
    let first = s.get(&fresh, "/test-cookie").text().await;
    assert!(first.contains("Test cookie set"), "{first}");
    let second = s.get(&fresh, "/test-cookie?check=1").text().await;
    assert!(second.contains("Your browser accepts cookies"), "{second}");

    // A client that keeps no cookies is told so on the check, as Django's test_cookie_worked().
    let cookieless = reqwest::Client::new();
    for path in ["/test-cookie", "/test-cookie?check=1"] {
        let page = s.get(&cookieless, path).text().await;
        if path.ends_with("check=1") {
            assert!(page.contains("does not accept cookies"), "{page}");
        }
    }
}

#[tokio::test]
async fn the_rust_legacy_app_counts_visits_behind_the_sidecar() {
    let port = free_port();
    // `cargo test` builds the examples beside the test binaries: <target>/<profile>/deps/this
    // and <target>/<profile>/examples/legacy_app, wherever CARGO_TARGET_DIR puts <target>.
    let profile_dir = std::env::current_exe().unwrap();
    let profile_dir = profile_dir.parent().and_then(|deps| deps.parent()).unwrap();
    let exe = profile_dir.join("examples/legacy_app");
    if !exe.exists() {
        // Run on its own (the test binary started by hand): build it into the same target.
        let ok = Command::new(env!("CARGO"))
            .args(["build", "--example", "legacy_app", "--target-dir"])
            .arg(profile_dir.parent().unwrap())
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let _app = Killed(
        Command::new(exe)
            .arg(port.to_string())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until_up(port).await;
    let s = sidecar_for(format!("127.0.0.1:{port}").parse().unwrap(), "").await;
    let b = browser();
    for n in 1..=2 {
        let page = s.get(&b, "/").text().await;
        assert!(
            page.contains(&format!("visited this page {n} times")),
            "{page}"
        );
    }
    let login = s.get(&b, "/login?user=bob").send().await;
    assert_eq!(login.status(), 303);
    let page = s.get(&b, "/").text().await;
    assert!(
        page.contains("Hello, bob") && page.contains("3 times"),
        "{page}"
    );
    s.get(&b, "/logout").send().await;
    let page = s.get(&b, "/").text().await;
    assert!(
        page.contains("Hello, nobody") && page.contains("1 times"),
        "{page}"
    );
}
