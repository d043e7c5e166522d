//! Prometheus metrics (docs/HEADERS.md §8), served by the admin listener as text.
//!
//! Names carry the `session_sidecar_` prefix; counters get `_total` from the encoder. Histogram
//! buckets start at 100 µs: the sidecar's own work is sub-millisecond, the upstream's is not.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::session::{Swept, Watch};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Class {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Status {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeaderLabel {
    pub header: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOp {
    pub op: &'static str,
    pub result: &'static str,
}

/// Shards of a [`Histogram`]: worker threads observe into their own (see [`set_shard`]).
const SHARDS: usize = 16;

thread_local! {
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes this thread's observations land in shard `n` (modulo the shard count): each worker
/// thread takes its own, so that two cores never fight over one histogram's lock per request.
pub fn set_shard(n: usize) {
    SHARD.set(n % SHARDS);
}

/// One shard's counts, on a cache line of its own.
#[derive(Debug)]
#[repr(align(128))]
struct Shard(std::sync::Mutex<Counts>);

#[derive(Debug, Clone)]
struct Counts {
    sum: f64,
    count: u64,
    /// Per bucket, not cumulative; the last bucket is +Inf.
    buckets: Vec<u64>,
}

/// A Prometheus histogram in per-thread shards, merged when scraped. The text it encodes is
/// the one prometheus-client's own `Histogram` encodes for the same observations (a test holds
/// that); observing costs one uncontended lock.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: Arc<[f64]>,
    shards: Arc<[Shard]>,
}

impl Histogram {
    pub fn new(bounds: impl Iterator<Item = f64>) -> Histogram {
        let bounds: Arc<[f64]> = bounds.chain(std::iter::once(f64::INFINITY)).collect();
        let counts = Counts {
            sum: 0.0,
            count: 0,
            buckets: vec![0; bounds.len()],
        };
        Histogram {
            shards: (0..SHARDS)
                .map(|_| Shard(std::sync::Mutex::new(counts.clone())))
                .collect(),
            bounds,
        }
    }

    pub fn observe(&self, v: f64) {
        let bucket = if v.is_nan() {
            self.bounds.len() - 1
        } else {
            self.bounds
                .iter()
                .position(|b| *b >= v)
                .unwrap_or(self.bounds.len() - 1)
        };
        let shard = &self.shards[SHARD.get()];
        let mut c = shard.0.lock().unwrap_or_else(|e| e.into_inner());
        c.sum += v;
        c.count += 1;
        c.buckets[bucket] += 1;
    }

    fn merged(&self) -> Counts {
        let mut all = Counts {
            sum: 0.0,
            count: 0,
            buckets: vec![0; self.bounds.len()],
        };
        for shard in self.shards.iter() {
            let c = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            all.sum += c.sum;
            all.count += c.count;
            for (a, b) in all.buckets.iter_mut().zip(&c.buckets) {
                *a += b;
            }
        }
        all
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let all = self.merged();
        let buckets: Vec<(f64, u64)> = self.bounds.iter().copied().zip(all.buckets).collect();
        encoder.encode_histogram::<NoLabelSet>(all.sum, all.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 16)
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<Class, Counter>,
    /// The `requests` counter of each standard status class (1xx..5xx), taken from the family
    /// once so that a request costs no label formatting or lookup.
    by_class: [std::sync::OnceLock<Counter>; 5],
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub sessions_created: Counter,
    pub sessions_flushed: Counter,
    pub sessions_cycled: Counter,
    /// Sessions an app's `X-Session-Revoke` ended.
    pub sessions_revoked: Counter,
    pub sessions_expired: Counter,
    pub merges: Counter,
    /// Changes not stored because their request presented a key retired moments ago.
    pub retired_key_changes_dropped: Counter,
    pub refusals: Family<Status, Counter>,
    pub bad_upstream_headers: Family<HeaderLabel, Counter>,
    pub store_operations: Family<StoreOp, Counter>,
    pub store_duration: Histogram,
    pub open_connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("session_sidecar");
        let m = Metrics {
            requests: Family::default(),
            by_class: Default::default(),
            request_duration: Histogram::new(latency_buckets()),
            upstream_duration: Histogram::new(latency_buckets()),
            sessions_created: Counter::default(),
            sessions_flushed: Counter::default(),
            sessions_cycled: Counter::default(),
            sessions_revoked: Counter::default(),
            sessions_expired: Counter::default(),
            merges: Counter::default(),
            retired_key_changes_dropped: Counter::default(),
            refusals: Family::default(),
            bad_upstream_headers: Family::default(),
            store_operations: Family::default(),
            store_duration: Histogram::new(exponential_buckets(0.00001, 2.0, 16)),
            open_connections: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "requests",
            "Responses sent, by status class",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from request head to response head",
            m.request_duration.clone(),
        );
        r.register(
            "upstream_duration_seconds",
            "Time the upstream took to answer the head",
            m.upstream_duration.clone(),
        );
        r.register(
            "sessions_created",
            "Sessions created",
            m.sessions_created.clone(),
        );
        r.register(
            "sessions_flushed",
            "Sessions ended by a flush or an admin delete",
            m.sessions_flushed.clone(),
        );
        r.register(
            "sessions_cycled",
            "Session keys cycled",
            m.sessions_cycled.clone(),
        );
        r.register(
            "sessions_revoked",
            "Sessions an app's X-Session-Revoke ended",
            m.sessions_revoked.clone(),
        );
        r.register(
            "sessions_expired",
            "Expired sessions removed by the sweeper",
            m.sessions_expired.clone(),
        );
        r.register(
            "merges",
            "Responses whose changes were merged into a stored session",
            m.merges.clone(),
        );
        r.register(
            "retired_key_changes_dropped",
            "Changes not stored: the request presented a key a cycle or a flush retired within retired_grace",
            m.retired_key_changes_dropped.clone(),
        );
        r.register(
            "refusals",
            "Responses the sidecar made itself, by status",
            m.refusals.clone(),
        );
        r.register(
            "bad_upstream_headers",
            "Malformed change headers from the upstream",
            m.bad_upstream_headers.clone(),
        );
        r.register(
            "store_operations",
            "Store operations, by operation and result",
            m.store_operations.clone(),
        );
        r.register(
            "store_duration_seconds",
            "Time per store operation",
            m.store_duration.clone(),
        );
        r.register(
            "open_connections",
            "Open client connections",
            m.open_connections.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn observe_request(&self, status: u16, elapsed: Duration) {
        let counter = |status: u16| {
            let class = format!("{}xx", status / 100);
            self.requests.get_or_create(&Class { class }).clone()
        };
        match self.by_class.get(usize::from(status / 100).wrapping_sub(1)) {
            Some(cached) => cached.get_or_init(|| counter(status)).inc(),
            None => counter(status).inc(),
        };
        self.request_duration.observe(elapsed.as_secs_f64());
    }
}

/// Counts and times every store operation.
impl Watch for Metrics {
    fn after(&self, op: &'static str, took: Duration, ok: bool) {
        self.store_duration.observe(took.as_secs_f64());
        let result = if ok { "ok" } else { "error" };
        self.store_operations
            .get_or_create(&StoreOp { op, result })
            .inc();
    }

    fn swept(&self, swept: &Swept) {
        self.sessions_expired.inc_by(swept.sessions as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn the_sharded_histogram_encodes_as_prometheus_clients_own() {
        use rand::Rng;
        let ours = Histogram::new(latency_buckets());
        let theirs = prometheus_client::metrics::histogram::Histogram::new(latency_buckets());
        let mut rng = rand::thread_rng();
        let values: Vec<f64> = (0..5000)
            .map(|i| match i % 50 {
                0 => f64::NAN,
                1 => 1e9,
                2 => 0.0001, // exactly a bound
                _ => rng.gen_range(0.0..10.0f64).powi(3) / 100.0,
            })
            .collect();
        // Observed from several threads, each in its own shard, as the workers do.
        std::thread::scope(|scope| {
            for (n, chunk) in values.chunks(1000).enumerate() {
                let ours = ours.clone();
                scope.spawn(move || {
                    set_shard(n);
                    for v in chunk {
                        ours.observe(*v);
                    }
                });
            }
        });
        for v in &values {
            theirs.observe(*v);
        }
        let text = |register: &dyn Fn(&mut Registry)| {
            let mut registry = Registry::default();
            register(&mut registry);
            let mut out = String::new();
            encode(&mut out, &registry).unwrap();
            out
        };
        let a = text(&|r| r.register("d", "help", ours.clone()));
        let b = text(&|r| r.register("d", "help", theirs.clone()));
        // NaN sums print alike; the rest must be the same text line for line.
        assert_eq!(a, b);
        assert!(a.contains("d_count 5000"), "{a}");
    }
}
