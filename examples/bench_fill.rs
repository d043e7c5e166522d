//! Fills a sled session store with N live sessions, as the benchmark's large-store scenario
//! needs (`bench/run.py --big`). Writes through the real store type, then syncs. It uses the
//! store's own API (`session::testing`), which examples get as the tests do.
//!
//! ```text
//! cargo run --release --example bench_fill -- /tmp/store 1000000
//! ```

use std::sync::Arc;

use serde_json::json;
use session_sidecar::Config;
use session_sidecar::session::testing::{SledStore, Store};
use session_sidecar::session::{Clock, Record, SystemClock, Upkeep, id};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("store path");
    let n: usize = args
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let config = Config::from_toml(&format!("[store]\npath = {path:?}\ndurable = false")).unwrap();
    let policy = Arc::new(config.expiry.policy(config.upstream_timeout));
    let store = SledStore::open(&config.store.sled(), policy.clone(), 8192).unwrap();
    let now = SystemClock.now();
    for i in 0..n {
        let mut r = Record::new(now);
        r.data = json!({"num_visits": 1, "filler": i})
            .as_object()
            .unwrap()
            .clone();
        r.deadline = policy.deadline(&r);
        store.create(&id::generate(), &r).await.unwrap();
    }
    store.sync().await.unwrap();
    println!("filled {path} with {n} sessions");
}
