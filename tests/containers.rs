//! The container form on a real engine: the image the project's Dockerfile builds, the two
//! compose examples, and what users do to containers (kill, restart, stop, cut a network).
//!
//! The images are made once per run by `scripts/docker-images.sh` (base images made locally
//! where nothing can be pulled, then `docker build` of the unchanged Dockerfile). Where no
//! engine answers, every test here prints why and passes; `SIDECAR_REQUIRE_DOCKER=1` (CI) makes
//! that a failure instead. The tests run one at a time: each starts its own compose project.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{cmd:?}: could not start: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn docker() -> Command {
    Command::new("docker")
}

/// How this machine runs compose: the plugin (`docker compose`) or the older `docker-compose`.
fn compose_cmd() -> Command {
    let plugin = docker()
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if plugin {
        let mut c = docker();
        c.arg("compose");
        c
    } else {
        Command::new("docker-compose")
    }
}

/// The engine, ready and with the images built; `None` (after printing why) where no engine
/// answers. One test at a time holds the returned guard.
async fn engine() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    static IMAGES: OnceLock<Result<(), String>> = OnceLock::new();
    let answers = docker()
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !answers {
        assert!(
            std::env::var_os("SIDECAR_REQUIRE_DOCKER").is_none(),
            "SIDECAR_REQUIRE_DOCKER is set and no container engine answers `docker version`"
        );
        eprintln!("skipped: no container engine answers `docker version`");
        return None;
    }
    let guard = ONE_AT_A_TIME.lock().await;
    let built = IMAGES.get_or_init(|| {
        let out = run(Command::new("bash").arg(root().join("scripts/docker-images.sh")));
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "scripts/docker-images.sh failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    Some(guard)
}

/// A compose project of its own (unique name), taken down with its volumes when dropped.
struct Project {
    name: String,
    dir: PathBuf,
}

impl Project {
    fn up(example: &str) -> Project {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = Project {
            name: format!("sstest{}x{n}", std::process::id()),
            dir: root().join("examples/compose").join(example),
        };
        ok(p.compose().args(["up", "-d", "--no-build"]));
        p
    }

    fn compose(&self) -> Command {
        let mut c = compose_cmd();
        c.current_dir(&self.dir)
            .args(["-p", &self.name])
            // An ephemeral host port: tests reach the containers by their addresses.
            .env("PUBLISH", "127.0.0.1:");
        c
    }

    /// The container id of a service.
    fn container(&self, service: &str) -> String {
        let id = ok(self.compose().args(["ps", "-q", service]));
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    /// The service's address on one of the project's networks (`default`, `front`, ...).
    fn addr(&self, service: &str, network: &str) -> String {
        let net = format!("{}_{network}", self.name);
        let ip = ok(docker().args([
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
            &self.container(service),
        ]));
        assert!(!ip.is_empty(), "{service} has no address on {net}");
        format!("{ip}:8080")
    }

    fn logs(&self, service: &str) -> String {
        let out = run(docker().args(["logs", &self.container(service)]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self
            .compose()
            .args(["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
    }
}

/// A visitor keeping its session cookie by hand: the sidecars of one example sit at several
/// addresses, and a browser's jar would keep a host-only cookie per address.
#[derive(Clone)]
struct Visitor {
    client: reqwest::Client,
    cookie: std::sync::Arc<Mutex<Option<String>>>,
}

impl Visitor {
    fn new() -> Visitor {
        Visitor {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            cookie: Default::default(),
        }
    }

    /// GET `http://{addr}{path}`, following the app's redirects on the same address.
    async fn get(&self, addr: &str, path: &str) -> reqwest::Result<reqwest::Response> {
        let mut path = path.to_string();
        loop {
            let mut req = self.client.get(format!("http://{addr}{path}"));
            let cookie = self.cookie.lock().unwrap().clone();
            if let Some(c) = cookie {
                req = req.header("cookie", c);
            }
            let resp = req.send().await?;
            for set in resp.headers().get_all("set-cookie") {
                let set = set.to_str().unwrap();
                let pair = set.split(';').next().unwrap().to_string();
                *self.cookie.lock().unwrap() = (!set.contains("Max-Age=0")).then_some(pair);
            }
            match resp.headers().get("location") {
                Some(to) if resp.status().is_redirection() => {
                    path = to.to_str().unwrap().to_string();
                }
                _ => return Ok(resp),
            }
        }
    }

    async fn page(&self, addr: &str, path: &str) -> String {
        let resp = self.get(addr, path).await.unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.text().await.unwrap()
    }
}

/// Waits until `addr` answers `/` (any status), up to 30 s.
async fn wait_serving(addr: &str) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let start = Instant::now();
    while client
        .get(format!("http://{addr}/healthz-probe"))
        .send()
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{addr} does not answer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn health(container: &str) -> String {
    ok(docker().args(["inspect", "-f", "{{.State.Health.Status}}", container]))
}

/// The image's own health check, run in the container by hand.
fn healthcheck(container: &str) -> Output {
    run(docker().args([
        "exec",
        container,
        "session-sidecar",
        "healthcheck",
        "--config",
        "/etc/session-sidecar/sidecar.toml",
    ]))
}

fn wait_health(container: &str, want: &str, within: Duration) {
    let start = Instant::now();
    loop {
        let now = health(container);
        if now == want {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{container} is {now}, not {want}, after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The visit count on the example app's home page.
async fn visit(visitor: &Visitor, addr: &str) -> Result<u64, String> {
    let resp = visitor.get(addr, "/").await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    let n = body
        .split("You have visited this page ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no count in {body}"))?;
    Ok(n)
}

#[tokio::test]
async fn the_visit_counter_counts_through_the_container_on_a_read_only_root_as_non_root() {
    let Some(_engine) = engine().await else {
        return;
    };
    let p = Project::up("sled");
    let sidecar = p.container("sidecar");
    let addr = p.addr("sidecar", "default");
    wait_serving(&addr).await;

    let client = Visitor::new();
    for want in 1..=3 {
        assert_eq!(visit(&client, &addr).await.unwrap(), want);
    }
    // The cookie is signed with the secret the compose file made (key, '=', then the MAC).
    let resp = Visitor::new().get(&addr, "/").await.unwrap();
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("sessionid="), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");

    let facts = ok(docker().args([
        "inspect",
        "-f",
        "{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}",
        &sidecar,
    ]));
    assert_eq!(facts, "true sidecar");
    let uid = ok(docker().args(["exec", &sidecar, "id", "-u"]));
    assert_eq!(uid, "10001");
    let write = run(docker().args(["exec", &sidecar, "touch", "/usr/local/bin/x"]));
    assert!(!write.status.success(), "the root file system is writable");
    let write = run(docker().args(["exec", &sidecar, "touch", "/tmp/x"]));
    assert!(!write.status.success(), "/tmp is writable");
    // The session data is on the volume.
    let files = ok(docker().args(["exec", &sidecar, "ls", "/data/sessions"]));
    assert!(files.contains("db"), "{files}");
    wait_health(&sidecar, "healthy", Duration::from_secs(40));
}

/// Several visitors count while the sidecar container is killed (SIGKILL) and then restarted:
/// a count the visitor saw acknowledged is never lost. The request in flight at the kill may
/// or may not have been written; the next count is the acknowledged one plus 1 or 2.
#[tokio::test]
async fn sigkill_and_restart_of_the_container_lose_no_acknowledged_change() {
    let Some(_engine) = engine().await else {
        return;
    };
    let p = Project::up("sled");
    let sidecar = p.container("sidecar");
    let addr = p.addr("sidecar", "default");
    wait_serving(&addr).await;

    let visitors: Vec<Visitor> = (0..4).map(|_| Visitor::new()).collect();
    let mut acked = vec![0u64; visitors.len()];
    for (client, seen) in visitors.iter().zip(acked.iter_mut()) {
        *seen = visit(client, &addr).await.unwrap();
    }
    for how in ["kill", "restart", "kill", "restart"] {
        // Traffic right up to the moment of the kill.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (client, seen) in visitors.iter().zip(acked.iter()) {
            let (client, addr, stop, mut seen) =
                (client.clone(), addr.clone(), stop.clone(), *seen);
            tasks.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match visit(&client, &addr).await {
                        Ok(n) => {
                            assert!(n == seen + 1, "count {n} after acknowledged {seen}");
                            seen = n;
                        }
                        Err(_) => break,
                    }
                }
                seen
            }));
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        match how {
            "kill" => {
                ok(docker().args(["kill", "-s", "KILL", &sidecar]));
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                ok(docker().args(["start", &sidecar]));
            }
            _ => {
                ok(docker().args(["restart", "-t", "10", &sidecar]));
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        for (task, seen) in tasks.into_iter().zip(acked.iter_mut()) {
            *seen = task.await.unwrap();
        }
        wait_serving(&addr).await;
        for (client, seen) in visitors.iter().zip(acked.iter_mut()) {
            let n = visit(client, &addr).await.unwrap();
            assert!(
                n == *seen + 1 || (how == "kill" && n == *seen + 2),
                "after {how}: count {n}, acknowledged {seen}"
            );
            *seen = n;
        }
    }
    assert!(
        acked.iter().all(|&n| n > 5),
        "too little traffic: {acked:?}"
    );
}

/// `docker stop` sends SIGTERM: requests in flight finish (with their session changes written),
/// new ones are refused, and the container exits 0.
#[tokio::test]
async fn docker_stop_drains_requests_in_flight_and_exits_zero() {
    let Some(_engine) = engine().await else {
        return;
    };
    let p = Project::up("sled");
    let sidecar = p.container("sidecar");
    let addr = p.addr("sidecar", "default");
    wait_serving(&addr).await;

    let visitors: Vec<Visitor> = (0..3).map(|_| Visitor::new()).collect();
    for v in &visitors {
        visit(v, &addr).await.unwrap();
    }
    let slow: Vec<_> = visitors
        .iter()
        .map(|v| {
            let (v, addr) = (v.clone(), addr.clone());
            tokio::spawn(async move {
                let resp = v.get(&addr, "/slow?seconds=2").await.unwrap();
                (resp.status().as_u16(), resp.text().await.unwrap())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = Instant::now();
    ok(docker().args(["stop", "-t", "30", &sidecar]));
    let took = stopping.elapsed();
    for task in slow {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("Answered after 2"), "{body}");
    }
    assert!(
        took >= Duration::from_millis(1000),
        "stopped in {took:?}, before the requests in flight could finish"
    );
    let code = ok(docker().args(["inspect", "-f", "{{.State.ExitCode}}", &sidecar]));
    assert_eq!(code, "0");
    assert!(
        p.logs("sidecar").contains("stopped cleanly"),
        "{}",
        p.logs("sidecar")
    );

    // What the slow requests saved is there after the restart.
    ok(docker().args(["start", &sidecar]));
    wait_serving(&addr).await;
    for v in &visitors {
        let body = v.page(&addr, "/slow?seconds=0").await;
        assert!(body.contains("slow pages so far: 2."), "{body}");
        assert_eq!(visit(v, &addr).await.unwrap(), 2);
    }
}

/// The image's HEALTHCHECK reports the store. With the data volume full, visitors' writes fail
/// closed (503, nothing claimed as saved), /readyz's probe write fails too, and the container
/// turns unhealthy; before this, a readiness probe that only read stayed "healthy" on a dead
/// disk. (sled keeps an I/O error once it has one: the container stays unhealthy until it is
/// restarted, which is what an orchestrator does with it.)
#[tokio::test]
async fn the_health_check_turns_unhealthy_when_the_store_is_unusable() {
    let Some(_engine) = engine().await else {
        return;
    };
    let tag = format!("sstest{}-health", std::process::id());
    let (net, app, sidecar) = (tag.clone(), format!("{tag}-app"), format!("{tag}-sidecar"));
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let (net, app, sidecar) = (
                &self.0,
                format!("{}-app", self.0),
                format!("{}-sidecar", self.0),
            );
            let _ = docker().args(["rm", "-f", &app, &sidecar]).output();
            let _ = docker().args(["network", "rm", net]).output();
        }
    }
    let _gone = Gone(tag.clone());
    ok(docker().args(["network", "create", &net]));
    ok(docker().args([
        "run",
        "-d",
        "--name",
        &app,
        "--network",
        &net,
        "session-sidecar-example",
    ]));
    ok(docker().args([
        "run",
        "-d",
        "--name",
        &sidecar,
        "--network",
        &net,
        "--read-only",
        "--tmpfs",
        "/data:size=8m,uid=10001,gid=10001,mode=0700",
        "--health-interval",
        "1s",
        "--health-retries",
        "2",
        "-e",
        &format!("SESSION_SIDECAR_UPSTREAM=http://{app}:8000"),
        "session-sidecar",
    ]));
    wait_health(&sidecar, "healthy", Duration::from_secs(30));
    let ip = ok(docker().args([
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
        &sidecar,
    ]));
    let addr = format!("{ip}:8080");
    let counting = Visitor::new();
    assert_eq!(visit(&counting, &addr).await.unwrap(), 1);

    // Fill the volume (as root: the sidecar's own user could not make this file).
    let _ = run(docker().args([
        "exec",
        "-u",
        "0",
        &sidecar,
        "sh",
        "-c",
        "cat /dev/zero > /data/fill",
    ]));
    let mut refused = 0;
    for _ in 0..500 {
        let v = Visitor::new();
        let resp = v.get(&addr, "/").await.unwrap();
        match resp.status().as_u16() {
            200 => {}
            503 => refused += 1,
            other => panic!("status {other} on a full volume"),
        }
        if refused >= 5 {
            break;
        }
    }
    assert!(refused >= 5, "writes never failed on a full volume");
    wait_health(&sidecar, "unhealthy", Duration::from_secs(30));
    let probe = healthcheck(&sidecar);
    assert!(!probe.status.success());
    let said = String::from_utf8_lossy(&probe.stderr);
    assert!(said.contains("503"), "{said}");
}

#[tokio::test]
async fn a_session_made_through_one_sidecar_works_through_the_other_and_the_balancer() {
    let Some(_engine) = engine().await else {
        return;
    };
    let p = Project::up("redis");
    let (one, two, lb) = (
        p.addr("sidecar-1", "front"),
        p.addr("sidecar-2", "front"),
        p.addr("lb", "front"),
    );
    for a in [&one, &two, &lb] {
        wait_serving(a).await;
    }
    let client = Visitor::new();
    assert_eq!(visit(&client, &one).await.unwrap(), 1);
    assert_eq!(visit(&client, &two).await.unwrap(), 2);
    assert_eq!(visit(&client, &one).await.unwrap(), 3);
    // Through the balancer the requests alternate between the pairs, and count on.
    let mut served_by = std::collections::HashSet::new();
    for want in 4..=9 {
        let resp = client.get(&lb, "/").await.unwrap();
        served_by.insert(resp.headers()["x-served-by"].to_str().unwrap().to_string());
        let body = resp.text().await.unwrap();
        assert!(
            body.contains(&format!("visited this page {want} times")),
            "{body}"
        );
    }
    assert_eq!(served_by.len(), 2, "the balancer used one pair only");

    // Login through one, logout through the other: the logout holds everywhere.
    let home = client.page(&one, "/login?user=ann").await;
    assert!(home.contains("logged in as <b>ann</b>"), "{home}");
    let cart = client.page(&two, "/cart").await;
    assert!(cart.contains("logged in as <b>ann</b>"), "{cart}");
    let home = client.page(&two, "/logout").await;
    assert!(home.contains("You are logged out."), "{home}");
    let cart = client.page(&one, "/cart").await;
    assert!(!cart.contains("logged in as"), "{cart}");
}

/// One sidecar container is killed under traffic through the balancer: the visitors go on
/// through the other, and no acknowledged count is lost (the sessions live in Redis).
#[tokio::test]
async fn killing_one_sidecar_container_loses_nothing() {
    let Some(_engine) = engine().await else {
        return;
    };
    let p = Project::up("redis");
    let lb = p.addr("lb", "front");
    for s in ["sidecar-1", "sidecar-2"] {
        wait_serving(&p.addr(s, "front")).await;
    }
    wait_serving(&lb).await;
    let visitors: Vec<Visitor> = (0..4).map(|_| Visitor::new()).collect();
    let mut acked = vec![0u64; visitors.len()];
    let mut refused = 0;
    let started = Instant::now();
    let mut killed = false;
    while started.elapsed() < Duration::from_secs(4) {
        if !killed && started.elapsed() > Duration::from_secs(1) {
            ok(docker().args(["kill", "-s", "KILL", &p.container("sidecar-1")]));
            killed = true;
        }
        for (client, seen) in visitors.iter().zip(acked.iter_mut()) {
            match visit(client, &lb).await {
                Ok(n) => {
                    // A request the balancer retried on the other sidecar may have been
                    // written once already by the killed one: +2 is possible, never less.
                    assert!(
                        n == *seen + 1 || n == *seen + 2,
                        "count {n} after acknowledged {seen}"
                    );
                    *seen = n;
                }
                Err(_) => refused += 1,
            }
        }
    }
    assert!(killed);
    eprintln!("killing one sidecar: {refused} requests failed, counts {acked:?}");
    // After the kill everything goes through sidecar-2, and counts on.
    for (client, seen) in visitors.iter().zip(acked.iter()) {
        assert_eq!(visit(client, &lb).await.unwrap(), seen + 1);
    }
    assert!(
        refused <= visitors.len(),
        "{refused} requests failed: more than the ones in flight at the kill"
    );
}

/// `docker network disconnect` cuts the sidecars off from Redis: each answers 503 within the
/// command timeout (2 s in the compose file), reports unready, and serves again once reconnected,
/// with the sessions as they were.
#[tokio::test]
async fn cut_off_from_redis_the_sidecars_answer_503_within_the_timeout_and_recover() {
    let Some(_engine) = engine().await else {
        return;
    };
    let p = Project::up("redis");
    let sidecars = ["sidecar-1", "sidecar-2"];
    let addrs: Vec<String> = sidecars.iter().map(|s| p.addr(s, "front")).collect();
    for a in &addrs {
        wait_serving(a).await;
    }
    let client = Visitor::new();
    assert_eq!(visit(&client, &addrs[0]).await.unwrap(), 1);
    assert_eq!(visit(&client, &addrs[1]).await.unwrap(), 2);

    let store = format!("{}_store", p.name);
    for s in sidecars {
        ok(docker().args(["network", "disconnect", &store, &p.container(s)]));
    }
    for a in &addrs {
        let start = Instant::now();
        let resp = client.get(a, "/").await.unwrap();
        let took = start.elapsed();
        assert_eq!(resp.status(), 503, "{}", resp.text().await.unwrap());
        assert!(
            took < Duration::from_millis(2900),
            "503 after {took:?}, command_timeout is 2 s"
        );
    }
    let probe = healthcheck(&p.container("sidecar-1"));
    assert!(!probe.status.success(), "ready while cut off from Redis");

    for s in sidecars {
        ok(docker().args(["network", "connect", &store, &p.container(s)]));
    }
    let start = Instant::now();
    let mut next = 3;
    for a in addrs.iter().cycle().take(4) {
        loop {
            match visit(&client, a).await {
                Ok(n) => {
                    assert_eq!(n, next, "the session changed while cut off");
                    next += 1;
                    break;
                }
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(30),
                        "{a} did not recover: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    eprintln!("recovered {:?} after reconnecting", start.elapsed());
}
