//! The real binary, started as operators start it, its log kept for the test to read.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_session-sidecar");

pub struct Proc {
    pub child: Child,
    pub addr: std::net::SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl Proc {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A GET of `path` through this sidecar with `client`, as `Sidecar::get`.
    pub fn get(&self, client: &reqwest::Client, path: &str) -> super::Visit {
        super::get(client, self.url(path))
    }
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (up to 20 s) until the log holds `needle` `count` times; panics otherwise.
    pub async fn await_log(&self, needle: &str, count: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.log().matches(needle).count() < count {
            assert!(
                std::time::Instant::now() < deadline,
                "no {count}th {needle:?} in the log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn wait(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let log = self.log.lock().unwrap().clone();
        (status, log)
    }
}

/// A test that fails before it stops its sidecar leaves no process behind.
impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn write_config(dir: &Path, app: std::net::SocketAddr, extra: &str) -> std::path::PathBuf {
    let path = dir.join("sidecar.toml");
    let text = format!(
        "listen = \"127.0.0.1:0\"\nupstream = \"http://{app}\"\n{extra}\n[store]\npath = {:?}\n[admin]\nlisten = \"\"\n",
        dir.join("sessions").display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A config in `dir` with the admin listener described by `admin` (lines of the `[admin]` table).
pub fn write_admin_config(
    dir: &Path,
    app: std::net::SocketAddr,
    admin: &str,
) -> std::path::PathBuf {
    let path = dir.join("sidecar.toml");
    let text = format!(
        "listen = \"127.0.0.1:0\"\nupstream = \"http://{app}\"\n[store]\npath = {:?}\n[admin]\n{admin}\n",
        dir.join("sessions").display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the binary and waits for its "serving" log line to learn the port.
pub fn start(config: &Path) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(["--config", config.to_str().unwrap()]);
    start_with(cmd)
}

pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

pub fn start_with(mut cmd: Command) -> Proc {
    // Info unless the caller set or removed RUST_LOG.
    if !cmd.get_envs().any(|(name, _)| name == "RUST_LOG") {
        cmd.env("RUST_LOG", "info");
    }
    let mut child = cmd
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listen=").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap().to_string());
            } else if let Some(rest) = line.split("\"listen\":\"").nth(1) {
                let _ = tx.send(rest.split('"').next().unwrap().to_string());
            }
            log2.lock().unwrap().push_str(&line);
            log2.lock().unwrap().push('\n');
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).expect("started");
    Proc {
        child,
        addr: addr.parse().unwrap(),
        log,
    }
}
