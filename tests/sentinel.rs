//! Redis behind Sentinel, as production runs it: the sidecar finds the master through the
//! sentinels and follows a failover by itself. Real redis-server and redis-sentinel processes
//! (a master, two replicas, three sentinels) started by the tests on loopback ports.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// What the visitors saw while the master was killed (or cut off) and a replica promoted.
#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    /// Counts that went back below the last acknowledged one + 1 (a lost acknowledged write).
    lost: AtomicU64,
    /// Acknowledged increments those went back by.
    lost_increments: AtomicU64,
    /// Successes after the event (`Visitors::event`).
    ok_after: AtomicU64,
}

/// Four visitors counting through one sidecar until stopped, tallying what they see.
struct Visitors {
    tally: Arc<Tally>,
    event: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<i64>>,
}

impl Visitors {
    fn start(url: String) -> Visitors {
        let tally = Arc::new(Tally::default());
        let event = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (url, tally, event, stop) =
                (url.clone(), tally.clone(), event.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
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
                        tally
                            .lost_increments
                            .fetch_add((acknowledged + 1 - now) as u64, Ordering::SeqCst);
                    }
                    acknowledged = now;
                    tally.ok.fetch_add(1, Ordering::SeqCst);
                    if event.load(Ordering::SeqCst) {
                        tally.ok_after.fetch_add(1, Ordering::SeqCst);
                    }
                }
                acknowledged
            }));
        }
        Visitors {
            tally,
            event,
            stop,
            tasks,
        }
    }

    /// Marks the event successes are counted after.
    fn event(&self) {
        self.event.store(true, Ordering::SeqCst);
    }

    /// Whether more than `n` requests succeeded after the event, within `within`.
    async fn served_after(&self, n: u64, within: Duration) -> bool {
        let base = self.tally.ok_after.load(Ordering::SeqCst);
        let started = Instant::now();
        while started.elapsed() < within {
            if self.tally.ok_after.load(Ordering::SeqCst) > base + n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Stops them; their final counts.
    async fn stop(self) -> Vec<i64> {
        self.stop.store(true, Ordering::SeqCst);
        let mut counts = Vec::new();
        for t in self.tasks {
            counts.push(t.await.unwrap());
        }
        counts
    }
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
    let count = async || sidecar.get(&client, "/").incr("n").send().await;
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
    let read = sidecar.get(&client, "/").send().await;
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
    let visitors = Visitors::start(sidecar.url("/"));
    let tally = visitors.tally.clone();
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
    visitors.event();
    let killed_at = Instant::now();
    // Sentinel notices after down-after-milliseconds (1 s), elects a leader and promotes the
    // replica; the sidecar must then serve from it without being told.
    let mut promoted_after = None;
    let mut served_again_after = None;
    let base = tally.ok_after.load(Ordering::SeqCst);
    while killed_at.elapsed() < Duration::from_secs(30) {
        if promoted_after.is_none() && set.current_master() != old {
            promoted_after = Some(killed_at.elapsed());
        }
        if promoted_after.is_some() && tally.ok_after.load(Ordering::SeqCst) > base + 50 {
            served_again_after = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = visitors.stop().await;
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

/// The sentinels' user: nobody.
const SENTINEL_UID: u32 = 65534;

/// Jepsen's Redis finding, reproduced: the master is cut off from the sentinels but not from the
/// sidecar. The sentinels promote a replica; the sidecar, which still reaches the old master,
/// goes on writing there until the partition heals and Sentinel turns the old master into a
/// replica — then its writes answer `READONLY`, and the sidecar finds the new master by itself.
/// What happens to the changes acknowledged on the old master meanwhile is the durability
/// table's row: returns (refused, lost acknowledged increments).
async fn partitioned_master(extra: &str) -> Option<(u64, u64)> {
    let set = SentinelSet::start_with_sentinels_as(Some(SENTINEL_UID))?;
    let app = start_app(echo).await;
    let sidecar = sidecar_for(app, &format!("{}{extra}", set.store_toml("split:"))).await;
    let visitors = Visitors::start(sidecar.url("/"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old = set.master_port;
    let cut = Cut::new(SENTINEL_UID, old)?;
    let started = Instant::now();
    let mut promoted_after = None;
    while started.elapsed() < Duration::from_secs(20) {
        if set.current_master() != old {
            promoted_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(promoted_after.is_some(), "a replica was promoted");
    // The split: the sidecar still writes to the old master, which no replica follows now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ok_during_split = visitors.tally.ok.load(Ordering::SeqCst);
    drop(cut);
    visitors.event();
    let healed = Instant::now();
    let mut demoted_after = None;
    while healed.elapsed() < Duration::from_secs(20) {
        if redis_cli(old, &["INFO", "replication"]).contains("role:slave") {
            demoted_after = Some(healed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(demoted_after.is_some(), "the old master became a replica");
    let served = visitors.served_after(50, Duration::from_secs(20)).await;
    let served_after = healed.elapsed();
    let tally = visitors.tally.clone();
    let counts = visitors.stop().await;
    let (refused, lost) = (
        tally.refused.load(Ordering::SeqCst),
        tally.lost_increments.load(Ordering::SeqCst),
    );
    eprintln!(
        "partitioned master ({extra:?}): promoted after {promoted_after:?}; healed, old master a replica after \
         {demoted_after:?}, 50 requests served after the heal within {served_after:?}; {} ok ({ok_during_split} \
         before the heal), {refused} refused, {lost} acknowledged increments lost; final counts {counts:?}",
        tally.ok.load(Ordering::SeqCst),
    );
    assert!(
        served,
        "the sidecar left the demoted master (READONLY) and serves from the new one"
    );
    Some((refused, lost))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_cut_off_from_the_sentinels_loses_what_it_acknowledged_meanwhile_by_default() {
    let Some((_, lost)) = partitioned_master("").await else {
        return;
    };
    // The default's documented limit: changes acknowledged by the old master during the split
    // are gone once it rejoins as a replica.
    assert!(lost > 0, "the split-brain writes were expected to be lost");
}

/// With every replica required: the promoted one left the old master first, so nothing the old
/// master took alone is acknowledged. (With `wait_replicas = 1` of two replicas, the other one
/// confirmed changes until Sentinel moved it to the new master, and those were lost: 599
/// acknowledged increments in one run. docs/SCALING.md's durability table says so.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_replicas_a_master_cut_off_from_the_sentinels_acknowledges_nothing_it_loses() {
    let Some((refused, lost)) =
        partitioned_master("wait_replicas = 2\nwait_timeout_ms = 300\n").await
    else {
        return;
    };
    assert_eq!(lost, 0, "no acknowledged change lost");
    assert!(
        refused > 0,
        "changes the old master could not replicate were refused"
    );
}

/// The sidecar (this test process, root) cut off from the master, the sentinels not: no
/// failover, the sidecar answers 503 within the command timeout, and serves again with the
/// session as it was once the partition heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_off_from_the_master_the_sidecar_answers_503_within_the_command_timeout_and_recovers() {
    let Some(set) = SentinelSet::start_with_sentinels_as(Some(SENTINEL_UID)) else {
        return;
    };
    let app = start_app(echo).await;
    let sidecar = sidecar_for(app, &set.store_toml("cut:")).await;
    partition_and_heal(&sidecar, || Some(vec![Cut::new(0, set.master_port)?])).await;
    assert_eq!(set.current_master(), set.master_port, "no failover");
}
