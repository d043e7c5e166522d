//! Redis behind Sentinel, as production runs it: the sidecar finds the master through the
//! sentinels and follows a failover by itself. Real redis-server and redis-sentinel processes
//! (a master, two replicas, three sentinels) started by the tests on loopback ports.

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
    failover("", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_replicas_a_failover_after_replica_lag_loses_no_acknowledged_change() {
    let lost = failover("wait_replicas = 1\nwait_timeout_ms = 1000\n", true).await;
    assert!(matches!(lost, Some(0) | None), "lost {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_replicas_a_stalled_replica_refuses_changes_and_reads_go_on() {
    let Some(set) = SentinelSet::start() else {
        return;
    };
    let app = start_app(echo).await;
    let sidecar = sidecar_for(
        app,
        &format!(
            "{}wait_replicas = 1\nwait_timeout_ms = 300\n",
            set.store_toml("stall:")
        ),
    )
    .await;
    let client = browser();
    let count = async || {
        client
            .get(sidecar.url("/"))
            .header("x-test-incr", "n")
            .send()
            .await
            .unwrap()
    };
    assert_eq!(seen(count().await).await.status(), "new");
    assert_eq!(seen(count().await).await.session()["n"], 1);
    let signal = |sig: &str| {
        for replica in &set.replicas {
            std::process::Command::new("kill")
                .args([sig, &replica.0.id().to_string()])
                .status()
                .unwrap();
        }
    };
    signal("-STOP");
    let started = Instant::now();
    let refused = count().await;
    let took = started.elapsed();
    assert_eq!(refused.status(), 503, "no replica confirmed: refused");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(2000),
        "refused after the WAIT timeout, not the command timeout: {took:?}"
    );
    // Reading needs no replica.
    let read = client.get(sidecar.url("/")).send().await.unwrap();
    assert_eq!(read.status(), 200);
    // The refused change is on the master, unconfirmed: a 503 says "not acknowledged", not
    // "not done".
    let n = seen(read).await.session()["n"].as_i64().unwrap();
    assert!(n == 2 || n == 3, "n = {n}");
    signal("-CONT");
    let mut resumed = None;
    for _ in 0..50 {
        let resp = count().await;
        if resp.status() == 200 {
            resumed = Some(seen(resp).await.session()["n"].as_i64().unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        resumed.is_some(),
        "changes are acknowledged again once the replica answers"
    );
    eprintln!("stalled replica: refused after {took:?}; resumed at n = {resumed:?}");
}

/// Four visitors count through one sidecar (with `extra` in `[store]`) while the master is
/// SIGKILLed and Sentinel promotes a replica; with `lag`, the replicas are stopped (SIGSTOP) for
/// 500 ms before the kill and continued after it, so they miss what the master took meanwhile.
/// Returns how many times a visitor's count went back below its last acknowledged one.
async fn failover(extra: &str, lag: bool) -> Option<u64> {
    let mut set = SentinelSet::start()?;
    let app = start_app(echo).await;
    let sidecar = sidecar_for(app, &format!("{}{extra}", set.store_toml("failover:"))).await;
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
    let replicas: Vec<String> = set.replicas.iter().map(|r| r.0.id().to_string()).collect();
    let signal = |sig: &str| {
        for pid in &replicas {
            std::process::Command::new("kill")
                .args([sig, pid])
                .status()
                .unwrap();
        }
    };
    if lag {
        signal("-STOP");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    set.kill_master();
    if lag {
        signal("-CONT");
    }
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
        "failover ({extra:?}, lag {lag}): promoted after {promoted_after:?}, served again after {served_again_after:?}; \
         {} ok, {} refused, {} lost acknowledged writes; final counts {counts:?}",
        tally.ok.load(Ordering::SeqCst),
        tally.refused.load(Ordering::SeqCst),
        tally.lost.load(Ordering::SeqCst),
    );
    assert!(
        set.replica_ports.contains(&set.current_master()),
        "a replica was promoted"
    );
    assert!(
        served_again_after.is_some(),
        "the sidecar serves from the promoted replica by itself"
    );
    Some(tally.lost.load(Ordering::SeqCst))
}
