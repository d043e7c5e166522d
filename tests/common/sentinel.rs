//! Redis with Sentinel as production runs it: a master, two replicas, three sentinels.

use std::time::Duration;

use super::apps::{Killed, free_port};
use super::redis::{one_at_a_time, redis_cli, redis_node, redis_process, wait_port};

/// A Redis master, two replicas and three sentinels watching them (quorum 2), all on loopback
/// ports of their own, as production runs Redis with Sentinel. `None` (saying why) when
/// redis-server or redis-sentinel is not installed.
pub struct SentinelSet {
    pub master_port: u16,
    pub replica_ports: Vec<u16>,
    pub sentinel_ports: Vec<u16>,
    pub master: Option<Killed>,
    pub replicas: Vec<Killed>,
    sentinels: Vec<Killed>,
    dir: tempfile::TempDir,
    _turn: std::sync::MutexGuard<'static, ()>,
}

pub const MASTER_NAME: &str = "sessions";

impl SentinelSet {
    pub fn start() -> Option<SentinelSet> {
        SentinelSet::start_with_sentinels_as(None)
    }

    /// With `uid`, the sentinels run as that user and group id (`setpriv`), so that a firewall
    /// rule on the socket owner can cut them, and only them, off from a server.
    pub fn start_with_sentinels_as(uid: Option<u32>) -> Option<SentinelSet> {
        let turn = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        if uid.is_some() {
            // The sentinels rewrite their configuration files.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let master_port = free_port();
        let replica_ports = vec![free_port(), free_port()];
        let server = |port: u16, extra: &[&str]| redis_node(dir.path(), port, extra);
        let master = server(master_port, &[])?;
        wait_port(master_port);
        let mut replicas = Vec::new();
        for &port in &replica_ports {
            replicas.push(server(
                port,
                &["--replicaof", "127.0.0.1", &master_port.to_string()],
            )?);
            wait_port(port);
        }
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 4000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    dir.path().display()
                ),
            )
            .unwrap();
            let conf = conf.display().to_string();
            sentinels.push(match uid {
                None => redis_process("redis-sentinel", &[conf])?,
                Some(uid) => {
                    std::process::Command::new("chown")
                        .args([format!("{uid}:{uid}"), conf.clone()])
                        .status()
                        .unwrap();
                    let args = [
                        format!("--reuid={uid}"),
                        format!("--regid={uid}"),
                        "--clear-groups".into(),
                        "redis-sentinel".into(),
                        conf,
                    ];
                    redis_process("setpriv", &args)?
                }
            });
            wait_port(port);
            sentinel_ports.push(port);
        }
        let set = SentinelSet {
            master_port,
            replica_ports,
            sentinel_ports,
            master: Some(master),
            replicas,
            sentinels,
            dir,
            _turn: turn,
        };
        set.wait_until_ready();
        Some(set)
    }

    /// Until the replicas are in sync and every sentinel knows them and the other two: the state
    /// in which a failover can happen.
    fn wait_until_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let synced = self
                .replica_ports
                .iter()
                .all(|&p| redis_cli(p, &["INFO", "replication"]).contains("master_link_status:up"));
            let known = self.sentinel_ports.iter().all(|&p| {
                let info = redis_cli(p, &["SENTINEL", "MASTER", MASTER_NAME]);
                let field = |name: &str| {
                    let lines: Vec<&str> = info.lines().collect();
                    lines
                        .iter()
                        .position(|l| *l == name)
                        .and_then(|i| lines.get(i + 1))
                        .map(|v| v.to_string())
                };
                field("num-slaves").as_deref() == Some("2")
                    && field("num-other-sentinels").as_deref() == Some("2")
            });
            if synced && known {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the sentinels did not learn the replica and each other"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `[store]` lines for a sidecar that finds the master through the sentinels.
    pub fn store_toml(&self, prefix: &str) -> String {
        let sentinels: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        format!(
            "[store]\nbackend = \"redis\"\nsentinels = {sentinels:?}\nmaster_name = \"{MASTER_NAME}\"\n\
             key_prefix = \"{prefix}\"\ncommand_timeout = 2\nconnect_timeout = 2\n"
        )
    }

    /// The port of the server the sentinels name as master now.
    pub fn current_master(&self) -> u16 {
        let out = redis_cli(
            self.sentinel_ports[0],
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
        );
        out.lines().nth(1).unwrap().parse().unwrap()
    }

    /// SIGKILLs the master, as a crashed host would leave it.
    pub fn kill_master(&mut self) {
        self.master.take();
    }
}
