//! The store contract, written once: every backend must pass `suite` (sled, and Redis against a
//! real redis-server the test starts itself). Each check drives the `Store` trait directly with
//! explicit times.

mod common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use session_sidecar::Config;
use session_sidecar::session::Codec;
use session_sidecar::session::changes::{Change, Op};
use session_sidecar::session::testing::{
    Liveness, Lookup, RedisStore, Seen, SledStore, Store, Update, UpdateError, Updated,
};
use session_sidecar::session::{ExpiryMode, Millis, Policy, Record, Upkeep, id};

/// The tests' "now": real time, because Redis expires keys by its own clock.
fn t0() -> Millis {
    static START: std::sync::OnceLock<Millis> = std::sync::OnceLock::new();
    *START.get_or_init(|| {
        session_sidecar::session::Clock::now(&session_sidecar::session::SystemClock)
    })
}
const AGE_MS: Millis = 1_000_000;

fn policy() -> Policy {
    let c = Config::from_toml("[expiry]\ncookie_age = 1000").unwrap();
    c.expiry.policy(Duration::from_secs(30))
}

fn record(data: serde_json::Value, now: Millis) -> Record {
    let mut r = Record::new(now);
    r.data = data.as_object().unwrap().clone();
    r.deadline = policy().deadline(&r);
    r
}

fn set(k: &str, v: serde_json::Value) -> Change {
    Change {
        ops: vec![Op::Set(k.into(), v)],
        ..Change::default()
    }
}

/// The store contract. `open` gives a fresh, empty store; `sweeps` says whether the backend
/// needs the sweeper (Redis expires entries by itself).
async fn suite(open: impl AsyncFn() -> Arc<dyn Store>, sweeps: bool) {
    create_then_load(open().await).await;
    expired_records_are_never_loaded(open().await).await;
    updates_merge_per_key_against_the_latest_state(open().await).await;
    emptying_removes_the_record(open().await).await;
    an_update_after_removal_reports_the_session_ended(open().await).await;
    cycle_moves_the_record_and_forwards_in_flight_updates(open().await).await;
    size_cap_leaves_the_record_untouched(open().await).await;
    subjects_index_live_sessions(open().await).await;
    if sweeps {
        sweep_removes_only_what_expired(open().await).await;
    }
    liveness_distinguishes_live_forwarded_and_ended(open().await).await;
    a_liveness_check_after_a_load_hears_of_every_end(open().await).await;
    a_second_cycle_lands_in_the_renamed_session(open().await).await;
    concurrent_updates_and_a_cycle_lose_nothing(open().await).await;
    a_stale_version_costs_a_reread_not_a_change(open().await).await;
}

async fn a_stale_version_costs_a_reread_not_a_change(s: Arc<dyn Store>) {
    let k = id::generate();
    s.create(&k, &record(json!({"a": 0}), t0())).await.unwrap();
    let Lookup::Live(seen, version) = s.lookup(&k, t0() + 1).await.unwrap() else {
        panic!("a live session")
    };
    // Fresh: the version is current, the write lands.
    s.update(Update {
        seen: Some((&seen, &version)),
        ..Update::new(&k, &set("b", json!(1)), t0() + 2)
    })
    .await
    .unwrap();
    // Stale: someone wrote since; the change still merges with the latest value.
    s.update(Update {
        seen: Some((&seen, &version)),
        ..Update::new(&k, &set("c", json!(2)), t0() + 3)
    })
    .await
    .unwrap();
    let r = s.load(&k, t0() + 4).await.unwrap().unwrap();
    assert_eq!(
        r.data,
        *json!({"a": 0, "b": 1, "c": 2}).as_object().unwrap()
    );
}

async fn create_then_load(s: Arc<dyn Store>) {
    let k = id::generate();
    assert!(s.create(&k, &record(json!({"a": 1}), t0())).await.unwrap());
    assert!(
        !s.create(&k, &record(json!({"b": 1}), t0())).await.unwrap(),
        "create-if-absent"
    );
    let r = s.load(&k, t0() + 1).await.unwrap().unwrap();
    assert_eq!(r.data, *json!({"a": 1}).as_object().unwrap());
    assert!(s.load(&id::generate(), t0()).await.unwrap().is_none());
}

async fn expired_records_are_never_loaded(s: Arc<dyn Store>) {
    let k = id::generate();
    s.create(&k, &record(json!({"a": 1}), t0())).await.unwrap();
    assert!(s.load(&k, t0() + AGE_MS - 1).await.unwrap().is_some());
    assert!(s.load(&k, t0() + AGE_MS).await.unwrap().is_none());
}

async fn updates_merge_per_key_against_the_latest_state(s: Arc<dyn Store>) {
    let k = id::generate();
    s.create(&k, &record(json!({"a": 0}), t0())).await.unwrap();
    s.update(Update::new(&k, &set("x", json!(1)), t0() + 1))
        .await
        .unwrap();
    s.update(Update::new(&k, &set("y", json!(2)), t0() + 2))
        .await
        .unwrap();
    let r = s.load(&k, t0() + 3).await.unwrap().unwrap();
    assert_eq!(
        r.data,
        *json!({"a": 0, "x": 1, "y": 2}).as_object().unwrap()
    );
    assert_eq!(r.saved, t0() + 2);
    let again = s
        .update(Update::new(&k, &set("y", json!(2)), t0() + 4))
        .await
        .unwrap();
    assert_eq!(
        again,
        Updated::Unchanged {
            key: k.clone(),
            forwarded: false
        }
    );
}

async fn emptying_removes_the_record(s: Arc<dyn Store>) {
    let k = id::generate();
    s.create(&k, &record(json!({"a": 0}), t0())).await.unwrap();
    let c = Change {
        ops: vec![Op::Delete("a".into())],
        ..Change::default()
    };
    assert_eq!(
        s.update(Update::new(&k, &c, t0() + 1)).await.unwrap(),
        Updated::Removed { forwarded: false }
    );
    assert_eq!(
        s.liveness(&k, t0() + 1, None).await.unwrap(),
        Liveness::Ended
    );
}

async fn an_update_after_removal_reports_the_session_ended(s: Arc<dyn Store>) {
    let k = id::generate();
    s.create(&k, &record(json!({"a": 0}), t0())).await.unwrap();
    assert!(s.remove(&k).await.unwrap());
    assert!(!s.remove(&k).await.unwrap());
    assert_eq!(
        s.update(Update::new(&k, &set("b", json!(1)), t0() + 1))
            .await
            .unwrap(),
        Updated::Ended
    );
    assert!(
        s.load(&k, t0() + 1).await.unwrap().is_none(),
        "not resurrected"
    );
}

async fn cycle_moves_the_record_and_forwards_in_flight_updates(s: Arc<dyn Store>) {
    let old = id::generate();
    let new = id::generate();
    s.create(&old, &record(json!({"a": 0}), t0()))
        .await
        .unwrap();
    let c = Change {
        cycle: true,
        ..Change::default()
    };
    match s
        .update(Update::new(&old, &c, t0() + 1).cycle_to(&new))
        .await
        .unwrap()
    {
        Updated::Saved {
            key,
            forwarded: false,
            ..
        } => assert_eq!(key, new),
        other => panic!("{other:?}"),
    }
    assert!(
        s.load(&old, t0() + 2).await.unwrap().is_none(),
        "old key no longer loads"
    );
    match s
        .update(Update::new(&old, &set("late", json!(true)), t0() + 3))
        .await
        .unwrap()
    {
        Updated::Saved {
            key,
            forwarded: true,
            ..
        } => assert_eq!(key, new),
        other => panic!("{other:?}"),
    }
    let r = s.load(&new, t0() + 4).await.unwrap().unwrap();
    assert_eq!(r.data, *json!({"a": 0, "late": true}).as_object().unwrap());
    // The forward is short-lived.
    let later = t0() + 3_600_000;
    assert_eq!(
        s.update(Update::new(&old, &set("x", json!(1)), later))
            .await
            .unwrap(),
        Updated::Ended
    );
}

async fn size_cap_leaves_the_record_untouched(s: Arc<dyn Store>) {
    let k = id::generate();
    s.create(&k, &record(json!({"a": 0}), t0())).await.unwrap();
    let big = set("big", json!("x".repeat(10_000)));
    assert!(matches!(
        s.update(Update::new(&k, &big, t0() + 1)).await,
        Err(UpdateError::Unfit(_))
    ));
    let r = s.load(&k, t0() + 2).await.unwrap().unwrap();
    assert_eq!(r.data, *json!({"a": 0}).as_object().unwrap());
}

async fn subjects_index_live_sessions(s: Arc<dyn Store>) {
    let (k1, k2) = (id::generate(), id::generate());
    for k in [&k1, &k2] {
        s.create(k, &record(json!({"a": 0}), t0())).await.unwrap();
        let c = Change {
            subject: Some(Some("user-1".into())),
            ..Change::default()
        };
        s.update(Update::new(k, &c, t0() + 1)).await.unwrap();
    }
    let mut keys: Vec<String> = s
        .subject_sessions("user-1", t0() + 2)
        .await
        .unwrap()
        .iter()
        .map(|(cell, _)| cell.handle())
        .collect();
    keys.sort();
    let mut want = vec![id::handle(&k1), id::handle(&k2)];
    want.sort();
    assert_eq!(keys, want);
    s.remove(&k1).await.unwrap();
    let untag = Change {
        subject: Some(None),
        ..Change::default()
    };
    s.update(Update::new(&k2, &untag, t0() + 3)).await.unwrap();
    assert!(
        s.subject_sessions("user-1", t0() + 4)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn sweep_removes_only_what_expired(s: Arc<dyn Store>) {
    let live: Vec<String> = (0..20).map(|_| id::generate()).collect();
    let dead: Vec<String> = (0..5).map(|_| id::generate()).collect();
    for k in &dead {
        s.create(k, &record(json!({"a": 0}), t0())).await.unwrap();
    }
    for k in &live {
        s.create(k, &record(json!({"a": 0}), t0() + AGE_MS))
            .await
            .unwrap();
    }
    // The index works in buckets, but the sweep goes by the exact deadline.
    let soon = t0() + AGE_MS + 1;
    let swept = s.sweep(soon).await.unwrap();
    assert_eq!(swept.sessions, 5);
    for k in &live {
        assert!(s.load(k, soon).await.unwrap().is_some());
    }
    assert_eq!(s.sweep(soon).await.unwrap().sessions, 0);
}

async fn liveness_distinguishes_live_forwarded_and_ended(s: Arc<dyn Store>) {
    let (old, new) = (id::generate(), id::generate());
    s.create(&old, &record(json!({"a": 0}), t0()))
        .await
        .unwrap();
    assert_eq!(
        s.liveness(&old, t0() + 1, None).await.unwrap(),
        Liveness::Live
    );
    let c = Change {
        cycle: true,
        ..Change::default()
    };
    s.update(Update::new(&old, &c, t0() + 1).cycle_to(&new))
        .await
        .unwrap();
    assert_eq!(
        s.liveness(&old, t0() + 2, None).await.unwrap(),
        Liveness::Forwarded
    );
    s.remove(&new).await.unwrap();
    assert_eq!(
        s.liveness(&old, t0() + 3, None).await.unwrap(),
        Liveness::Ended
    );
}

/// What a request's load saw, for its liveness check (as `Sessions` takes it: the mark first).
async fn load_seen(s: &Arc<dyn Store>, k: &str, now: Millis) -> Option<Seen> {
    let mark = s.mark();
    let Lookup::Live(r, _) = s.lookup(k, now).await.unwrap() else {
        panic!("a live session")
    };
    mark.map(|mark| Seen {
        mark,
        deadline: r.deadline,
    })
}

/// The liveness check with what the load saw, once the store could hear of the change (a
/// notice follows its change by a moment: up to 5 s allowed here).
async fn liveness_becomes(
    s: &Arc<dyn Store>,
    k: &str,
    now: Millis,
    seen: Option<Seen>,
    want: Liveness,
) {
    let mut got = None;
    for _ in 0..500 {
        got = Some(s.liveness(k, now, seen).await.unwrap());
        if got == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("liveness {got:?}, not {want:?}, with {seen:?}");
}

/// The check a read-only request makes after its response, given what its load saw: a store
/// with end notices may answer it without a read, and must still see every end.
async fn a_liveness_check_after_a_load_hears_of_every_end(s: Arc<dyn Store>) {
    // A store with notices starts listening a moment after it opens.
    for _ in 0..200 {
        if s.mark().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fresh = async || {
        let k = id::generate();
        s.create(&k, &record(json!({"a": 0}), t0())).await.unwrap();
        let seen = load_seen(&s, &k, t0() + 1).await;
        (k, seen)
    };
    let (k, seen) = fresh().await;
    assert_eq!(
        s.liveness(&k, t0() + 2, seen).await.unwrap(),
        Liveness::Live
    );
    // Past the deadline the load read: ended, notice or not.
    assert_eq!(
        s.liveness(&k, t0() + AGE_MS, seen).await.unwrap(),
        Liveness::Ended
    );
    // Flushed.
    s.remove(&k).await.unwrap();
    liveness_becomes(&s, &k, t0() + 2, seen, Liveness::Ended).await;
    // Cycled.
    let (k, seen) = fresh().await;
    let cycle = Change {
        cycle: true,
        ..Change::default()
    };
    s.update(Update::new(&k, &cycle, t0() + 2).cycle_to(&id::generate()))
        .await
        .unwrap();
    liveness_becomes(&s, &k, t0() + 3, seen, Liveness::Forwarded).await;
    // Its expiry brought forward to a moment now past.
    let (k, seen) = fresh().await;
    let shorter = Change {
        expiry: Some(ExpiryMode::Seconds(1)),
        ..Change::default()
    };
    s.update(Update::new(&k, &shorter, t0() + 2)).await.unwrap();
    liveness_becomes(&s, &k, t0() + 2_000, seen, Liveness::Ended).await;
    // A change that ends nothing leaves other sessions' checks alone: still live.
    let (k, seen) = fresh().await;
    let (other, _) = fresh().await;
    s.remove(&other).await.unwrap();
    s.update(Update::new(&k, &set("b", json!(1)), t0() + 2))
        .await
        .unwrap();
    assert_eq!(
        s.liveness(&k, t0() + 3, seen).await.unwrap(),
        Liveness::Live
    );
}

async fn concurrent_updates_and_a_cycle_lose_nothing(s: Arc<dyn Store>) {
    let k = id::generate();
    s.create(&k, &record(json!({"a": 0}), t0())).await.unwrap();
    let new = id::generate();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (s, k, new) = (s.clone(), k.clone(), new.clone());
        tasks.push(tokio::spawn(async move {
            if i == 32 {
                let c = Change {
                    cycle: true,
                    ..Change::default()
                };
                s.update(Update::new(&k, &c, t0() + 1).cycle_to(&new))
                    .await
                    .unwrap();
            } else {
                let u = s
                    .update(Update::new(&k, &set(&format!("k{i}"), json!(i)), t0() + 1))
                    .await
                    .unwrap();
                assert!(matches!(u, Updated::Saved { .. }), "{u:?}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = s
        .load(&new, t0() + 2)
        .await
        .unwrap()
        .expect("the cycled session");
    assert_eq!(r.data.len(), 64, "{:?}", r.data.keys().collect::<Vec<_>>());
    assert!(s.load(&k, t0() + 2).await.unwrap().is_none());
}

/// A double-clicked login: the second cycle started from the old key after the first renamed
/// it; it must not rename the session again (its response carries no cookie).
async fn a_second_cycle_lands_in_the_renamed_session(s: Arc<dyn Store>) {
    let k = id::generate();
    s.create(&k, &record(json!({"cart": 1}), t0()))
        .await
        .unwrap();
    let (k2, k3) = (id::generate(), id::generate());
    let cycle = |key: &str| Change {
        cycle: true,
        ..set(key, json!(1))
    };
    let first = s
        .update(Update::new(&k, &cycle("a"), t0() + 1).cycle_to(&k2))
        .await
        .unwrap();
    assert!(
        matches!(&first, Updated::Saved { key, forwarded: false, .. } if *key == k2),
        "{first:?}"
    );
    let second = s
        .update(Update::new(&k, &cycle("b"), t0() + 2).cycle_to(&k3))
        .await
        .unwrap();
    assert!(
        matches!(&second, Updated::Saved { key, forwarded: true, .. } if *key == k2),
        "{second:?}"
    );
    let r = s
        .load(&k2, t0() + 3)
        .await
        .unwrap()
        .expect("the renamed session lives");
    assert_eq!(
        serde_json::Value::Object(r.data),
        json!({"cart": 1, "a": 1, "b": 1})
    );
    assert!(
        s.load(&k3, t0() + 3).await.unwrap().is_none(),
        "no third key"
    );
    assert!(
        s.load(&k, t0() + 3).await.unwrap().is_none(),
        "the old key is dead"
    );
}

/// Records sealed with a key from this secret, in the `sealed_*` runs of the suite.
const SECRET: &str = "a secret for the sealed runs of the suite, 32+ bytes";

fn codec(sealed: bool) -> Codec {
    if sealed {
        Codec::sealed(SECRET, &[])
    } else {
        Codec::plain()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sled_store_keeps_the_store_contract() {
    sled_suite(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sealed_sled_store_keeps_the_store_contract() {
    sled_suite(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_keeps_the_store_contract() {
    redis_suite(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sealed_redis_store_keeps_the_store_contract() {
    redis_suite(true).await;
}

async fn sled_suite(sealed: bool) {
    let dirs = std::sync::Mutex::new(Vec::new());
    suite(
        async || {
            let dir = tempfile::tempdir().unwrap();
            let cfg = Config::from_toml(&format!(
                "[store]\npath = {:?}",
                dir.path().join("s").display().to_string()
            ))
            .unwrap();
            let store = SledStore::open(&cfg.store.sled(), Arc::new(policy()), 8192)
                .unwrap()
                .sealed(codec(sealed));
            dirs.lock().unwrap().push(dir);
            Arc::new(store) as Arc<dyn Store>
        },
        true,
    )
    .await;
}

/// A Redis store from `[store]` TOML lines.
async fn redis_store(toml: &str, sealed: bool) -> RedisStore {
    let cfg = Config::from_toml(toml).unwrap();
    let session_sidecar::config::Backend::Redis(redis) = &cfg.store.backend else {
        unreachable!("a redis store")
    };
    RedisStore::connect(redis, Arc::new(policy()), 8192)
        .await
        .unwrap()
        .sealed(codec(sealed))
}

/// The suite on Redis: each check gets a fresh, empty store (its own key prefix) from
/// `store_toml(prefix)`.
async fn redis_suite_on(store_toml: impl Fn(&str) -> String, sealed: bool) {
    let n = std::sync::atomic::AtomicUsize::new(0);
    suite(
        async || {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let toml = store_toml(&format!("suite{i}:{sealed}:"));
            Arc::new(redis_store(&toml, sealed).await) as Arc<dyn Store>
        },
        false,
    )
    .await;
}

async fn redis_suite(sealed: bool) {
    let Some(server) = common::RedisServer::start() else {
        return;
    };
    redis_suite_on(|prefix| server.store_toml(prefix), sealed).await;
}

/// Whether the store listens for end notices within 5 s of opening.
async fn listening(s: &Arc<dyn Store>) -> bool {
    for _ in 0..500 {
        if s.mark().is_some() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn on_redis_the_check_after_a_load_reads_only_when_a_notice_came() {
    let Some(server) = common::RedisServer::start() else {
        return;
    };
    let s = Arc::new(redis_store(&server.store_toml("fast:"), false).await) as Arc<dyn Store>;
    assert!(listening(&s).await, "subscribed to the end notices");
    let k = id::generate();
    s.create(&k, &record(json!({"a": 0}), t0())).await.unwrap();
    let seen = load_seen(&s, &k, t0() + 1).await;
    // The cell deleted behind the sidecars' back (no notice): the check with the load's mark
    // does not read, so it still says live; without a mark it reads and finds it gone. (A
    // session only ends through a sidecar, or by its deadline, which the load read.)
    let deleted = common::redis_cli(server.port, &["DEL", &format!("fast:s:{}", id::digest(&k))]);
    assert_eq!(deleted, "1");
    assert_eq!(
        s.liveness(&k, t0() + 2, seen).await.unwrap(),
        Liveness::Live
    );
    assert_eq!(
        s.liveness(&k, t0() + 2, None).await.unwrap(),
        Liveness::Ended
    );
    // What the channel carries when a session ends: its handle, never its key.
    let mut listener = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "SUBSCRIBE", "fast:ended"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ended = id::generate();
    s.create(&ended, &record(json!({"a": 0}), t0()))
        .await
        .unwrap();
    s.remove(&ended).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    listener.kill().unwrap();
    let heard = String::from_utf8(listener.wait_with_output().unwrap().stdout).unwrap();
    assert!(heard.contains(&id::handle(&ended)), "{heard}");
    assert!(
        !heard.contains(&ended),
        "the key itself was published: {heard}"
    );
    // A notice on the channel (the session's handle), whoever sent it, sends the check to Redis.
    common::redis_cli(server.port, &["PUBLISH", "fast:ended", &id::handle(&k)]);
    liveness_becomes(&s, &k, t0() + 2, seen, Liveness::Ended).await;
}

#[tokio::test]
async fn sled_store_keeps_sessions_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::from_toml(&format!(
        "[store]\npath = {:?}",
        dir.path().join("s").display().to_string()
    ))
    .unwrap();
    let k = id::generate();
    {
        let s = SledStore::open(&cfg.store.sled(), Arc::new(policy()), 8192).unwrap();
        s.create(&k, &record(json!({"a": 1}), t0())).await.unwrap();
        s.sync().await.unwrap();
    }
    common::sled_lets_go(&dir.path().join("s"));
    let s = SledStore::open(&cfg.store.sled(), Arc::new(policy()), 8192).unwrap();
    assert!(s.load(&k, t0() + 1).await.unwrap().is_some());
    let second = SledStore::open(&cfg.store.sled(), Arc::new(policy()), 8192);
    assert!(matches!(
        second,
        Err(session_sidecar::session::StoreError::Locked { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_behind_sentinel_keeps_the_store_contract() {
    let Some(set) = common::SentinelSet::start() else {
        return;
    };
    redis_suite_on(|prefix| set.store_toml(prefix), false).await;
    let s = Arc::new(redis_store(&set.store_toml("listen:"), false).await) as Arc<dyn Store>;
    assert!(listening(&s).await, "end notices through the master");
    // The records went to the master the sentinels name, and reached its replica.
    let master = set.current_master();
    assert_eq!(master, set.master_port);
    let keys = common::redis_cli(master, &["DBSIZE"]);
    assert_ne!(keys, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_keeps_the_store_contract_sealed_or_not() {
    let Some(cluster) = common::RedisCluster::start() else {
        return;
    };
    for sealed in [false, true] {
        redis_suite_on(|prefix| cluster.store_toml(prefix), sealed).await;
    }
    // The cells went to every master, by slot.
    let per_node = cluster.keys_per_node();
    assert!(
        per_node.iter().all(|&k| k > 0),
        "keys per node: {per_node:?}"
    );
    // End notices: a script's PUBLISH on any master reaches the one subscription (the suite's
    // checks above waited for them once listening).
    let store = redis_store(&cluster.store_toml("handles:"), false).await;
    let s = Arc::new(redis_store(&cluster.store_toml("listen:"), false).await) as Arc<dyn Store>;
    assert!(listening(&s).await, "end notices on a cluster");
    // An admin look-up by handle walks every master.
    let keys: Vec<String> = (0..30).map(|_| id::generate()).collect();
    for k in &keys {
        store
            .create(k, &record(json!({"a": 1}), t0()))
            .await
            .unwrap();
    }
    for k in &keys {
        assert_eq!(
            store
                .find_handle(&id::handle(k))
                .await
                .unwrap()
                .map(|cell| cell.handle()),
            Some(id::handle(k))
        );
    }
}
