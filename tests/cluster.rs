//! Redis Cluster, as production runs it: three masters started by the test, sessions spread by
//! slot, and slots moved between masters (`redis-cli --cluster reshard`, keys migrated) while
//! visitors keep counting.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_moved_while_serving_lose_nothing_and_sessions_work_across_sidecars() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let app = start_app(echo).await;
    let store = cluster.store_toml("cluster:");
    let (a, b) = (
        sidecar_for(app, &store).await,
        sidecar_for(app, &store).await,
    );
    let (failed, ok, lost) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut visitors = Vec::new();
    for i in 0..8 {
        let urls = [a.url("/"), b.url("/")];
        let (failed, ok, lost, stop) = (failed.clone(), ok.clone(), lost.clone(), stop.clone());
        visitors.push(tokio::spawn(async move {
            let client = browser();
            let mut acknowledged = 0i64;
            let mut turn = i;
            while !stop.load(Ordering::SeqCst) {
                // Each visitor alternates between the two sidecars.
                turn += 1;
                let resp = client
                    .get(&urls[turn % 2])
                    .header("x-test-incr", "n")
                    .send()
                    .await
                    .unwrap();
                if resp.status() != 200 {
                    failed.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let seen_n = seen(resp).await.session()["n"].as_i64().unwrap_or(0);
                if seen_n != acknowledged {
                    lost.fetch_add(1, Ordering::SeqCst);
                }
                acknowledged = seen_n + 1;
                ok.fetch_add(1, Ordering::SeqCst);
            }
            acknowledged
        }));
    }
    // More sessions, so that the slots moved certainly hold some.
    for _ in 0..300 {
        let r = plain()
            .get(a.url("/"))
            .header("x-test-incr", "n")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Move a third of the first master's slots to the second, keys and all, under traffic.
    let id = |port: u16| redis_cli(port, &["CLUSTER", "MYID"]);
    let (from, to) = (id(cluster.ports[0]), id(cluster.ports[1]));
    let before = cluster.keys_per_node();
    let started = Instant::now();
    let port = cluster.ports[0];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{port}"),
                "--cluster-from",
                &from,
                "--cluster-to",
                &to,
                "--cluster-slots",
                "2000",
                "--cluster-yes",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "reshard: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut counts = Vec::new();
    for v in visitors {
        counts.push(v.await.unwrap());
    }
    let after = cluster.keys_per_node();
    eprintln!(
        "reshard of 2000 slots took {took:?}; keys per node {before:?} -> {after:?}; {} ok, {} failed, {} lost; counts {counts:?}",
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        lost.load(Ordering::SeqCst)
    );
    assert!(after[1] > before[1], "keys moved to the second master");
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "MOVED/ASK are followed, not failed"
    );
    assert_eq!(
        lost.load(Ordering::SeqCst),
        0,
        "every count went on from the last"
    );
}
