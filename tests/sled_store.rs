//! The embedded store's own promises beyond the shared contract: records written by the
//! previous format still read, one bad record does not stop the sweeper, a long sweep leaves
//! the worker to requests, and the indexes stay true under racing writes of one key.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use session_sidecar::Config;
use session_sidecar::session::Upkeep;
use session_sidecar::session::changes::{Change, Op};
use session_sidecar::session::testing::Store;
use session_sidecar::session::testing::{BUCKET_MS, SledStore, Update};
use session_sidecar::session::{Clock, Millis, Policy, Record, SystemClock, id};

fn config(dir: &std::path::Path) -> Config {
    Config::from_toml(&format!(
        "[store]\npath = {:?}",
        dir.join("sessions").display().to_string()
    ))
    .unwrap()
}

fn policy() -> Arc<Policy> {
    let c = Config::from_toml("").unwrap();
    Arc::new(c.expiry.policy(Duration::from_secs(30)))
}

/// The expiry index key the store uses: the deadline's bucket, then the key.
fn index_key(deadline: Millis, key: &str) -> Vec<u8> {
    let bucket = (deadline as u64).div_ceil(BUCKET_MS as u64) * BUCKET_MS as u64;
    let mut v = bucket.to_be_bytes().to_vec();
    v.extend_from_slice(key.as_bytes());
    v
}

/// Writes raw entries into a store directory the way an earlier release (or a disk fault) left
/// them, with their expiry index entries.
fn plant(dir: &std::path::Path, entries: &[(&str, Millis, Vec<u8>)]) {
    let db = sled::open(dir.join("sessions")).unwrap();
    let records = db.open_tree("records").unwrap();
    let index = db.open_tree("expiry").unwrap();
    for (key, deadline, raw) in entries {
        records.insert(key.as_bytes(), raw.clone()).unwrap();
        index.insert(index_key(*deadline, key), &[]).unwrap();
    }
    db.flush().unwrap();
    drop((records, index, db));
    sled_lets_go(&dir.join("sessions"));
}

/// A session record byte for byte as release 0.1 wrote it (format 1: no version byte).
fn format_1(deadline: Millis, data: &str) -> Vec<u8> {
    let mut raw = vec![b'S'];
    raw.extend_from_slice(&deadline.to_be_bytes());
    raw.extend_from_slice(
        format!(
            r#"{{"data":{data},"created":{deadline},"saved":{deadline},"accessed":{deadline},"expiry":"Default","subject":null,"deadline":{deadline}}}"#
        )
        .as_bytes(),
    );
    raw
}

#[tokio::test]
async fn a_store_written_by_the_previous_format_serves_its_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let key = id::generate();
    let far = SystemClock.now() + 10 * 24 * 3600 * 1000;
    plant(dir.path(), &[(&key, far, format_1(far, r#"{"n":41}"#))]);
    let app = start_app(echo).await;
    let s = sidecar_at(app, "", dir.path()).await;
    // An old session is found, read, and changed; the record is rewritten in today's format.
    let seen = seen(
        plain()
            .get(s.url("/"))
            .header("cookie", format!("sessionid={key}"))
            .header("x-test-incr", "n")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(seen.status(), "existing");
    assert_eq!(seen.session(), json!({"n": 41}));
    let r = s.store.load(&key, s.now()).await.unwrap().unwrap();
    assert_eq!(r.data["n"], 42);
}

/// A session found under both names, its digest's and its key in clear, is what a write that
/// moves it leaves for a moment (the new cell first, then the old one removed, or the new one
/// taken back if the old one changed meanwhile), and what a crash between the two steps leaves
/// for good. The sweeper's move must not remove the old cell under such a write (the write
/// would then take back the only copy): it leaves it one pass, and removes it at the next.
#[tokio::test]
async fn the_sweeper_leaves_a_cell_being_moved_by_a_write_to_that_write() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemClock.now();
    let far = now + 10 * 24 * 3600 * 1000;
    let key = id::generate();
    {
        let store = SledStore::open(&config(dir.path()).store.sled(), policy(), 8192).unwrap();
        let mut r = Record::new(now);
        r.data.insert("n".into(), json!(7));
        r.deadline = far;
        assert!(store.create(&key, &r).await.unwrap());
    }
    sled_lets_go(&dir.path().join("sessions"));
    plant(dir.path(), &[(&key, far, format_1(far, r#"{"n":6}"#))]);
    let store = SledStore::open(&config(dir.path()).store.sled(), policy(), 8192).unwrap();
    assert_eq!(store.len(), 2);
    assert_eq!(store.sweep(now).await.unwrap().renamed, 0);
    assert_eq!(
        store.len(),
        2,
        "the old cell is left to the write moving it"
    );
    store.sweep(now).await.unwrap();
    assert_eq!(store.len(), 1, "the old cell is gone at the next pass");
    let r = store.load(&key, now).await.unwrap().unwrap();
    assert_eq!(r.data["n"], 7, "the digest's cell wins");
}

#[tokio::test]
async fn one_corrupt_record_does_not_stop_the_sweeper() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemClock.now();
    let past = now - 60_000;
    let mut bad_body = vec![b'S'];
    bad_body.extend_from_slice(&(past - 20_000).to_be_bytes());
    bad_body.extend_from_slice(b"\x02{not json");
    let (bad, worse) = ("0".repeat(64), "1".repeat(64));
    plant(
        dir.path(),
        &[
            (&bad, past - 20_000, bad_body),
            (&worse, past - 20_000, b"??".to_vec()),
        ],
    );
    let store = SledStore::open(&config(dir.path()).store.sled(), policy(), 8192).unwrap();
    let mut expired = Vec::new();
    for i in 0..5 {
        let key = id::generate();
        let mut r = Record::new(past - 1000);
        r.data.insert("i".into(), json!(i));
        r.deadline = past;
        assert!(store.create(&key, &r).await.unwrap());
        expired.push(key);
    }
    let swept = store
        .sweep(now)
        .await
        .expect("the sweep carries on past bad records");
    assert_eq!(
        swept.sessions, 6,
        "five expired sessions and the decodable-head corrupt one"
    );
    for key in &expired {
        assert!(store.load(key, now - 120_000).await.unwrap().is_none());
    }
    // A second pass is clean too: the unreadable record's index entry is gone.
    assert_eq!(store.sweep(now).await.unwrap().sessions, 0);
}

#[test]
fn a_long_sweep_leaves_the_worker_to_other_tasks() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&config(dir.path()).store.sled(), policy(), 8192).unwrap();
        let now = SystemClock.now();
        for _ in 0..3000 {
            let mut r = Record::new(now - 10_000);
            r.data.insert("a".into(), json!(1));
            r.deadline = now - 5_000;
            store.create(&id::generate(), &r).await.unwrap();
        }
        let ticks = Arc::new(AtomicUsize::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                t.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        });
        tokio::task::yield_now().await;
        let before = ticks.load(Ordering::SeqCst);
        let swept = store.sweep(now).await.unwrap();
        let during = ticks.load(Ordering::SeqCst) - before;
        ticker.abort();
        assert_eq!(swept.sessions, 3000);
        assert!(
            during >= 5,
            "other tasks ran only {during} times during the sweep"
        );
    });
}

#[test]
fn racing_tag_and_untag_leave_the_subject_index_true() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let store: Arc<dyn Store> =
            Arc::new(SledStore::open(&cfg.store.sled(), policy(), 8192).unwrap());
        let now = SystemClock.now();
        let key = id::generate();
        let mut r = Record::new(now);
        r.data.insert("a".into(), json!(1));
        r.deadline = now + 3_600_000;
        store.create(&key, &r).await.unwrap();
        let change = |subject: Option<&str>, n: i64| Change {
            ops: vec![Op::Set("n".into(), json!(n))],
            subject: Some(subject.map(str::to_string)),
            ..Change::default()
        };
        let mut lost = 0;
        for round in 0..1500i64 {
            let tasks: Vec<_> = [Some("u"), None, Some("u"), None]
                .into_iter()
                .enumerate()
                .map(|(i, subject)| {
                    let (store, key) = (store.clone(), key.clone());
                    let c = change(subject, round * 4 + i as i64);
                    tokio::spawn(
                        async move { store.update(Update::new(&key, &c, now)).await.unwrap() },
                    )
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let tagged = store
                .load(&key, now)
                .await
                .unwrap()
                .unwrap()
                .subject
                .is_some();
            let listed = subject_handles(&store, "u", now)
                .await
                .contains(&id::handle(&key));
            if tagged != listed {
                lost += 1;
            }
        }
        assert_eq!(
            lost, 0,
            "rounds whose subject index disagreed with the record"
        );
    });
}

/// Whether any file of the store directory holds `word`.
fn on_disk(dir: &std::path::Path, word: &str) -> bool {
    let mut found = false;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                found |= bytes.windows(word.len()).any(|w| w == word.as_bytes());
            }
        }
    }
    found
}

#[tokio::test]
async fn with_a_secret_no_session_data_reaches_the_disk_in_clear() {
    use session_sidecar::session::Codec;
    for sealed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions");
        {
            let codec = if sealed {
                Codec::sealed("an operator's secret, 32 bytes or longer", &[])
            } else {
                Codec::plain()
            };
            let store = SledStore::open(&config(dir.path()).store.sled(), policy(), 8192)
                .unwrap()
                .sealed(codec);
            let now = SystemClock.now();
            let mut r = Record::new(now);
            r.data.insert("card".into(), json!("4111-1111-1111-1111"));
            r.deadline = now + 60_000;
            assert!(store.create(&id::generate(), &r).await.unwrap());
            store.sync().await.unwrap();
        }
        sled_lets_go(&path);
        // In clear without a secret (so the scan can see a record at all), never with one.
        assert_eq!(
            on_disk(&path, "4111-1111-1111-1111"),
            !sealed,
            "sealed: {sealed}"
        );
    }
}

/// Copies a store directory (sled's files, its blobs, the write-ahead log) to `to`.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A power cut. sled's own files are made durable only at checkpoints, so the oldest state a
/// cut can leave them in is the last checkpoint's (later writes of sled's were never synced);
/// every change acknowledged since is in the write-ahead log alone, synced before each
/// acknowledgement. The image of such a cut — sled's files copied right after a checkpoint, the
/// log files as they are after more acknowledged changes (created, changed, tagged, removed
/// sessions) — opens with every acknowledged change and nothing that was undone.
#[tokio::test]
async fn every_change_acknowledged_since_the_last_checkpoint_survives_a_power_cut() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let path = dir.path().join("sessions");
    let now = SystemClock.now();
    let store = SledStore::open(&cfg.store.sled(), policy(), 8192).unwrap();
    let record = |n: i64| {
        let mut r = Record::new(now);
        r.data.insert("n".into(), json!(n));
        r.deadline = now + 3_600_000;
        r
    };
    let before: Vec<String> = (0..20).map(|_| id::generate()).collect();
    for (i, key) in before.iter().enumerate() {
        assert!(store.create(key, &record(i as i64)).await.unwrap());
    }
    store.sync().await.unwrap();
    // The readiness probe checkpoints: sled's files are durable as of now.
    store.ping().await.unwrap();
    let image = tempfile::tempdir().unwrap();
    let cut = image.path().join("sessions");
    copy_dir(&path, &cut);
    // Since the checkpoint, each acknowledged: new sessions, changed and tagged ones, ended ones.
    let after: Vec<String> = (0..20).map(|_| id::generate()).collect();
    for (i, key) in after.iter().enumerate() {
        assert!(store.create(key, &record(1000 + i as i64)).await.unwrap());
        store.sync().await.unwrap();
    }
    for (i, key) in before.iter().enumerate().take(10) {
        let change = Change {
            ops: vec![Op::Set("n".into(), json!(500 + i as i64))],
            subject: Some(Some("ann".into())),
            ..Change::default()
        };
        store.update(Update::new(key, &change, now)).await.unwrap();
        store.sync().await.unwrap();
    }
    for key in &before[10..15] {
        store.remove(key).await.unwrap();
        store.sync().await.unwrap();
    }
    for name in ["wal-a", "wal-b"] {
        std::fs::copy(path.join(name), cut.join(name)).unwrap();
    }
    drop(store);
    sled_lets_go(&path);

    let cfg = config(image.path());
    let store = SledStore::open(&cfg.store.sled(), policy(), 8192).unwrap();
    let n = |r: Record| r.data["n"].as_i64().unwrap();
    for (i, key) in before.iter().enumerate() {
        let loaded = store.load(key, now).await.unwrap();
        match i {
            0..10 => {
                let r = loaded.unwrap_or_else(|| panic!("changed session {i} lost"));
                assert_eq!(r.subject.as_deref(), Some("ann"), "session {i}");
                assert_eq!(n(r), 500 + i as i64, "session {i}");
            }
            10..15 => assert!(loaded.is_none(), "ended session {i} is back"),
            _ => assert_eq!(n(loaded.unwrap()), i as i64, "session {i}"),
        }
    }
    for (i, key) in after.iter().enumerate() {
        let r = store.load(key, now).await.unwrap();
        assert_eq!(r.map(n), Some(1000 + i as i64), "new session {i}");
    }
    // The subject's index came back with the records: all ten tagged sessions are found.
    assert_eq!(store.subject_sessions("ann", now).await.unwrap().len(), 10);
}

/// A kill -9 can leave sled's files ahead of the write-ahead log: sled writes its buffers out
/// when it likes, so a change applied (and logged only in memory) before the crash may be in
/// sled's files. Here that change re-tags a session, which drops its entry in the old subject's
/// index; the log's last word on the session is an earlier change that kept the old tag. Replay
/// puts that state back (the re-tag was never acknowledged) — and its index entry with it, or
/// "log out everywhere" of the old subject would miss a session tagged with it.
#[tokio::test]
async fn a_session_replayed_over_a_later_unlogged_change_is_found_by_its_subject() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let path = dir.path().join("sessions");
    let now = SystemClock.now();
    let store = SledStore::open(&cfg.store.sled(), policy(), 8192).unwrap();
    let key = id::generate();
    let mut r = Record::new(now);
    r.data.insert("n".into(), json!(1));
    r.deadline = now + 3_600_000;
    assert!(store.create(&key, &r).await.unwrap());
    let change = |n: i64, subject: Option<&str>| Change {
        ops: vec![Op::Set("n".into(), json!(n))],
        subject: subject.map(|s| Some(s.to_string())),
        ..Change::default()
    };
    store
        .update(Update::new(&key, &change(2, Some("ann")), now))
        .await
        .unwrap();
    store.sync().await.unwrap();
    // The tag and its index entry are now in sled's durable files; the log starts afresh.
    store.ping().await.unwrap();
    // A change that keeps the tag: the log's last word on the session.
    store
        .update(Update::new(&key, &change(3, None), now))
        .await
        .unwrap();
    store.sync().await.unwrap();
    let logged = tempfile::tempdir().unwrap();
    for name in ["wal-a", "wal-b"] {
        std::fs::copy(path.join(name), logged.path().join(name)).unwrap();
    }
    // The re-tag reaches sled's files (a checkpoint stands in for sled's own write-out) but,
    // as far as the crash image goes, not the log.
    store
        .update(Update::new(&key, &change(4, Some("bob")), now))
        .await
        .unwrap();
    store.sync().await.unwrap();
    store.ping().await.unwrap();
    drop(store);
    sled_lets_go(&path);
    for name in ["wal-a", "wal-b"] {
        std::fs::copy(logged.path().join(name), path.join(name)).unwrap();
    }

    let store = SledStore::open(&cfg.store.sled(), policy(), 8192).unwrap();
    let r = store.load(&key, now).await.unwrap().unwrap();
    assert_eq!(
        (r.data["n"].as_i64(), r.subject.as_deref()),
        (Some(3), Some("ann"))
    );
    let found = store.subject_sessions("ann", now).await.unwrap();
    assert_eq!(
        found.len(),
        1,
        "the replayed session is missing from its subject's index"
    );
}
