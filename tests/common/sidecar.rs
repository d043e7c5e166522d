//! The sidecar under test, in-process: `run_with_admin` on 127.0.0.1:0 in front of an app, on a
//! temporary sled store (or the one a test names), watched by `Faulty`, with a clock the
//! test moves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use session_sidecar::session::testing::{self, Store};
use session_sidecar::session::{ManualClock, Millis, StoreError};
use session_sidecar::{Config, Deps};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::apps::{echo, start_app};
use super::client::{Visit, get};
use super::faulty::Faulty;

/// A running sidecar in front of an app.
pub struct Sidecar {
    pub addr: SocketAddr,
    pub app: SocketAddr,
    pub clock: Arc<ManualClock>,
    /// The admin listener (always on in tests, on a free port).
    pub admin: SocketAddr,
    pub store: Arc<dyn Store>,
    pub faulty: Arc<Faulty>,
    /// Owns the temporary directory when the sidecar made it.
    pub dir: Option<tempfile::TempDir>,
    pub path: std::path::PathBuf,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), session_sidecar::RunError>>>,
}

impl Sidecar {
    pub fn now(&self) -> Millis {
        session_sidecar::session::Clock::now(&*self.clock)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A GET of `path` through this sidecar with `client` (a `browser()` or `plain()`).
    pub fn get(&self, client: &reqwest::Client, path: &str) -> Visit {
        get(client, self.url(path))
    }

    pub fn request(&self, client: &reqwest::Client, method: reqwest::Method, path: &str) -> Visit {
        Visit(client.request(method, self.url(path)))
    }

    /// SIGTERM, as far as `run` is concerned: stop and wait for the drain. The store is closed
    /// once this returns (the temporary directory, if any, is handed back).
    pub async fn stop(
        mut self,
    ) -> (
        Result<(), session_sidecar::RunError>,
        Option<tempfile::TempDir>,
    ) {
        let _ = self.stop.take().unwrap().send(());
        let result = self.task.take().unwrap().await.unwrap();
        let dir = self.dir.take();
        drop(self);
        (result, dir)
    }
}

/// A sidecar in front of the echo app, with extra TOML lines.
pub async fn sidecar(extra: &str) -> Sidecar {
    let app = start_app(echo).await;
    sidecar_for(app, extra).await
}

pub async fn sidecar_for(app: SocketAddr, extra: &str) -> Sidecar {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sidecar_at(app, extra, dir.path()).await;
    s.dir = Some(dir);
    s
}

/// A sidecar on an existing store directory (a restart).
pub async fn sidecar_at(app: SocketAddr, extra: &str, dir: &std::path::Path) -> Sidecar {
    let (top, tables) = split_extra(extra);
    let text = format!(
        "{upstream}listen = \"127.0.0.1:0\"\n{timeout}{top}\n{store}{admin}{tables}",
        upstream = if top.contains("upstream = ") {
            String::new()
        } else {
            format!("upstream = \"http://{app}\"\n")
        },
        admin = if tables.contains("[admin]") {
            ""
        } else {
            "[admin]\nlisten = \"\"\n"
        },
        store = if tables.contains("[store]") {
            String::new()
        } else {
            format!(
                "[store]\npath = {:?}\n",
                dir.join("sessions").display().to_string()
            )
        },
        timeout = if top.contains("upstream_timeout") {
            ""
        } else {
            "upstream_timeout = 5\n"
        },
    );
    let config = Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    // A sidecar stopped in this process may still be letting go of the directory lock.
    let mut tries = 0;
    let deps = loop {
        match Deps::open(&config).await {
            Ok(d) => break d,
            Err(StoreError::Locked { .. }) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let clock = ManualClock::starting_now();
    let faulty = Arc::new(Faulty {
        failing: AtomicBool::new(false),
    });
    let storage = deps.store.watched(faulty.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let store = testing::store_of(&storage);
    let deps = Deps {
        store: storage,
        clock: clock.clone(),
    };
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let task = tokio::spawn(session_sidecar::run_with_admin(
        config,
        listener,
        Some(admin),
        async {
            let _ = rx.await;
        },
        deps,
        None,
    ));
    Sidecar {
        addr,
        app,
        clock,
        admin: admin_addr,
        store,
        faulty,
        dir: None,
        path: dir.to_path_buf(),
        stop: Some(tx),
        task: Some(task),
    }
}

/// Extra TOML may carry top-level keys and tables; `[store]`/`[admin]` lines are merged.
fn split_extra(extra: &str) -> (String, String) {
    let mut top = String::new();
    let mut tables = String::new();
    let mut in_table = false;
    for line in extra.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_table = true;
        }
        if in_table {
            tables.push_str(line);
            tables.push('\n');
        } else {
            top.push_str(line);
            top.push('\n');
        }
    }
    (top, tables)
}

/// sled's background threads may hold the database (and its file lock) a moment after the
/// last handle is dropped; opening it again before then fails with Locked. Wait until the
/// lock sled takes (flock on the `db` file) is free.
pub fn sled_lets_go(path: &std::path::Path) {
    let db_file = path.join("db");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let file = std::fs::File::open(&db_file).unwrap();
        match file.try_lock() {
            Ok(()) => return,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("sled still holds {}: {e}", db_file.display()),
        }
    }
}
