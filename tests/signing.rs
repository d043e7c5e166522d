//! docs/SIGNING.md: `X-Session-Signature`. The checks the page prints for Python, PHP, Perl, Node
//! and Java are copied out of it and run for real, each in its own language, on the headers an app
//! behind the sidecar received: they pass, and they fail on a tampered header, a missing one, a wrong key,
//! a time outside the window, and headers sent straight to the app's port.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;

const KEY: &str = "the upstream signing key, 32 bytes or more";

/// Every language docs/SIGNING.md gives the check in.
const LANGS: [&str; 5] = ["python", "php", "perl", "node", "java"];

/// The fenced block after `<!-- check:{lang} -->` in docs/SIGNING.md.
fn documented(lang: &str) -> String {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/SIGNING.md")).unwrap();
    let marker = format!("<!-- check:{lang} -->");
    let after = &page[page.find(&marker).expect("the marker")..];
    let start = after.find("```").unwrap();
    let body = &after[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].to_string()
}

/// The headers as a CGI-style environment: `HTTP_X_SESSION_STATUS=existing`.
fn environment(headers: &BTreeMap<String, String>) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                format!("HTTP_{}", n.to_uppercase().replace('-', "_")),
                v.clone(),
            )
        })
        .collect()
}

/// Runs `lang`'s documented check with `key` on `headers` (as its language's request would
/// carry them): whether it accepts them.
fn accepts(lang: &str, key: &str, headers: &BTreeMap<String, String>) -> bool {
    let check = documented(lang);
    let (program, args): (&str, Vec<String>) = match lang {
        "python" => (
            "python3",
            vec![
                "-c".into(),
                format!(
                    "{check}\nimport os, sys\n\
                     get = lambda n: os.environ.get('HTTP_' + n.upper().replace('-', '_'))\n\
                     sys.exit(0 if session_signature_ok(get, sys.argv[1].encode()) else 1)\n"
                ),
                key.into(),
            ],
        ),
        "php" => (
            "php",
            vec![
                "-r".into(),
                format!("{check}\nexit(session_signature_ok($argv[1]) ? 0 : 1);"),
                key.into(),
            ],
        ),
        "perl" => (
            "perl",
            vec![
                "-e".into(),
                format!("{check}\nexit(session_signature_ok($ARGV[0]) ? 0 : 1);"),
                key.into(),
            ],
        ),
        "node" => (
            "node",
            vec![
                "-e".into(),
                format!(
                    "{check}\nconst h = {{}};\n\
                     for (const [n, v] of Object.entries(process.env))\n\
                       if (n.startsWith('HTTP_')) h[n.slice(5).toLowerCase().replace(/_/g, '-')] = v;\n\
                     process.exit(sessionSignatureOk(h, process.argv[1]) ? 0 : 1);\n"
                ),
                key.into(),
            ],
        ),
        "java" => (
            "java",
            vec![
                "-cp".into(),
                java_class().display().to_string(),
                "Check".into(),
                key.into(),
            ],
        ),
        other => panic!("{other}"),
    };
    let out = Command::new(program)
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(environment(headers))
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (CI installs it)"));
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "{lang}'s check did not run: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The Java check compiled once into a class `Check` whose `main` reads the request headers from
/// `HTTP_*` variables, as a CGI gateway would hand them on; the directory holding it.
fn java_class() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let check = documented("java");
        let (imports, body): (Vec<&str>, Vec<&str>) =
            check.lines().partition(|l| l.starts_with("import "));
        let source = format!(
            "{}\npublic class Check {{\n{}\n\
             public static void main(String[] a) throws Exception {{\n\
               Map<String, String> env = System.getenv();\n\
               Function<String, String> h = n -> env.get(\"HTTP_\" + n.toUpperCase().replace('-', '_'));\n\
               System.exit(sessionSignatureOk(h, a[0].getBytes(StandardCharsets.UTF_8), 60) ? 0 : 1);\n\
             }}\n}}\n",
            imports.join("\n"),
            body.join("\n")
        );
        std::fs::write(dir.path().join("Check.java"), source).unwrap();
        let javac = Command::new("javac")
            .arg("Check.java")
            .current_dir(dir.path())
            .output()
            .expect("javac (CI installs default-jdk-headless)");
        assert!(
            javac.status.success(),
            "{}",
            String::from_utf8_lossy(&javac.stderr)
        );
        dir
    })
    .path()
}

/// The session headers the app received for one request through `s`.
async fn received(s: &Sidecar, client: &reqwest::Client) -> BTreeMap<String, String> {
    let seen = s.get(client, "/").seen().await;
    seen.headers
        .iter()
        .filter(|(n, _)| n.starts_with("x-session") || n.as_str() == "x-webauth-user")
        .map(|(n, v)| (n.clone(), v[0].clone()))
        .collect()
}

fn signed_names(headers: &BTreeMap<String, String>) -> Vec<String> {
    let sig = &headers["x-session-signature"];
    let h = sig
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("h="))
        .unwrap();
    h.split(' ').map(str::to_string).collect()
}

const SIGNED: &str = "expose_id = true\n[security]\nupstream_signing_key = \
    \"the upstream signing key, 32 bytes or more\"\n\
    [identity]\nheader = \"X-WEBAUTH-USER\"\n[csrf]\ntoken = true\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_checks_accept_the_sidecars_headers_and_nothing_else() {
    holds_the_signature(&sidecar(SIGNED).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signature_holds_on_redis_and_a_redis_cluster() {
    let (Some(server), Some(cluster)) = (RedisServer::start(), RedisCluster::start()) else {
        return;
    };
    for store in [server.store_toml("sig:"), cluster.store_toml("sig:")] {
        let app = start_app(echo).await;
        holds_the_signature(&sidecar_for(app, &format!("{SIGNED}{store}")).await).await;
    }
}

/// Every clause of docs/SIGNING.md against the sidecar `s` (signed with [`KEY`]).
async fn holds_the_signature(s: &Sidecar) {
    let client = browser();
    // A logged-in visitor: data, subject, id, CSRF token and the identity header are all signed.
    let r = s
        .get(&client, "/")
        .reply(&[
            ("X-Session-Set", r#"{"user": "alice", "note": "é\u007f"}"#),
            ("X-Session-Subject", "alice"),
        ])
        .send()
        .await;
    assert_eq!(r.status(), 200);
    let genuine = received(s, &client).await;
    assert_eq!(
        signed_names(&genuine),
        [
            "x-session",
            "x-session-csrf",
            "x-session-expiry-age",
            "x-session-id",
            "x-session-status",
            "x-session-subject",
            "x-webauth-user",
        ],
        "{genuine:?}"
    );
    assert_eq!(genuine["x-webauth-user"], "alice");
    // A new visitor's request is signed too.
    let fresh = received(s, &plain()).await;
    assert_eq!(
        signed_names(&fresh),
        [
            "x-session",
            "x-session-csrf",
            "x-session-expiry-age",
            "x-session-status"
        ]
    );

    let mut tampered = genuine.clone();
    tampered.insert("x-session".into(), r#"{"user":"admin"}"#.into());
    let mut missing = genuine.clone();
    missing.remove("x-session-subject");
    let mut straight = genuine.clone();
    straight.remove("x-session-signature");
    let mut other_user = genuine.clone();
    other_user.insert("x-webauth-user".into(), "admin".into());
    for lang in LANGS {
        assert!(accepts(lang, KEY, &genuine), "{lang}: {genuine:?}");
        assert!(accepts(lang, KEY, &fresh), "{lang}: {fresh:?}");
        assert!(!accepts(lang, KEY, &tampered), "{lang}: tampered data");
        assert!(!accepts(lang, KEY, &other_user), "{lang}: another user");
        assert!(
            !accepts(lang, KEY, &missing),
            "{lang}: a signed header missing"
        );
        assert!(!accepts(lang, KEY, &straight), "{lang}: no signature");
        assert!(
            !accepts(lang, "another key of at least thirty-two bytes", &genuine),
            "{lang}: wrong key"
        );
    }

    // Outside the window: the sidecar's clock two minutes ahead, then behind.
    s.clock.advance(Duration::from_secs(120));
    let ahead = received(s, &client).await;
    for lang in LANGS {
        assert!(!accepts(lang, KEY, &ahead), "{lang}: signed 2 min ahead");
    }

    // Sent straight to the app's port, forged headers carry no signature the app accepts.
    let forged = get(&plain(), format!("http://{}/", s.app))
        .header("x-session", r#"{"user":"admin"}"#)
        .header("x-session-subject", "admin")
        .header("x-session-signature", &genuine["x-session-signature"])
        .seen()
        .await;
    let forged: BTreeMap<String, String> = forged
        .headers
        .iter()
        .filter(|(n, _)| n.starts_with("x-session"))
        .map(|(n, v)| (n.clone(), v[0].clone()))
        .collect();
    for lang in LANGS {
        assert!(!accepts(lang, KEY, &forged), "{lang}: forged {forged:?}");
    }
}

/// Without a key, no signature header reaches the app, and a client's is removed like any
/// header of ours.
#[tokio::test]
async fn without_a_key_the_app_gets_no_signature() {
    let s = sidecar("").await;
    let seen = s
        .get(&plain(), "/")
        .header("x-session-signature", "v1; t=1; h=x-session; s=00")
        .header("X_Session_Signature", "v1; t=1; h=x-session; s=00")
        .seen()
        .await;
    assert!(
        !seen.headers.keys().any(|n| n.contains("signature")),
        "{:?}",
        seen.headers
    );
}

/// On a skip path the app gets no session headers, so no signature either (docs/SIGNING.md).
#[tokio::test]
async fn a_skip_path_carries_neither_session_headers_nor_a_signature() {
    let s = sidecar(&format!(
        "skip_paths = [\"/static/\"]\n[security]\nupstream_signing_key = {KEY:?}"
    ))
    .await;
    let seen = s.get(&plain(), "/static/app.css").seen().await;
    assert!(
        !seen.headers.keys().any(|n| n.starts_with("x-session")),
        "{:?}",
        seen.headers
    );
    assert!(
        s.get(&plain(), "/")
            .seen()
            .await
            .header("x-session-signature")
            .is_some()
    );
}
