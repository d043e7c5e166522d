//! A real app that takes its user from the front server, behind the sidecar with no code of its
//! own for sessions (docs/HEADERS.md §1, `[identity]`): Debian's Nagios 4 CGIs under Debian's
//! Apache, which turns `X-WEBAUTH-USER` into `REMOTE_USER`
//! (`RewriteRule .* - [E=REMOTE_USER:%{HTTP:X-WEBAUTH-USER}]`), with the Nagios daemon running on
//! a test configuration. A login page (a shell CGI beside Nagios) tags the session; Nagios then
//! shows each visitor the hosts its user may see, and nobody else's, whatever header a client
//! forges.
//!
//! Needs root (Apache and Nagios switch to the `nagios` user) and the packages `apache2`,
//! `nagios4-core` and `nagios4-cgi`; without them the test says why and passes, unless
//! `SIDECAR_REQUIRE_STACKS=1` (set by CI) makes that a failure.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const CGI: &str = "/usr/lib/cgi-bin/nagios4";

/// Why the stack cannot run here, if it cannot.
fn missing() -> Option<String> {
    for path in [
        "/usr/sbin/nagios4",
        "/usr/sbin/apache2",
        CGI,
        "/etc/nagios4/cgi.cfg",
    ] {
        if !Path::new(path).exists() {
            return Some(format!(
                "{path} is missing (apt-get install apache2 nagios4-core nagios4-cgi)"
            ));
        }
    }
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("it needs root (Apache and Nagios switch to the nagios user)".into());
    }
    None
}

/// Stops what a test started, even when the test fails.
struct Stop(Vec<Vec<String>>);

impl Drop for Stop {
    fn drop(&mut self) {
        for argv in &self.0 {
            let _ = Command::new(&argv[0]).args(&argv[1..]).status();
        }
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Nagios' objects: two hosts with a service each; the contact alice may see web1 only.
const OBJECTS: &str = include_str!("fixtures/nagios/objects.cfg");

/// Nagios, Apache and the login page in `dir`; Apache listens on `port`.
fn start_stack(dir: &Path, port: u16) -> Stop {
    let d = dir.display();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(dir.join("checkresults")).unwrap();
    write(&dir.join("objects.cfg"), OBJECTS);
    write(
        &dir.join("nagios.cfg"),
        &format!(
            "cfg_file={d}/objects.cfg\nobject_cache_file={d}/objects.cache\n\
             precached_object_file={d}/objects.precache\nstatus_file={d}/status.dat\n\
             log_file={d}/nagios.log\ntemp_file={d}/nagios.tmp\ntemp_path={d}\n\
             lock_file={d}/nagios.lock\nstate_retention_file={d}/retention.dat\n\
             command_file={d}/nagios.cmd\ncheck_result_path={d}/checkresults\n\
             query_socket={d}/nagios.qh\nnagios_user=nagios\nnagios_group=nagios\n\
             check_external_commands=0\nstatus_update_interval=1\n"
        ),
    );
    // Debian's CGI configuration, pointed at this Nagios, with authentication on: a user sees
    // the hosts it is a contact of, and root sees all.
    let cgi = std::fs::read_to_string("/etc/nagios4/cgi.cfg").unwrap();
    let cgi: String = cgi
        .lines()
        .map(|l| match l.split('=').next().unwrap_or("") {
            "main_config_file" => format!("main_config_file={d}/nagios.cfg"),
            "use_authentication" => "use_authentication=1".into(),
            "authorized_for_all_hosts" => "authorized_for_all_hosts=root".into(),
            "authorized_for_all_services" => "authorized_for_all_services=root".into(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    write(&dir.join("cgi.cfg"), &cgi);
    // The app's login page, beside Nagios: it tags the session with the user.
    let login = dir.join("login.cgi");
    write(
        &login,
        "#!/bin/sh\nuser=\"${QUERY_STRING#user=}\"\n\
         printf 'Content-Type: text/plain\\r\\nX-Session-Subject: %s\\r\\nX-Session-Cycle: 1\\r\\n\
         X-Session-Set: {\"user\": \"%s\"}\\r\\n\\r\\nlogged in as %s\\n' \"$user\" \"$user\" \"$user\"\n",
    );
    std::fs::set_permissions(&login, std::fs::Permissions::from_mode(0o755)).unwrap();
    write(
        &dir.join("httpd.conf"),
        &format!(
            "ServerRoot {d}\nListen 127.0.0.1:{port}\nPidFile {d}/httpd.pid\nErrorLog {d}/httpd-error.log\n\
             LoadModule mpm_prefork_module /usr/lib/apache2/modules/mod_mpm_prefork.so\n\
             LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so\n\
             LoadModule alias_module /usr/lib/apache2/modules/mod_alias.so\n\
             LoadModule cgi_module /usr/lib/apache2/modules/mod_cgi.so\n\
             LoadModule env_module /usr/lib/apache2/modules/mod_env.so\n\
             LoadModule rewrite_module /usr/lib/apache2/modules/mod_rewrite.so\n\
             User nagios\nGroup nagios\nServerName localhost\n\
             ScriptAlias /cgi-bin/nagios4/ {CGI}/\nScriptAlias /login {d}/login.cgi\n\
             <Directory \"{CGI}\">\n  Options +ExecCGI\n  Require all granted\n\
               SetEnv NAGIOS_CGI_CONFIG {d}/cgi.cfg\n  RewriteEngine On\n\
               RewriteRule .* - [E=REMOTE_USER:%{{HTTP:X-WEBAUTH-USER}}]\n</Directory>\n\
             <Directory \"{d}\">\n  Options +ExecCGI\n  Require all granted\n</Directory>\n"
        ),
    );
    let chown = Command::new("chown")
        .args(["-R", "nagios:nagios"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(chown.success());
    let nagios = dir.join("nagios.cfg").display().to_string();
    let httpd = dir.join("httpd.conf").display().to_string();
    let started = Command::new("/usr/sbin/nagios4")
        .args(["-d", &nagios])
        .status()
        .unwrap();
    assert!(started.success(), "nagios4 -d {nagios}");
    let lock = dir.join("nagios.lock");
    let stop = Stop(vec![
        vec![
            "apache2".into(),
            "-f".into(),
            httpd.clone(),
            "-k".into(),
            "stop".into(),
        ],
        vec![
            "sh".into(),
            "-c".into(),
            format!("kill $(cat {}) 2>/dev/null", lock.display()),
        ],
    ]);
    let apache = Command::new("apache2")
        .args(["-f", &httpd, "-k", "start"])
        .status()
        .unwrap();
    assert!(apache.success(), "apache2 -f {httpd}");
    stop
}

/// The hosts Nagios' JSON CGI lists for whoever the request is, through the sidecar.
async fn hosts(s: &Sidecar, client: &reqwest::Client, forged: Option<&str>) -> Vec<String> {
    let mut visit = s.get(client, "/cgi-bin/nagios4/statusjson.cgi?query=hostlist");
    if let Some(user) = forged {
        visit = visit
            .header("X-WEBAUTH-USER", user)
            .header("x_webauth_user", user);
    }
    let text = visit.text().await;
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(json["result"]["type_text"], "Success", "{json}");
    let mut list: Vec<String> = json["data"]["hostlist"]
        .as_object()
        .unwrap_or_else(|| panic!("{json}"))
        .keys()
        .cloned()
        .collect();
    list.sort();
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nagios_behind_apache_shows_each_visitor_its_own_hosts_and_nobody_elses() {
    if let Some(why) = missing() {
        assert!(
            std::env::var_os("SIDECAR_REQUIRE_STACKS").is_none(),
            "SIDECAR_REQUIRE_STACKS is set and {why}"
        );
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _stop = start_stack(dir.path(), port);
    // Nagios writes its object cache and status once it runs; Apache answers.
    for _ in 0..100 {
        if dir.path().join("status.dat").exists()
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let app = format!("127.0.0.1:{port}").parse().unwrap();
    let s = sidecar_for(app, "[identity]\nheader = \"X-WEBAUTH-USER\"").await;

    // Nobody logged in: Nagios sees no user, whatever the client claims to be.
    let stranger = browser();
    assert_eq!(hosts(&s, &stranger, None).await, Vec::<String>::new());
    assert_eq!(
        hosts(&s, &stranger, Some("root")).await,
        Vec::<String>::new()
    );

    // alice logs in on the app's page; Nagios shows her the host she is a contact of.
    let alice = browser();
    let login = s.get(&alice, "/login?user=alice").text().await;
    assert_eq!(login.trim(), "logged in as alice");
    assert_eq!(hosts(&s, &alice, None).await, ["web1"]);
    // A forged header from her browser changes nothing: the subject is who she is.
    assert_eq!(hosts(&s, &alice, Some("root")).await, ["web1"]);

    // root sees every host; alice still only hers.
    let admin = browser();
    s.get(&admin, "/login?user=root").text().await;
    assert_eq!(hosts(&s, &admin, None).await, ["db1", "web1"]);
    assert_eq!(hosts(&s, &alice, None).await, ["web1"]);
}
