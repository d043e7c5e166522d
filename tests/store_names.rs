//! docs/HEADERS.md "What the store holds": after a random run of sessions created, changed,
//! tagged, cycled, flushed and revoked, no byte the store holds — sled's files; Redis key names,
//! values and its dump, on one server, behind Sentinel and on a cluster, sealed or not — holds a
//! session key or a subject the run used. Whoever reads the store or a backup of it can neither
//! present a working cookie nor list who is logged in. `STORE_NAMES_STEPS=N` runs longer.

mod common;

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use session_sidecar::Config;
use session_sidecar::session::changes::{Change, Op};
use session_sidecar::session::testing::{Lookup, Store, Update, Updated, store_of};
use session_sidecar::session::{Clock, Millis, SystemClock, id};

const SECRET: &str = "an operator's secret of thirty-two bytes or more";

fn steps() -> usize {
    std::env::var("STORE_NAMES_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

/// Every key and subject a run used.
#[derive(Default)]
struct Used(Vec<String>);

impl Used {
    fn in_bytes(&self, bytes: &[u8]) -> Option<&str> {
        common::named_in(bytes, &self.0)
    }
}

/// A random run through the store's whole API; returns what it used.
async fn run(store: &Arc<dyn Store>, seed: u64) -> Used {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut used = Used::default();
    let mut live: Vec<String> = Vec::new();
    let subjects: Vec<String> = (0..4)
        .map(|i| format!("subject-{i}-{}", &id::generate()[..12]))
        .collect();
    used.0.extend(subjects.iter().cloned());
    let now: Millis = SystemClock.now();
    for step in 0..steps() {
        let subject = || Some(subjects[step % subjects.len()].clone());
        let n = json!(step);
        match (rng.gen_range(0..8), live.is_empty()) {
            (0 | 1, _) | (_, true) => {
                let key = id::generate();
                used.0.push(key.clone());
                let mut record = session_sidecar::session::Record::new(now);
                record.data.insert("n".into(), n);
                record.subject = rng.gen_bool(0.5).then(subject).flatten();
                record.deadline = now + 3_600_000;
                assert!(store.create(&key, &record).await.unwrap());
                live.push(key);
            }
            (2 | 3, _) => {
                let key = &live[rng.gen_range(0..live.len())];
                let change = Change {
                    ops: vec![Op::Set("n".into(), n)],
                    subject: rng
                        .gen_bool(0.4)
                        .then(|| subject().filter(|_| rng.gen_bool(0.8))),
                    ..Change::default()
                };
                store.update(Update::new(key, &change, now)).await.unwrap();
            }
            (4, _) => {
                let i = rng.gen_range(0..live.len());
                let next = id::generate();
                used.0.push(next.clone());
                let change = Change {
                    cycle: true,
                    subject: Some(subject()),
                    ..Change::default()
                };
                let out = store
                    .update(Update::new(&live[i], &change, now).cycle_to(&next))
                    .await
                    .unwrap();
                if let Updated::Saved { key, .. } = out {
                    live[i] = key;
                }
            }
            (5, _) => {
                let key = live.swap_remove(rng.gen_range(0..live.len()));
                // Ended already when an operator revoked its subject's sessions.
                if store.retire(&key, now).await.unwrap() {
                    assert_eq!(store.lookup(&key, now).await.unwrap(), Lookup::Retired);
                }
            }
            (6, _) => {
                let s = &subjects[rng.gen_range(0..subjects.len())];
                for (cell, _) in store.subject_sessions(s, now).await.unwrap() {
                    store.remove_stored(&cell).await.unwrap();
                }
            }
            _ => {
                let key = &live[rng.gen_range(0..live.len())];
                store.touch(key, now + 1).await.unwrap();
            }
        }
    }
    store.sync().await.unwrap();
    store.sweep(now).await.unwrap();
    used
}

fn sled_config(dir: &std::path::Path, sealed: bool) -> Config {
    let security = if sealed {
        format!("[security]\nsecret_key = {SECRET:?}\n")
    } else {
        String::new()
    };
    Config::from_toml(&format!(
        "[store]\npath = {:?}\n{security}",
        dir.join("s").display().to_string()
    ))
    .unwrap()
}

/// Every byte of every file under `dir`.
fn files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_byte_of_a_sled_store_names_a_visitor() {
    for (seed, sealed) in [(1, false), (2, true)] {
        let dir = tempfile::tempdir().unwrap();
        let config = sled_config(dir.path(), sealed);
        let used = {
            let storage = session_sidecar::Deps::open(&config).await.unwrap().store;
            run(&store_of(&storage), seed).await
        };
        let all = files(dir.path());
        assert!(all.iter().map(|(_, b)| b.len()).sum::<usize>() > 0);
        for (path, bytes) in all {
            assert_eq!(
                used.in_bytes(&bytes),
                None,
                "{} (sealed: {sealed})",
                path.display()
            );
        }
    }
}

async fn redis_run(store_toml: &str, ports: &[u16], prefix: &str, seed: u64, sealed: bool) -> Used {
    let security = if sealed {
        format!("[security]\nsecret_key = {SECRET:?}\n")
    } else {
        String::new()
    };
    let config = Config::from_toml(&format!("{store_toml}{security}")).unwrap();
    let storage = session_sidecar::Deps::open(&config).await.unwrap().store;
    let used = run(&store_of(&storage), seed).await;
    let held = common::redis_contents(ports, prefix);
    assert!(!held.is_empty(), "the run left sessions");
    for (name, value) in held {
        assert_eq!(used.in_bytes(name.as_bytes()), None, "{name}");
        assert_eq!(
            used.in_bytes(value.as_bytes()),
            None,
            "{name} holds {value}"
        );
    }
    used
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_byte_redis_holds_or_dumps_names_a_visitor() {
    let Some(server) = common::RedisServer::start() else {
        return;
    };
    let mut used = Used::default();
    for (seed, sealed) in [(3, false), (4, true)] {
        let prefix = format!("names{seed}:");
        let toml = server.store_toml(&prefix);
        let run = redis_run(&toml, &[server.port], &prefix, seed, sealed).await;
        used.0.extend(run.0);
    }
    // A backup: the server's own dump of what the runs left.
    assert_eq!(common::redis_cli(server.port, &["SAVE"]), "OK");
    let dump = std::fs::read(server.dir().join("dump.rdb")).unwrap();
    assert!(dump.len() > 1000, "{} bytes", dump.len());
    assert_eq!(used.in_bytes(&dump), None, "the dump");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_byte_behind_sentinel_or_on_a_cluster_names_a_visitor() {
    if let Some(set) = common::SentinelSet::start() {
        let mut ports = vec![set.master_port];
        ports.extend(&set.replica_ports);
        redis_run(&set.store_toml("sent:"), &ports, "sent:", 5, false).await;
    }
    if let Some(cluster) = common::RedisCluster::start() {
        redis_run(
            &cluster.store_toml("clus:"),
            &cluster.ports.clone(),
            "clus:",
            6,
            true,
        )
        .await;
    }
}
