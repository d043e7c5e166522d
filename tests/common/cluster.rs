//! A Redis Cluster of three masters, with replicas when a test asks for them.

use std::time::Duration;

use super::apps::Killed;
use super::redis::{free_cluster_port, one_at_a_time, redis_cli, redis_node, wait_port};

/// A Redis Cluster of three masters (slots spread by `redis-cli --cluster create`), on loopback
/// ports of its own. `None` (saying why) when redis-server is not installed.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _nodes: Vec<Killed>,
    _dir: tempfile::TempDir,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl RedisCluster {
    /// Three masters.
    pub fn start() -> Option<RedisCluster> {
        RedisCluster::start_with_replicas(0)
    }

    /// Three masters, each with `replicas` replicas (`redis-cli --cluster create` assigns them).
    pub fn start_with_replicas(replicas: usize) -> Option<RedisCluster> {
        let turn = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3 * (1 + replicas))
            .map(|_| free_cluster_port())
            .collect();
        let mut nodes = Vec::new();
        for &port in &ports {
            let cluster = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ];
            nodes.push(redis_node(dir.path(), port, &cluster)?);
            wait_port(port);
        }
        let mut create = std::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for p in &ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli comes with redis-server");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let linked = |p: u16| {
            let info = redis_cli(p, &["INFO", "replication"]);
            !info.contains("role:slave") || info.contains("master_link_status:up")
        };
        while !ports
            .iter()
            .all(|&p| redis_cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok") && linked(p))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(RedisCluster {
            ports,
            _nodes: nodes,
            _dir: dir,
            _turn: turn,
        })
    }

    /// `[store]` lines for a sidecar on this cluster, under its own key prefix.
    pub fn store_toml(&self, prefix: &str) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        format!(
            "[store]\nbackend = \"redis\"\ncluster_nodes = {nodes:?}\nkey_prefix = \"{prefix}\"\ncommand_timeout = 2\n"
        )
    }

    /// The nodes that are replicas now, with their processes.
    pub fn replicas(&self) -> Vec<(u16, u32)> {
        self.ports
            .iter()
            .zip(&self._nodes)
            .filter(|&(&p, _)| redis_cli(p, &["INFO", "replication"]).contains("role:slave"))
            .map(|(&p, node)| (p, node.0.id()))
            .collect()
    }

    /// The port of the master serving `key`'s slot now.
    pub fn master_of(&self, key: &str) -> u16 {
        let slot: u16 = redis_cli(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .parse()
            .unwrap();
        let serves = |port: u16| {
            let nodes = redis_cli(port, &["CLUSTER", "NODES"]);
            let me = nodes
                .lines()
                .find(|l| l.contains("myself"))
                .unwrap()
                .to_string();
            me.contains("master")
                && me.split_whitespace().skip(8).any(|range| {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
                })
        };
        *self.ports.iter().find(|&&p| serves(p)).unwrap()
    }

    /// The replicas (port, pid) of the master on `master`.
    pub fn replicas_of(&self, master: u16) -> Vec<(u16, u32)> {
        let link = format!("master_port:{master}");
        self.replicas()
            .into_iter()
            .filter(|&(p, _)| redis_cli(p, &["INFO", "replication"]).contains(&link))
            .collect()
    }

    /// Keys held by each node.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.ports
            .iter()
            .map(|&p| redis_cli(p, &["DBSIZE"]).parse().unwrap())
            .collect()
    }
}
