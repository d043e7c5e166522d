//! Model-based test over real HTTP: several simulated browsers (real cookie-keeping clients)
//! send random sequences of session changes through a running sidecar — set, delete, full
//! dictionary, flush, flush with new data, cycle, no-op, expiry, requests of several browsers at
//! once, and concurrent pairs on one session (disjoint sets, double-clicked logins, a logout
//! racing a change or a login). After
//! every step each browser's session, as the app sees it, is checked against a plain model of
//! the contract.
//!
//! Bounded here; the long form is `scripts/model.sh` (MODEL_SEEDS, MODEL_STEPS, MODEL_BROWSERS).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const COOKIE_AGE_S: u64 = 1000;
const KEYS: [&str; 6] = ["a", "b", "cart", "user", "é", "k\u{7f}"];

type Dict = BTreeMap<String, Value>;

/// One browser's session as the contract says it must be: none, or a non-empty dictionary.
#[derive(Clone, Debug, Default)]
struct Model {
    data: Option<Dict>,
    /// Clock time of the last save (expiry counts from it).
    saved: i64,
}

#[derive(Clone, Debug)]
enum Op {
    Set(String, Value),
    Delete(String),
    Full(Dict),
    Flush,
    FlushThenSet(String, Value),
    CycleAndSet(String, Value),
    Noop,
}

impl Op {
    /// The response headers the app answers with.
    fn headers(&self) -> Vec<(String, String)> {
        let one = |k: &str, v: &Value| wire(&json!({ k: v }));
        let h = |n: &str, v: String| (n.to_string(), v);
        match self {
            Op::Set(k, v) => vec![h("X-Session-Set", one(k, v))],
            Op::Delete(k) => vec![h("X-Session-Delete", wire(&json!([k])))],
            Op::Full(d) => vec![h("X-Session", wire(&json!(d)))],
            Op::Flush => vec![h("X-Session-Flush", "1".into())],
            Op::FlushThenSet(k, v) => {
                vec![
                    h("X-Session-Flush", "true".into()),
                    h("X-Session-Set", one(k, v)),
                ]
            }
            Op::CycleAndSet(k, v) => vec![
                h("X-Session-Cycle", "1".into()),
                h("X-Session-Set", one(k, v)),
            ],
            Op::Noop => vec![],
        }
    }

    /// The model's step: what the session holds afterwards, and whether it was saved.
    fn apply(&self, before: &Option<Dict>) -> (Option<Dict>, bool) {
        let mut d = before.clone().unwrap_or_default();
        let saved = match self {
            Op::Set(k, v) => d.insert(k.clone(), v.clone()).as_ref() != Some(v),
            Op::Delete(k) => d.remove(k).is_some(),
            Op::Full(new) => {
                let changed = *new != d;
                d = new.clone();
                changed
            }
            Op::Flush => {
                d.clear();
                true
            }
            Op::FlushThenSet(k, v) => {
                d = Dict::from([(k.clone(), v.clone())]);
                true
            }
            Op::CycleAndSet(k, v) => {
                d.insert(k.clone(), v.clone());
                true
            }
            Op::Noop => false,
        };
        ((!d.is_empty()).then_some(d), saved)
    }
}

/// JSON as a header value must carry it: controls are escaped by serde_json, DEL by hand.
fn wire(v: &Value) -> String {
    v.to_string().replace('\u{7f}', "\\u007f")
}

fn value(rng: &mut StdRng) -> Value {
    match rng.gen_range(0..5) {
        0 => json!(rng.gen_range(-5..100)),
        1 => json!(rng.r#gen::<bool>()),
        2 => json!([rng.gen_range(0..9), "x", null]),
        _ => {
            let len = rng.gen_range(0..8);
            let s: String = (0..len)
                .map(|_| match rng.gen_range(0..4) {
                    0 => char::from_u32(rng.gen_range(0..0x80)).unwrap(),
                    1 => '\u{7f}',
                    2 => char::from_u32(rng.gen_range(0x80..0x3000)).unwrap_or('é'),
                    _ => '😀',
                })
                .collect();
            json!(s)
        }
    }
}

fn key(rng: &mut StdRng) -> String {
    KEYS[rng.gen_range(0..KEYS.len())].to_string()
}

fn op(rng: &mut StdRng) -> Op {
    match rng.gen_range(0..20) {
        0..=6 => Op::Set(key(rng), value(rng)),
        7..=9 => Op::Delete(key(rng)),
        10..=11 => {
            let n = rng.gen_range(0..3);
            Op::Full((0..n).map(|_| (key(rng), value(rng))).collect())
        }
        12 => Op::Flush,
        13 => Op::FlushThenSet(key(rng), value(rng)),
        14..=15 => Op::CycleAndSet(key(rng), value(rng)),
        _ => Op::Noop,
    }
}

/// Two requests of one browser in flight together, on a live session; each pair's outcome is
/// the same whichever lands first.
fn pair(rng: &mut StdRng) -> (Op, Op) {
    let (k1, k2) = ("left".to_string(), "right".to_string());
    match rng.gen_range(0..4) {
        0 => (Op::Set(k1, value(rng)), Op::Set(k2, value(rng))),
        1 => (
            Op::CycleAndSet(k1, value(rng)),
            Op::CycleAndSet(k2, value(rng)),
        ),
        2 => (Op::CycleAndSet(k1, value(rng)), Op::Set(k2, value(rng))),
        _ => (
            Op::Flush,
            if rng.r#gen() {
                Op::Set(k2, value(rng))
            } else {
                Op::CycleAndSet(k2, value(rng))
            },
        ),
    }
}

struct Run {
    s: Sidecar,
    gate: std::sync::Arc<Gate>,
    browsers: Vec<reqwest::Client>,
    models: Vec<Model>,
    requests: usize,
    seed: u64,
}

impl Run {
    async fn send(&mut self, b: usize, op: &Op) -> reqwest::StatusCode {
        self.requests += 1;
        let headers = op.headers();
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        self.browsers[b]
            .get(self.s.url("/step"))
            .header("x-test-reply", reply(&pairs))
            .send()
            .await
            .unwrap()
            .status()
    }

    fn expire(&mut self) {
        let now = self.s.now();
        for m in &mut self.models {
            if m.data.is_some() && now - m.saved >= (COOKIE_AGE_S * 1000) as i64 {
                m.data = None;
            }
        }
    }

    async fn check(&mut self, b: usize, step: usize, what: &str) {
        self.requests += 1;
        let seen = seen(self.browsers[b].get(self.s.url("/")).send().await.unwrap()).await;
        let model = &self.models[b].data;
        let expected = json!(model.clone().unwrap_or_default());
        let at = format!("seed {} step {step} browser {b} after {what}", self.seed);
        assert_eq!(seen.session(), expected, "{at}");
        let status = if model.is_some() { "existing" } else { "new" };
        assert_eq!(seen.status(), status, "{at}");
    }
}

async fn run(seed: u64, steps: usize, browsers: usize) -> usize {
    let (app, gate) = gated_app().await;
    let s = sidecar_for(app, &format!("[expiry]\ncookie_age = {COOKIE_AGE_S}")).await;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut r = Run {
        gate,
        browsers: (0..browsers).map(|_| browser()).collect(),
        models: vec![Model::default(); browsers],
        s,
        requests: 0,
        seed,
    };
    for step in 0..steps {
        let b = rng.gen_range(0..browsers);
        match rng.gen_range(0..14) {
            0 => {
                // Time passes: sometimes past the expiry of sessions not saved since.
                let secs = if rng.gen_range(0..4) == 0 {
                    COOKIE_AGE_S / 2 + 1
                } else {
                    7
                };
                r.s.clock.advance(Duration::from_secs(secs));
                r.expire();
                for b in 0..browsers {
                    r.check(b, step, "time passing").await;
                }
            }
            3 | 4 => {
                // Several browsers at once, one request each: sessions do not interfere.
                let mut chosen: Vec<usize> = (0..browsers).collect();
                for i in (1..chosen.len()).rev() {
                    chosen.swap(i, rng.gen_range(0..=i));
                }
                chosen.truncate(rng.gen_range(2..=browsers.clamp(2, 4)));
                let ops: Vec<(usize, Op)> = chosen.into_iter().map(|c| (c, op(&mut rng))).collect();
                let tasks: Vec<_> = ops
                    .iter()
                    .map(|(c, o)| {
                        let (client, url, headers) =
                            (r.browsers[*c].clone(), r.s.url("/many"), o.headers());
                        tokio::spawn(async move {
                            let pairs: Vec<(&str, &str)> = headers
                                .iter()
                                .map(|(n, v)| (n.as_str(), v.as_str()))
                                .collect();
                            client
                                .get(url)
                                .header("x-test-reply", reply(&pairs))
                                .send()
                                .await
                                .unwrap()
                                .status()
                        })
                    })
                    .collect();
                for ((c, o), t) in ops.iter().zip(tasks) {
                    assert_eq!(
                        t.await.unwrap(),
                        200,
                        "seed {seed} step {step}: browser {c} {o:?}"
                    );
                    r.requests += 1;
                    let (after, saved) = o.apply(&r.models[*c].data);
                    if saved || after.is_none() {
                        r.models[*c].saved = r.s.now();
                    }
                    r.models[*c].data = after;
                }
                for (c, o) in &ops {
                    r.check(*c, step, &format!("{o:?} alongside other browsers"))
                        .await;
                }
            }
            1 | 2 if r.models[b].data.is_some() => {
                let (x, y) = pair(&mut rng);
                // Both requests reach the app before either is answered (a double click is that
                // fast): each began before the other's change landed. Which lands first is random.
                let send = |c: reqwest::Client, op: &Op, url: String| {
                    let pairs = op.headers();
                    tokio::spawn(async move {
                        let pairs: Vec<(&str, &str)> = pairs
                            .iter()
                            .map(|(n, v)| (n.as_str(), v.as_str()))
                            .collect();
                        c.get(url)
                            .header("x-test-reply", reply(&pairs))
                            .send()
                            .await
                            .unwrap()
                            .status()
                    })
                };
                let x_first = rng.r#gen::<bool>();
                let order = if x_first { [&x, &y] } else { [&y, &x] };
                let first = send(r.browsers[b].clone(), order[0], r.s.url("/gate/1"));
                r.gate.wait_arrival().await;
                let second = send(r.browsers[b].clone(), order[1], r.s.url("/gate/2"));
                r.gate.wait_arrival().await;
                r.gate.open(1);
                let s1 = first.await.unwrap();
                r.gate.open(1);
                let s2 = second.await.unwrap();
                let (sx, sy) = if x_first { (s1, s2) } else { (s2, s1) };
                r.requests += 2;
                let before = r.models[b].data.clone();
                let after = match (&x, &y) {
                    (Op::Flush, _) => {
                        // The change lands before the logout and goes with it, or is refused
                        // after it (400): the session is gone either way.
                        assert!(
                            sx == 200 && (sy == 200 || sy == 400),
                            "seed {seed} step {step}: {sx} {sy}"
                        );
                        None
                    }
                    _ => {
                        assert_eq!(
                            (sx.as_u16(), sy.as_u16()),
                            (200, 200),
                            "seed {seed} step {step}"
                        );
                        let (mid, _) = x.apply(&before);
                        y.apply(&mid).0
                    }
                };
                r.models[b] = Model {
                    data: after,
                    saved: r.s.now(),
                };
                r.check(b, step, &format!("pair {x:?} ∥ {y:?}")).await;
            }
            _ => {
                let o = op(&mut rng);
                let status = r.send(b, &o).await;
                assert_eq!(status, 200, "seed {seed} step {step}: {o:?}");
                let (after, saved) = o.apply(&r.models[b].data);
                if saved || after.is_none() {
                    r.models[b].saved = r.s.now();
                }
                r.models[b].data = after;
                r.check(b, step, &format!("{o:?}")).await;
            }
        }
    }
    let requests = r.requests;
    let _ = r.s.stop().await;
    requests
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_browsers_agree_with_the_model() {
    let seeds = env("MODEL_SEEDS", 3);
    let steps = env("MODEL_STEPS", 150);
    let browsers = env("MODEL_BROWSERS", 4);
    let first = env("MODEL_FIRST_SEED", 1) as u64;
    let mut requests = 0;
    for seed in first..first + seeds as u64 {
        requests += run(seed, steps, browsers).await;
    }
    println!(
        "model: {seeds} seeds from {first}, {steps} steps each, {browsers} browsers, {requests} requests, 0 disagreements"
    );
}
