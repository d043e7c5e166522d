//! A real `redis-server` per test, and what the Sentinel set and the cluster share: starting a
//! node, talking to it through `redis-cli`, reading what it holds.

use std::time::Duration;

use super::apps::{Killed, free_port};

/// Says why a test that needs Redis (or iptables) does not run, and passes; with
/// `SIDECAR_REQUIRE_REDIS=1` (set by CI) it fails instead: a missing install step must not
/// turn the Redis, Sentinel, Cluster and partition tests green by skipping them.
pub fn skipped(why: &str) {
    assert!(
        std::env::var_os("SIDECAR_REQUIRE_REDIS").is_none(),
        "SIDECAR_REQUIRE_REDIS is set and {why}"
    );
    eprintln!("SKIPPED: {why}");
}

/// A real `redis-server` on a free port with a temporary directory and no persistence, stopped
/// when dropped. `None` (with a message saying why) when redis-server is not installed.
pub struct RedisServer {
    pub port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Option<RedisServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        RedisServer::start_on(port)
    }

    /// On a given port, e.g. to bring a stopped server back.
    pub fn start_on(port: u16) -> Option<RedisServer> {
        RedisServer::start_with(port, None)
    }

    /// Holding what `dump` (an RDB file) holds, on a free port.
    pub fn start_from_dump(dump: &std::path::Path) -> Option<RedisServer> {
        RedisServer::start_with(free_port(), Some(dump))
    }

    /// The server's directory (its `dump.rdb` after a `SAVE`).
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    fn start_with(port: u16, dump: Option<&std::path::Path>) -> Option<RedisServer> {
        let dir = tempfile::tempdir().unwrap();
        if let Some(dump) = dump {
            std::fs::copy(dump, dir.path().join("dump.rdb")).unwrap();
        }
        let child = match std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                skipped(&format!(
                    "redis-server is not installed ({e}); `apt-get install redis-server` runs these tests"
                ));
                return None;
            }
        };
        let server = RedisServer {
            port,
            child,
            _dir: dir,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start on {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `[store]` lines for a sidecar on this server, under its own key prefix.
    pub fn store_toml(&self, prefix: &str) -> String {
        format!(
            "[store]\nbackend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\ncommand_timeout = 2\n",
            self.url()
        )
    }

    /// Blocks the server for `secs` seconds (`DEBUG SLEEP` through redis-cli), as an overloaded
    /// Redis would be. Returns once the server is asleep.
    pub fn stall(&self, secs: f64) {
        let mut cli = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &self.port.to_string(),
                "DEBUG",
                "SLEEP",
                &secs.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-cli comes with redis-server");
        std::thread::spawn(move || cli.wait());
        // Wait until a PING no longer answers within 100 ms.
        for _ in 0..100 {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
            c.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            c.write_all(b"PING\r\n").unwrap();
            let mut buf = [0u8; 16];
            if c.read(&mut buf).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("redis did not stall");
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free port for a cluster node: its cluster bus port (port + 10000) must exist and be free
/// too, or redis-server exits at start.
pub fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// Replicated Redis set-ups (a Sentinel set, a cluster) run one at a time within a test binary:
/// each is half a dozen processes whose failovers and timeouts the tests measure, and two cores
/// shared by several of them make those figures, and the set-up itself, unreliable.
pub(super) fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn redis_process(program: &str, args: &[String]) -> Option<Killed> {
    match std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(child) => Some(Killed(child)),
        Err(e) => {
            skipped(&format!(
                "{program} is not installed ({e}); `apt-get install redis-server redis-sentinel` runs these tests"
            ));
            None
        }
    }
}

/// A redis-server on 127.0.0.1:`port` with its own directory under `dir`, no persistence, and
/// `extra` arguments.
pub(super) fn redis_node(dir: &std::path::Path, port: u16, extra: &[&str]) -> Option<Killed> {
    let data = dir.join(format!("redis-{port}"));
    std::fs::create_dir_all(&data).unwrap();
    let port = port.to_string();
    let data = data.display().to_string();
    let mut args = vec![
        "--port",
        &port,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &data,
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    redis_process("redis-server", &args)
}

pub(super) fn wait_port(port: u16) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing listens on {port}");
}

/// Sends one command to 127.0.0.1:`port` through redis-cli and returns its output.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli comes with redis-server");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every key name under `prefix` on each of `ports`, with its value as text (a set as its
/// members), as `redis-cli` shows them.
pub fn redis_contents(ports: &[u16], prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for &port in ports {
        let names = redis_cli(port, &["--scan", "--pattern", &format!("{prefix}*")]);
        for name in names.lines().filter(|n| !n.is_empty()) {
            let value = match redis_cli(port, &["TYPE", name]).as_str() {
                "set" => redis_cli(port, &["SMEMBERS", name]),
                "none" => continue,
                _ => redis_cli(port, &["GET", name]),
            };
            out.push((name.to_string(), value));
        }
    }
    out
}

/// Which of `names` (session keys, subjects) appears in `bytes`, if any: what a reader of the
/// store or a backup would learn.
pub fn named_in<'a>(bytes: &[u8], names: &'a [String]) -> Option<&'a str> {
    names
        .iter()
        .find(|n| bytes.windows(n.len()).any(|w| w == n.as_bytes()))
        .map(String::as_str)
}
