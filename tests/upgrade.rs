//! docs/HEADERS.md "Upgrades" and "What the store holds": stores written by the release before
//! (tests/fixtures/previous-release, made by its binary with `make.py` there), which kept each
//! session under its key in clear and each subject's index under the subject. This release
//! reads every session in them, follows their forwards, lists their subjects, and moves each one
//! to its digest at its next write or at the next sweep; after the sweep no key name, index
//! entry or value names a visitor.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};
use session_sidecar::Config;
use session_sidecar::session::changes::{Change, Op};
use session_sidecar::session::testing::SledStore;
use session_sidecar::session::testing::{Lookup, Store, Update, Updated};
use session_sidecar::session::{Millis, id};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/previous-release")
}

/// What the release before wrote, and what each of its sessions holds.
struct Previous {
    made_at: Millis,
    sessions: Vec<Value>,
}

fn previous(store: &str) -> Previous {
    let keys: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("keys.json")).unwrap()).unwrap();
    Previous {
        made_at: keys["made_at_ms"].as_i64().unwrap(),
        sessions: keys[store].as_array().unwrap().clone(),
    }
}

impl Previous {
    /// Every session key (cookies and cycled-from keys) and subject the release before wrote.
    fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for s in &self.sessions {
            for field in ["cookie", "cycled_from", "subject"] {
                if let Some(v) = s[field].as_str() {
                    names.push(v.to_string());
                }
            }
        }
        names
    }
}

fn set(k: &str, v: Value) -> Change {
    Change {
        ops: vec![Op::Set(k.into(), v)],
        ..Change::default()
    }
}

/// Every session reads back as the release before stored it, and every subject lists its one.
async fn reads_everything(store: &Arc<dyn Store>, prev: &Previous, now: Millis) {
    for s in &prev.sessions {
        let key = s["cookie"].as_str().unwrap();
        let Lookup::Live(record, _) = store.lookup(key, now).await.unwrap() else {
            panic!("{key} not live")
        };
        assert_eq!(Value::Object(record.data.clone()), s["data"], "{key}");
        assert_eq!(
            record.subject.as_deref(),
            s["subject"].as_str(),
            "{key}'s subject"
        );
        if let Some(subject) = s["subject"].as_str() {
            let listed = store.subject_sessions(subject, now).await.unwrap();
            assert_eq!(listed.len(), 1, "{subject}");
            assert_eq!(listed[0].0.handle(), id::handle(key));
        }
    }
}

#[tokio::test]
async fn a_sled_store_of_the_release_before_reads_and_leaves_the_clear_names() {
    let prev = previous("sled");
    let dir = tempfile::tempdir().unwrap();
    let unpacked = std::process::Command::new("tar")
        .arg("xzf")
        .arg(fixtures().join("sled.tar.gz"))
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(unpacked.success());
    let path = dir.path().join("sessions");
    let cfg =
        Config::from_toml(&format!("[store]\npath = {:?}", path.display().to_string())).unwrap();
    let policy = Arc::new(cfg.expiry.policy(cfg.upstream_timeout));
    // A minute after the release before wrote it: its cycle's forward still leads on.
    let now = prev.made_at + 60_000;
    let legacy_cells = sled::open(&path)
        .unwrap()
        .open_tree("records")
        .unwrap()
        .len();
    common::sled_lets_go(&path);
    assert_eq!(
        legacy_cells,
        prev.sessions.len() + 1,
        "the sessions and a forward"
    );
    {
        let store: Arc<dyn Store> =
            Arc::new(SledStore::open(&cfg.store.sled(), policy.clone(), 8192).unwrap());
        reads_everything(&store, &prev, now).await;
        // A request in flight with the key the login cycled lands in the renamed session.
        let cycled = prev
            .sessions
            .iter()
            .find(|s| s["cycled_from"].is_string())
            .unwrap();
        let updated = store
            .update(Update::new(
                cycled["cycled_from"].as_str().unwrap(),
                &set("late", json!(1)),
                now,
            ))
            .await
            .unwrap();
        assert!(
            matches!(
                updated,
                Updated::Saved {
                    forwarded: true,
                    ..
                }
            ),
            "{updated:?}"
        );
        // A write moves one session; the sweep moves the others.
        let first = prev.sessions[0]["cookie"].as_str().unwrap();
        store
            .update(Update::new(first, &set("visits", json!(4)), now))
            .await
            .unwrap();
        // Two cells moved at their write (the renamed session and `first`); the sweep moves the
        // others, the forward among them.
        let swept = store.sweep(now).await.unwrap();
        assert_eq!(swept.renamed, legacy_cells - 2, "{swept:?}");
        let Lookup::Live(r, _) = store.lookup(first, now).await.unwrap() else {
            panic!("moved away")
        };
        assert_eq!(r.data["visits"], json!(4));
        assert_eq!(r.data["big"].to_string(), "12345678901234567890");
    }
    // What the store holds now names no visitor: every tree's keys and values.
    common::sled_lets_go(&path);
    {
        let db = sled::open(&path).unwrap();
        let names = prev.names();
        for tree in db.tree_names() {
            for item in db.open_tree(&tree).unwrap().iter() {
                let (k, v) = item.unwrap();
                for bytes in [&k[..], &v[..]] {
                    assert_eq!(
                        common::named_in(bytes, &names),
                        None,
                        "tree {:?}",
                        String::from_utf8_lossy(&tree)
                    );
                }
            }
        }
        for legacy in ["records", "expiry", "subjects"] {
            assert!(db.open_tree(legacy).unwrap().is_empty(), "{legacy}");
        }
    }
    // And every session still reads, subjects and all.
    common::sled_lets_go(&path);
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&cfg.store.sled(), policy, 8192).unwrap());
    let mut after = prev;
    after.sessions[0]["data"]["visits"] = json!(4);
    for s in after
        .sessions
        .iter_mut()
        .filter(|s| s["cycled_from"].is_string())
    {
        s["data"]["late"] = json!(1);
    }
    reads_everything(&store, &after, now).await;
}

#[tokio::test]
async fn a_redis_dump_of_the_release_before_reads_and_leaves_the_clear_names() {
    let prev = previous("redis");
    let Some(server) = common::RedisServer::start_from_dump(&fixtures().join("dump.rdb")) else {
        return;
    };
    let names = prev.names();
    let before = common::redis_contents(&[server.port], "upgrade:");
    assert!(
        before
            .iter()
            .any(|(k, v)| common::named_in(k.as_bytes(), &names).is_some()
                || common::named_in(v.as_bytes(), &names).is_some()),
        "the dump names its visitors, as the release before wrote it"
    );
    let legacy_cells = before
        .iter()
        .filter(|(k, _)| k.starts_with("upgrade:r:"))
        .count();
    assert!(legacy_cells >= prev.sessions.len(), "{before:?}");
    let cfg = Config::from_toml(&server.store_toml("upgrade:")).unwrap();
    // Redis expires by its own clock: the release before's sessions live ten years, and its
    // forward (which lived a minute and a half) is gone.
    let now = session_sidecar::session::Clock::now(&session_sidecar::session::SystemClock);
    let storage = session_sidecar::Deps::open(&cfg).await.unwrap().store;
    let store = session_sidecar::session::testing::store_of(&storage);
    reads_everything(&store, &prev, now).await;
    let first = prev.sessions[0]["cookie"].as_str().unwrap();
    store
        .update(Update::new(first, &set("visits", json!(4)), now))
        .await
        .unwrap();
    let swept = store.sweep(now).await.unwrap();
    assert_eq!(swept.renamed, legacy_cells - 1, "{swept:?}");
    // One more sweep drops the subject sets of the release before.
    store.sweep(now).await.unwrap();
    for (k, v) in common::redis_contents(&[server.port], "upgrade:") {
        assert_eq!(common::named_in(k.as_bytes(), &names), None, "{k}");
        assert_eq!(
            common::named_in(v.as_bytes(), &names),
            None,
            "{k} holds {v}"
        );
        assert!(
            k.starts_with("upgrade:s:") || k.starts_with("upgrade:t:"),
            "{k} left"
        );
    }
    // The server's own dump now names no visitor either.
    assert_eq!(common::redis_cli(server.port, &["SAVE"]), "OK");
    let dump = std::fs::read(server.dir().join("dump.rdb")).unwrap();
    assert_eq!(common::named_in(&dump, &names), None);
    let mut after = prev;
    after.sessions[0]["data"]["visits"] = json!(4);
    reads_everything(&store, &after, now).await;
}
