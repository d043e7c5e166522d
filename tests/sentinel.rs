//! Redis behind Sentinel, as production runs it: the sidecar finds the master through the
//! sentinels and follows a failover by itself. Real redis-server and redis-sentinel processes
//! (a master, a replica, three sentinels) started by the tests on loopback ports.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// What the visitors saw while the master was killed and a replica promoted.
#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    /// Counts that went back below the last acknowledged one + 1 (a lost acknowledged write).
    lost: AtomicU64,
    /// Successes after the kill.
    ok_after_kill: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_under_traffic_is_replaced_and_the_sidecar_follows_by_itself() {
    let Some(mut set) = SentinelSet::start() else {
        return;
    };
    let app = start_app(echo).await;
    let sidecar = sidecar_for(app, &set.store_toml("failover:")).await;
    let tally = Arc::new(Tally::default());
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut visitors = Vec::new();
    for _ in 0..4 {
        let (url, tally, killed, stop) = (
            sidecar.url("/"),
            tally.clone(),
            killed.clone(),
            stop.clone(),
        );
        visitors.push(tokio::spawn(async move {
            let client = browser();
            let mut acknowledged = 0i64;
            while !stop.load(Ordering::SeqCst) {
                let resp = client.get(&url).header("x-test-incr", "n").send().await;
                let Ok(resp) = resp else {
                    tally.refused.fetch_add(1, Ordering::SeqCst);
                    continue;
                };
                if resp.status() != 200 {
                    assert_eq!(resp.status(), 503, "a failover is a 503, nothing else");
                    tally.refused.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let n = seen(resp).await.session().get("n").and_then(|v| v.as_i64());
                let now = n.unwrap_or(0) + 1;
                if now < acknowledged + 1 {
                    tally.lost.fetch_add(1, Ordering::SeqCst);
                }
                acknowledged = now;
                tally.ok.fetch_add(1, Ordering::SeqCst);
                if killed.load(Ordering::SeqCst) {
                    tally.ok_after_kill.fetch_add(1, Ordering::SeqCst);
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        tally.ok.load(Ordering::SeqCst) > 0,
        "served before the kill"
    );
    let old = set.master_port;
    set.kill_master();
    killed.store(true, Ordering::SeqCst);
    let killed_at = Instant::now();
    // Sentinel notices after down-after-milliseconds (1 s), elects a leader and promotes the
    // replica; the sidecar must then serve from it without being told.
    let mut promoted_after = None;
    let mut served_again_after = None;
    let base = tally.ok_after_kill.load(Ordering::SeqCst);
    while killed_at.elapsed() < Duration::from_secs(30) {
        if promoted_after.is_none() && set.current_master() != old {
            promoted_after = Some(killed_at.elapsed());
        }
        if promoted_after.is_some() && tally.ok_after_kill.load(Ordering::SeqCst) > base + 50 {
            served_again_after = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut counts = Vec::new();
    for v in visitors {
        counts.push(v.await.unwrap());
    }
    eprintln!(
        "failover: promoted after {promoted_after:?}, served again after {served_again_after:?}; \
         {} ok, {} refused, {} lost acknowledged writes; final counts {counts:?}",
        tally.ok.load(Ordering::SeqCst),
        tally.refused.load(Ordering::SeqCst),
        tally.lost.load(Ordering::SeqCst),
    );
    assert_eq!(
        set.current_master(),
        set.replica_port,
        "the replica was promoted"
    );
    assert!(
        served_again_after.is_some(),
        "the sidecar serves from the promoted replica by itself"
    );
}
