//! Unit tests of parsing, validation and overrides.
use super::*;

fn err(text: &str) -> String {
    Config::from_toml(text).unwrap_err().to_string()
}

#[test]
fn empty_file_gives_the_documented_defaults() {
    let c = Config::from_toml("").unwrap();
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.upstream.as_str(), "127.0.0.1:8000");
    assert_eq!(c.header_prefix, "x-session");
    assert_eq!(c.cookie.name, "sessionid");
    assert!(c.cookie.http_only && !c.cookie.secure);
    assert_eq!(c.cookie.same_site, SameSite::Lax);
    assert_eq!(c.expiry.cookie_age, Duration::from_secs(1_209_600));
    assert!(c.expiry.idle_timeout.is_none());
    assert!(c.store.durable);
    assert_eq!(c.max_session_bytes, 8192);
}

#[test]
fn the_documented_example_file_is_valid() {
    let text = include_str!("../../config/sidecar.toml");
    Config::from_toml(text).unwrap();
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    assert!(err("listn = \"x\"").contains("listn"));
    assert!(err("[cookie]\nnmae = \"x\"").contains("nmae"));
}

#[test]
fn bad_values_name_the_key_and_value() {
    let e = err("listen = \"nowhere\"");
    assert!(e.contains("`listen`") && e.contains("nowhere"), "{e}");
    let e = err("[cookie]\nsame_site = \"Sometimes\"");
    assert!(
        e.contains("cookie.same_site") && e.contains("Sometimes"),
        "{e}"
    );
    let e = err("upstream = \"https://x\"");
    assert!(e.contains("upstream"), "{e}");
    let e = err("[expiry]\ncookie_age = 0");
    assert!(e.contains("expiry.cookie_age"), "{e}");
    let e = err("upstream_timeout = \"soon\"");
    assert!(e.contains("upstream_timeout"), "{e}");
    let e = err("[admin]\nlisten = \"0.0.0.0:9091\"");
    assert!(e.contains("admin.token"), "{e}");
    let e = err("workers = 5000");
    assert!(e.contains("`workers`") && e.contains("5000"), "{e}");
    let e = err("workers = -1");
    assert!(e.contains("workers"), "{e}");
}

#[test]
fn workers_default_to_one_per_cpu_and_take_a_number() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(Config::from_toml("").unwrap().workers, cpus);
    assert_eq!(Config::from_toml("workers = 0").unwrap().workers, cpus);
    assert_eq!(Config::from_toml("workers = 3").unwrap().workers, 3);
}

#[test]
fn environment_overrides_convert_to_the_key_type() {
    let env = [
        ("SESSION_SIDECAR_UPSTREAM", "http://127.0.0.1:9000"),
        ("SESSION_SIDECAR_STORE__PATH", "/tmp/x"),
        ("SESSION_SIDECAR_UPSTREAM_TIMEOUT", "7"),
        ("SESSION_SIDECAR_COOKIE__SECURE", "true"),
        ("SESSION_SIDECAR_SKIP_PATHS", "[\"/static/\"]"),
        (
            "SESSION_SIDECAR_SECURITY__SECRET_KEY",
            "s3cret-s3cret-s3cret-s3cret-s3cret",
        ),
        ("OTHER", "ignored"),
    ]
    .map(|(a, b)| (a.to_string(), b.to_string()));
    let c = Config::from_toml_with_env("upstream_timeout = 3", env).unwrap();
    assert_eq!(c.upstream.as_str(), "127.0.0.1:9000");
    assert_eq!(c.store.path, PathBuf::from("/tmp/x"));
    assert_eq!(c.upstream_timeout, Duration::from_secs(7));
    assert!(c.cookie.secure);
    assert_eq!(c.skip_paths, vec!["/static/".to_string()]);
    assert_eq!(
        c.secret_key.as_deref(),
        Some("s3cret-s3cret-s3cret-s3cret-s3cret")
    );
}

#[test]
fn unknown_or_mistyped_environment_variables_are_errors_naming_them() {
    let one = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let e = Config::from_toml_with_env("", one("SESSION_SIDECAR_LISTN", "x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("SESSION_SIDECAR_LISTN"), "{e}");
    let e = Config::from_toml_with_env("", one("SESSION_SIDECAR_EXPIRY__COOKIE_AGE", "soon"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("SESSION_SIDECAR_EXPIRY__COOKIE_AGE"), "{e}");
    let e = Config::from_toml_with_env("", one("SESSION_SIDECAR_SKIP_PATHS", "/static/"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("SESSION_SIDECAR_SKIP_PATHS"), "{e}");
}

#[test]
fn check_config_output_masks_secrets() {
    let out = effective_toml(
        "[security]\nsecret_key = \"topsecretvalue-topsecretvalue-topsecretvalue\"\nsecret_key_fallbacks = [\"oldsecretvalue\"]",
        std::iter::empty(),
    )
    .unwrap();
    assert!(
        !out.contains("topsecretvalue") && !out.contains("oldsecretvalue"),
        "{out}"
    );
    assert!(out.contains("********"));
}

#[test]
fn a_short_secret_key_is_refused_naming_the_key() {
    let e = Config::from_toml("[security]\nsecret_key = \"hunter2\"").unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("security.secret_key") && text.contains("32"),
        "{text}"
    );
    // An old, shorter key may still verify during a rotation.
    let long = "k".repeat(32);
    Config::from_toml(&format!(
        "[security]\nsecret_key = \"{long}\"\nsecret_key_fallbacks = [\"old\"]"
    ))
    .unwrap();
}

#[test]
fn upgrades_default_to_websocket_and_refuse_h2c() {
    assert_eq!(Config::from_toml("").unwrap().upgrades, vec!["websocket"]);
    let e = Config::from_toml("upgrades = [\"websocket\", \"H2C\"]").unwrap_err();
    assert!(e.to_string().contains("upgrades"), "{e}");
}

#[test]
fn check_config_masks_a_redis_password_holding_at_signs() {
    let out = effective_toml(
        "[store]\nbackend = \"redis\"\nurl = \"redis://app:p@ss@word@redis.internal:6379/0\"",
        std::iter::empty(),
    )
    .unwrap();
    assert!(!out.contains("p@ss") && !out.contains("word@"), "{out}");
    assert!(
        out.contains("redis://********@redis.internal:6379/0"),
        "{out}"
    );
}

#[test]
fn secrets_can_come_from_files_as_container_secrets_do() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    let token = dir.path().join("token");
    std::fs::write(&secret, "k".repeat(40) + "\n").unwrap();
    std::fs::write(&token, "admin-token\r\n").unwrap();
    let c = Config::from_toml(&format!(
        "[security]\nsecret_key_file = {:?}\n[admin]\nlisten = \"0.0.0.0:9091\"\ntoken_file = {:?}",
        secret.display().to_string(),
        token.display().to_string()
    ))
    .unwrap();
    assert_eq!(c.secret_key.as_deref(), Some("k".repeat(40).as_str()));
    assert_eq!(c.admin.token.as_deref(), Some("admin-token"));
    // The file path can come from the environment too.
    let env = [(
        "SESSION_SIDECAR_SECURITY__SECRET_KEY_FILE".to_string(),
        secret.display().to_string(),
    )];
    let c = Config::from_toml_with_env("", env).unwrap();
    assert_eq!(c.secret_key.as_deref(), Some("k".repeat(40).as_str()));
}

#[test]
fn a_secret_file_that_is_missing_empty_or_doubled_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let missing = dir.path().join("missing").display().to_string();
    for (text, named) in [
        (
            format!("[security]\nsecret_key_file = {missing:?}"),
            "security.secret_key_file",
        ),
        (
            format!(
                "[security]\nsecret_key_file = {:?}",
                empty.display().to_string()
            ),
            "security.secret_key_file",
        ),
        (
            format!(
                "[security]\nsecret_key = \"{}\"\nsecret_key_file = {missing:?}",
                "k".repeat(40)
            ),
            "security.secret_key_file",
        ),
        (
            format!("[admin]\ntoken_file = {missing:?}"),
            "admin.token_file",
        ),
    ] {
        let e = Config::from_toml(&text).unwrap_err().to_string();
        assert!(e.contains(named), "{e}");
    }
}

#[test]
fn records_are_encrypted_by_default_when_a_secret_is_set_and_only_then() {
    let long = "s".repeat(40);
    assert!(!Config::from_toml("").unwrap().store.encrypt);
    let with = format!("[security]\nsecret_key = \"{long}\"");
    assert!(Config::from_toml(&with).unwrap().store.encrypt);
    let off = format!("[store]\nencrypt = false\n{with}");
    assert!(!Config::from_toml(&off).unwrap().store.encrypt);
    let text = err("[store]\nencrypt = true");
    assert!(
        text.contains("store.encrypt") && text.contains("secret_key"),
        "{text}"
    );
    let env = Config::from_toml_with_env(
        &with,
        [(
            "SESSION_SIDECAR_STORE__ENCRYPT".to_string(),
            "0".to_string(),
        )],
    )
    .unwrap();
    assert!(!env.store.encrypt);
}

#[test]
fn sentinel_settings_are_checked_together_and_their_passwords_masked() {
    let redis = "[store]\nbackend = \"redis\"\n";
    let c = Config::from_toml(&format!(
        "{redis}sentinels = [\"redis://10.0.0.1:26379\", \"redis://10.0.0.2:26379\"]\nmaster_name = \"sessions\""
    ))
    .unwrap();
    let Backend::Redis(r) = &c.store.backend else {
        panic!("redis")
    };
    assert_eq!(r.master_name.as_deref(), Some("sessions"));
    assert_eq!(r.sentinels.len(), 2);
    for (text, key) in [
        (
            format!("{redis}master_name = \"sessions\""),
            "store.master_name",
        ),
        (
            format!("{redis}sentinels = [\"redis://h:26379\"]"),
            "store.master_name",
        ),
        (
            "[store]\nsentinels = [\"redis://h:26379\"]\nmaster_name = \"m\"".to_string(),
            "store.sentinels",
        ),
        ("[store]\nmaster_name = \"m\"".to_string(), "store.sentinels"),
        (
            format!("{redis}sentinels = [\"h:26379\"]\nmaster_name = \"m\""),
            "store.sentinels",
        ),
        (
            "[store]\nbackend = \"redis\"\nurl = \"rediss://h/0\"\ntls_ca_file = \"/ca.pem\"\nsentinels = [\"redis://h:26379\"]\nmaster_name = \"m\"".to_string(),
            "store.tls_ca_file",
        ),
    ] {
        let e = err(&text);
        assert!(e.contains(key), "{text}: {e}");
    }
    let shown = effective_toml(
        &format!("{redis}sentinels = [\"redis://:s3ntinelpass@h:26379\"]\nmaster_name = \"m\""),
        std::iter::empty(),
    )
    .unwrap();
    assert!(!shown.contains("s3ntinelpass"), "{shown}");
}

#[test]
fn waiting_for_replicas_is_redis_only_and_ends_before_the_command_timeout() {
    let redis = "[store]\nbackend = \"redis\"\ncommand_timeout = 2\n";
    let c = Config::from_toml(&format!("{redis}wait_replicas = 1\nwait_timeout_ms = 500")).unwrap();
    let Backend::Redis(r) = &c.store.backend else {
        panic!("redis")
    };
    assert_eq!(
        (r.wait_replicas, r.wait_timeout),
        (1, Duration::from_millis(500))
    );
    for (text, key) in [
        (
            "[store]\nwait_replicas = 1".to_string(),
            "store.wait_replicas",
        ),
        (
            format!("{redis}wait_replicas = 1\nwait_timeout_ms = 2000"),
            "store.wait_timeout_ms",
        ),
        (
            format!("{redis}wait_replicas = 1\nwait_timeout_ms = 0"),
            "store.wait_timeout_ms",
        ),
    ] {
        let e = err(&text);
        assert!(e.contains(key), "{text}: {e}");
    }
}

#[test]
fn cluster_nodes_are_redis_only_exclusive_with_sentinels_and_masked() {
    let redis = "[store]\nbackend = \"redis\"\n";
    let c = Config::from_toml(&format!(
        "{redis}cluster_nodes = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]"
    ))
    .unwrap();
    let Backend::Redis(r) = &c.store.backend else {
        panic!("redis")
    };
    assert_eq!(r.cluster_nodes.len(), 2);
    for (text, key) in [
        (
            "[store]\ncluster_nodes = [\"redis://h:7000\"]".to_string(),
            "store.cluster_nodes",
        ),
        (
            format!(
                "{redis}cluster_nodes = [\"redis://h:7000\"]\nsentinels = [\"redis://s:26379\"]\nmaster_name = \"m\""
            ),
            "store.cluster_nodes",
        ),
        (
            format!("{redis}cluster_nodes = [\"h:7000\"]"),
            "store.cluster_nodes",
        ),
    ] {
        let e = err(&text);
        assert!(e.contains(key), "{text}: {e}");
    }
    let shown = effective_toml(
        &format!("{redis}cluster_nodes = [\"redis://:cl0sterpass@h:7000\"]"),
        std::iter::empty(),
    )
    .unwrap();
    assert!(!shown.contains("cl0sterpass"), "{shown}");
}

#[test]
fn cookie_prefixes_and_partitioned_are_refused_where_browsers_would_drop_the_cookie() {
    for (cookie, key) in [
        ("name = \"__Host-sid\"", "cookie.name"),
        (
            "name = \"__Host-sid\"\nsecure = true\npath = \"/app\"",
            "cookie.name",
        ),
        (
            "name = \"__Host-sid\"\nsecure = true\ndomain = \"example.com\"",
            "cookie.name",
        ),
        ("name = \"__host-sid\"", "cookie.name"),
        ("name = \"__Secure-sid\"", "cookie.name"),
        (
            "name = \"__SECURE-sid\"\ndomain = \"example.com\"",
            "cookie.name",
        ),
        ("partitioned = true", "cookie.partitioned"),
    ] {
        let e = err(&format!("[cookie]\n{cookie}"));
        assert!(
            e.contains(key) && e.contains("browsers drop it"),
            "{cookie}: {e}"
        );
    }
    for cookie in [
        "name = \"__Host-sid\"\nsecure = true",
        "name = \"__Secure-sid\"\nsecure = true\npath = \"/app\"\ndomain = \"example.com\"",
        "partitioned = true\nsecure = true\nsame_site = \"None\"",
        "name = \"Host-sid\"",
    ] {
        Config::from_toml(&format!("[cookie]\n{cookie}"))
            .unwrap_or_else(|e| panic!("{cookie}: {e}"));
    }
}

#[test]
fn retired_grace_defaults_to_a_minute_takes_zero_and_the_environment() {
    let c = Config::from_toml("").unwrap();
    assert_eq!(c.expiry.retired_grace, Duration::from_secs(60));
    let off = Config::from_toml("[expiry]\nretired_grace = 0").unwrap();
    assert_eq!(off.expiry.retired_grace, Duration::ZERO);
    let var = vec![(
        "SESSION_SIDECAR_EXPIRY__RETIRED_GRACE".to_string(),
        "5".to_string(),
    )];
    let env = Config::from_toml_with_env("", var).unwrap();
    assert_eq!(env.expiry.retired_grace, Duration::from_secs(5));
    assert!(err("[expiry]\nretired_grace = -1").contains("retired_grace"));
}

#[test]
fn legacy_names_apply_only_to_redis() {
    let e = err("[store]\nlegacy_names = true");
    assert!(
        e.contains("store.legacy_names") && e.contains("redis"),
        "{e}"
    );
    let c = Config::from_toml(
        "[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\nlegacy_names = true",
    )
    .unwrap();
    assert!(c.store.legacy_names);
}

#[test]
fn the_upstream_signing_key_is_32_bytes_or_more_inline_or_in_a_file_and_masked() {
    let e = Config::from_toml("[security]\nupstream_signing_key = \"short\"").unwrap_err();
    assert!(
        e.to_string().contains("security.upstream_signing_key"),
        "{e}"
    );
    let key = "s".repeat(40);
    let c = Config::from_toml(&format!("[security]\nupstream_signing_key = \"{key}\"")).unwrap();
    assert_eq!(c.upstream_signing_key.as_deref(), Some(key.as_str()));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k");
    std::fs::write(&file, format!("{key}\n")).unwrap();
    let c = Config::from_toml(&format!(
        "[security]\nupstream_signing_key_file = {:?}",
        file.display().to_string()
    ))
    .unwrap();
    assert_eq!(c.upstream_signing_key.as_deref(), Some(key.as_str()));
    let both = format!(
        "[security]\nupstream_signing_key = \"{key}\"\nupstream_signing_key_file = {:?}",
        file.display().to_string()
    );
    assert!(Config::from_toml(&both).is_err());
    let env = vec![(
        "SESSION_SIDECAR_SECURITY__UPSTREAM_SIGNING_KEY".to_string(),
        key.clone(),
    )];
    let c = Config::from_toml_with_env("", env).unwrap();
    assert!(c.upstream_signing_key.is_some());
    let shown = effective_toml(
        &format!("[security]\nupstream_signing_key = \"{key}\""),
        Vec::<(String, String)>::new(),
    )
    .unwrap();
    assert!(!shown.contains(&key), "{shown}");
}

#[test]
fn the_identity_header_is_an_apps_own_header() {
    let c = Config::from_toml("[identity]\nheader = \"X-WEBAUTH-USER\"").unwrap();
    assert_eq!(c.identity_header.unwrap().as_str(), "x-webauth-user");
    assert!(Config::from_toml("").unwrap().identity_header.is_none());
    for bad in [
        "X-Session-User",
        "x_session_user",
        "Cookie",
        "Host",
        "Authorization",
        "X-Forwarded-User",
        "Connection",
        "a b",
        "é",
    ] {
        let e = Config::from_toml(&format!("[identity]\nheader = {bad:?}")).unwrap_err();
        assert!(e.to_string().contains("identity.header"), "{bad}: {e}");
    }
}
