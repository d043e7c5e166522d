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
                let resp = get(&client, &urls[turn % 2]).incr("n").send().await;
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
        let r = a.get(&plain(), "/").incr("n").send().await;
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

/// `wait_replicas` on a cluster: every master's replica must confirm each change (the cell's,
/// and a subject set's on another master); a stopped replica makes changes to its master's
/// slots refused (503) after `wait_timeout_ms`, reads go on, and changes are acknowledged again
/// once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_replicas_each_change_waits_for_its_masters_replica() {
    let Some(cluster) = RedisCluster::start_with_replicas(1) else {
        return;
    };
    let replicas = cluster.replicas();
    assert_eq!(replicas.len(), 3, "one replica per master");
    let app = start_app(echo).await;
    let store = format!(
        "{}wait_replicas = 1\nwait_timeout_ms = 1000\n",
        cluster.store_toml("cwait:")
    );
    let sidecar = sidecar_for(app, &store).await;
    // Visitors spread over the slots, each logged in (a subject set on some master) and counting.
    let mut visitors = Vec::new();
    for i in 0..12 {
        let client = browser();
        let r = sidecar
            .get(&client, "/")
            .incr("n")
            .reply(&[("X-Session-Subject", &format!("user{i}"))])
            .send()
            .await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        visitors.push(client);
    }
    let count = async |client: &reqwest::Client| sidecar.get(client, "/").incr("n").send().await;
    for client in &visitors {
        let r = count(client).await;
        assert_eq!(seen(r).await.session()["n"], 1);
    }
    // Each change reached a replica before it was acknowledged: the replicas hold the keys.
    let held: u64 = replicas
        .iter()
        .map(|(p, _)| redis_cli(*p, &["DBSIZE"]).parse::<u64>().unwrap())
        .sum();
    assert!(held >= 24, "cells and subject sets on the replicas: {held}");
    let signal = |sig: &str| {
        for (_, pid) in &replicas {
            std::process::Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .unwrap();
        }
    };
    signal("-STOP");
    let started = Instant::now();
    let refused = count(&visitors[0]).await;
    let took = started.elapsed();
    assert_eq!(refused.status(), 503, "no replica confirmed: refused");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(3000),
        "refused after the WAIT timeout: {took:?}"
    );
    let read = sidecar.get(&visitors[1], "/").send().await;
    assert_eq!(read.status(), 200, "reading needs no replica");
    signal("-CONT");
    let mut resumed = false;
    for _ in 0..50 {
        if count(&visitors[0]).await.status() == 200 {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        resumed,
        "changes acknowledged again once the replicas answer"
    );
    // A subject set lives on another master than the cell: its change waits for that master's
    // replica too. A visitor whose cell and new subject's set are on different masters: with
    // only the set master's replica stopped, counting is acknowledged and tagging is refused.
    let resp = sidecar.get(&plain(), "/").incr("n").send().await;
    let key = cookie_value(&set_cookies(&resp)[0]);
    // The store's names: the key's digest, the subject's digest (no secret here).
    let cell_master = cluster.master_of(&format!(
        "cwait:s:{}",
        session_sidecar::session::id::digest(&key)
    ));
    let set_of = |s: &str| {
        format!(
            "cwait:t:{}",
            session_sidecar::session::Codec::plain().tag(s)
        )
    };
    let subject = (0..)
        .map(|i| format!("other{i}"))
        .find(|s| cluster.master_of(&set_of(s)) != cell_master)
        .unwrap();
    let set_replica = cluster.replicas_of(cluster.master_of(&set_of(&subject)));
    assert_eq!(set_replica.len(), 1);
    let pid = set_replica[0].1.to_string();
    let as_visitor = async |reply_headers: &[(&str, &str)]| {
        sidecar
            .get(&plain(), "/")
            .cookie(format!("sessionid={key}"))
            .incr("n")
            .reply(reply_headers)
            .send()
            .await
            .status()
    };
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    let counted = as_visitor(&[]).await;
    let tagged = as_visitor(&[("X-Session-Subject", &subject)]).await;
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    assert_eq!(counted, 200, "the cell's master's replica answers");
    assert_eq!(tagged, 503, "the subject set's master's replica does not");
    eprintln!("cluster with wait_replicas: refused after {took:?} while the replicas were stopped");
}

/// The sidecar cut off from every master's client port (the cluster bus untouched, so the
/// cluster itself stays whole): 503 within the command timeout, and service with the session as
/// it was once the partition heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_off_from_the_cluster_the_sidecar_answers_503_within_the_command_timeout_and_recovers()
{
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let app = start_app(echo).await;
    let sidecar = sidecar_for(app, &cluster.store_toml("ccut:")).await;
    partition_and_heal(&sidecar, || {
        cluster.ports.iter().map(|&p| Cut::new(0, p)).collect()
    })
    .await;
}
