//! Model-based test over real HTTP: several simulated browsers send random sequences of session
//! changes through a running sidecar — set, delete, full dictionary, flush, flush with new data,
//! cycle, no-op, expiry, requests of several browsers at once, concurrent pairs on one session
//! (disjoint sets, double-clicked logins, a logout racing a change or a login), and a page's
//! polling request overlapping a login or a logout: one that left with the old key and reached the
//! sidecar after the login (or logout) landed, or one that was already at the sidecar while it
//! landed; the app answers the poll with nothing or with a change, and its answer mostly arrives
//! after the login's.
//!
//! Each browser keeps its cookie as a browser does: a jar of its own that applies `Set-Cookie` in
//! the order the answers arrive. The model is a plain map from session keys to what the contract
//! (docs/HEADERS.md §3, §4, and "Retired keys" as src/session/sessions.rs implements it) says they
//! hold: a live session, or a key retired by a cycle (forwarding to its successor) or a flush. For
//! every answer it predicts the status, what the app was shown, and what the answer does to the
//! browser's cookie, and takes the fresh key from the answer where one is due. Whether a browser is
//! logged in is judged from its jar alone: after every step, what the app sees on that browser's
//! next request must be the session the model holds under the key in the jar.
//!
//! A change that changes nothing in the session as its request loaded it is still decided against
//! the session as it is now (§4): landing after another request changed the same key it applies,
//! and in flight across a flush it deletes the stale cookie (§3). The model found the sidecar
//! answering such a change "unchanged" from the loaded copy; that is fixed, and the model holds it.
//!
//! Bounded here; the long form is `scripts/model.sh` (MODEL_SEEDS, MODEL_STEPS, MODEL_BROWSERS).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const COOKIE_AGE_S: u64 = 1000;
/// `[expiry] retired_grace`, left at its default: a key a cycle or a flush retired is told apart
/// from an unknown one this long.
const RETIRED_GRACE_S: u64 = 60;
/// How long a cycled key forwards the requests in flight with it: `upstream_timeout` (5 s in the
/// tests' sidecars) + 60 s.
const FORWARD_S: u64 = 65;
/// The forwards the store follows at most (src/session/entry.rs `MAX_HOPS`).
const MAX_HOPS: usize = 4;
const KEYS: [&str; 6] = ["a", "b", "cart", "user", "é", "k\u{7f}"];

type Dict = BTreeMap<String, Value>;

fn ms(s: u64) -> i64 {
    s as i64 * 1000
}

#[derive(Clone, Debug)]
enum Op {
    Set(String, Value),
    Delete(String),
    Full(Dict),
    Flush,
    FlushThenSet(String, Value),
    CycleAndSet(String, Value),
    Incr(String, i64),
    Append(String, Vec<Value>),
    /// A login: a new key, the subject tagged, the user stored.
    LoginAs(String),
    /// `X-Session-Revoke`: `all` (true) or `others`.
    Revoke(bool),
    /// "Log out everywhere" naming the subject: `X-Session-Subject`, `X-Session-Revoke: all`
    /// and a flash for the fresh (untagged) session.
    RevokeAllAs(String),
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
            Op::Incr(k, n) => vec![h("X-Session-Incr", wire(&json!({ k: n })))],
            Op::Append(k, items) => vec![h("X-Session-Append", wire(&json!({ k: items })))],
            Op::LoginAs(who) => vec![
                h("X-Session-Cycle", "1".into()),
                h("X-Session-Subject", who.clone()),
                h("X-Session-Set", one("user", &json!(who))),
            ],
            Op::Revoke(all) => vec![h(
                "X-Session-Revoke",
                if *all { "all" } else { "others" }.into(),
            )],
            Op::RevokeAllAs(who) => vec![
                h("X-Session-Subject", who.clone()),
                h("X-Session-Revoke", "all".into()),
                h("X-Session-Set", one("flash", &json!("bye"))),
            ],
            Op::Noop => vec![],
        }
    }

    /// The change as the sidecar reads it from the answer to a request whose app was shown
    /// `sent`: a full `X-Session` is diffed against `sent` (§2).
    fn change(&self, sent: &Dict) -> Change {
        let set = |k: &String, v: &Value| vec![(k.clone(), M::Set(v.clone()))];
        match self {
            Op::Set(k, v) => Change::ops(set(k, v)),
            Op::Delete(k) => Change::ops(vec![(k.clone(), M::Delete)]),
            Op::Full(d) => {
                let mut ops: Vec<_> = d
                    .iter()
                    .filter(|(k, v)| sent.get(*k) != Some(*v))
                    .map(|(k, v)| (k.clone(), M::Set(v.clone())))
                    .collect();
                ops.extend(
                    sent.keys()
                        .filter(|k| !d.contains_key(*k))
                        .map(|k| (k.clone(), M::Delete)),
                );
                Change::ops(ops)
            }
            Op::Incr(k, n) => Change::ops(vec![(k.clone(), M::Incr(*n))]),
            Op::Append(k, items) => Change::ops(vec![(k.clone(), M::Append(items.clone()))]),
            Op::LoginAs(who) => Change {
                cycle: true,
                subject: Some(who.clone()),
                ..Change::ops(set(&"user".to_string(), &json!(who)))
            },
            Op::Revoke(all) => Change {
                revoke: Some(*all),
                ..Change::default()
            },
            Op::RevokeAllAs(who) => Change {
                revoke: Some(true),
                subject: Some(who.clone()),
                ..Change::ops(set(&"flash".to_string(), &json!("bye")))
            },
            Op::Flush => Change {
                flush: true,
                ..Change::default()
            },
            Op::FlushThenSet(k, v) => Change {
                flush: true,
                ..Change::ops(set(k, v))
            },
            Op::CycleAndSet(k, v) => Change {
                cycle: true,
                ..Change::ops(set(k, v))
            },
            Op::Noop => Change::default(),
        }
    }
}

/// One per-key operation of the model.
#[derive(Debug, Clone)]
enum M {
    Set(Value),
    Delete,
    /// Adds to an integer (a missing key is 0); any other value makes the change unfit.
    Incr(i64),
    /// Appends to a list (a missing key is `[]`); any other value makes the change unfit.
    Append(Vec<Value>),
}

/// One answer's change: flush, cycle, per-key operations, a subject tagged, a revoke (`all`:
/// true).
#[derive(Debug, Default)]
struct Change {
    flush: bool,
    cycle: bool,
    ops: Vec<(String, M)>,
    subject: Option<String>,
    revoke: Option<bool>,
}

/// A change that does not fit the data it lands on (§2: 502, nothing stored).
#[derive(Debug)]
struct Unfit;

impl Change {
    fn ops(ops: Vec<(String, M)>) -> Change {
        Change {
            ops,
            ..Change::default()
        }
    }

    fn is_empty(&self) -> bool {
        !self.flush
            && !self.cycle
            && self.ops.is_empty()
            && self.subject.is_none()
            && self.revoke.is_none()
    }

    /// The data after the operations, and whether it is to be saved: it changed (or the key
    /// cycles) and is not empty.
    fn apply(&self, data: &Dict) -> Result<(Dict, bool), Unfit> {
        let mut d = data.clone();
        let mut changed = false;
        for (k, op) in &self.ops {
            match (op, d.get(k)) {
                (M::Set(v), held) if held != Some(v) => {
                    d.insert(k.clone(), v.clone());
                    changed = true;
                }
                (M::Set(_), _) => {}
                (M::Delete, _) => changed |= d.remove(k).is_some(),
                (M::Incr(n), None) => {
                    d.insert(k.clone(), json!(n));
                    changed = true;
                }
                (M::Incr(n), Some(held)) => {
                    let held = held
                        .as_i64()
                        .filter(|_| held.is_i64() || held.is_u64())
                        .ok_or(Unfit)?;
                    if *n != 0 {
                        d.insert(k.clone(), json!(held + n));
                        changed = true;
                    }
                }
                (M::Append(items), None) => {
                    d.insert(k.clone(), Value::Array(items.clone()));
                    changed = true;
                }
                (M::Append(items), Some(Value::Array(list))) => {
                    let mut list = list.clone();
                    list.extend(items.iter().cloned());
                    d.insert(k.clone(), Value::Array(list));
                    changed |= !items.is_empty();
                }
                (M::Append(_), Some(_)) => return Err(Unfit),
            }
        }
        // Tagging is a change (the session is saved).
        let save = !d.is_empty() && (changed || self.cycle || self.subject.is_some());
        Ok((d, save))
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

fn items(rng: &mut StdRng) -> Vec<Value> {
    (0..rng.gen_range(0..3)).map(|_| value(rng)).collect()
}

fn op(rng: &mut StdRng) -> Op {
    match rng.gen_range(0..28) {
        24 | 25 => Op::LoginAs(["alice", "bob"][rng.gen_range(0..2)].to_string()),
        26 => Op::Revoke(false),
        27 if rng.gen_bool(0.5) => Op::Revoke(true),
        27 => Op::RevokeAllAs(["alice", "bob"][rng.gen_range(0..2)].to_string()),
        20 | 21 => Op::Incr(key(rng), rng.gen_range(-3..10)),
        22 | 23 => Op::Append(key(rng), items(rng)),
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

/// Two requests of one browser in flight together, on a live session.
fn pair(rng: &mut StdRng) -> (Op, Op) {
    let (k1, k2) = ("left".to_string(), "right".to_string());
    match rng.gen_range(0..9) {
        // One key: whichever lands last decides (§4: against the latest stored state).
        4 => (Op::Set(k1.clone(), value(rng)), Op::Delete(k1)),
        // One key, both count: each adds to the value the other left.
        5 => (
            Op::Incr(k1.clone(), rng.gen_range(1..5)),
            Op::Incr(k1, rng.gen_range(-2..5)),
        ),
        6 => (
            Op::Append(k1.clone(), items(rng)),
            Op::Append(k1, items(rng)),
        ),
        7 => (Op::Incr(k1.clone(), 1), Op::Set(k1, value(rng))),
        8 => (
            Op::Append(k1.clone(), items(rng)),
            Op::CycleAndSet(k2, value(rng)),
        ),
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

/// What the model holds under a key.
#[derive(Clone, Debug)]
enum Cell {
    /// A session, live until `saved` + cookie_age.
    Live {
        data: Dict,
        saved: i64,
        subject: Option<String>,
    },
    /// A key retired at `at` by a cycle (`to`: the session's new key) or a flush (`None`).
    Retired { to: Option<String>, at: i64 },
}

/// What the sidecar found under the cookie a request came with.
#[derive(Clone, Debug)]
enum Loaded {
    Live {
        key: String,
        data: Dict,
        subject: Option<String>,
    },
    /// A key retired within the grace: new to the app; its answer leaves the cookie alone.
    Retired,
    /// No session; `carried`: the request came with a cookie (unknown, expired, retired long ago).
    Absent { carried: bool },
}

impl Loaded {
    /// The session the app is shown.
    fn sent(&self) -> Dict {
        match self {
            Loaded::Live { data, .. } => data.clone(),
            _ => Dict::new(),
        }
    }
}

/// What an answer does to the browser's session cookie.
#[derive(Clone, Debug, PartialEq)]
enum Cookie {
    Untouched,
    Set(String),
    Removed,
}

/// One answer, as the browser got it, and what the app was shown (when the app answered it).
#[derive(Debug)]
struct Answer {
    status: u16,
    cookie: Cookie,
    /// The status, the data and the subject the app was shown.
    seen: Option<(String, Value, Option<String>)>,
}

impl Answer {
    async fn read(resp: reqwest::Response) -> Answer {
        let status = resp.status().as_u16();
        let sets = set_cookies(&resp);
        assert!(sets.len() <= 1, "several session cookies: {sets:?}");
        let cookie = match sets.first() {
            None => Cookie::Untouched,
            Some(c) if c.contains("Max-Age=0") => Cookie::Removed,
            Some(c) => Cookie::Set(cookie_value(c)),
        };
        let seen = if status == 200 {
            let s: Seen = resp.json().await.unwrap();
            let subject = s.header("x-session-subject").map(str::to_string);
            Some((s.status().to_string(), s.session(), subject))
        } else {
            None
        };
        Answer {
            status,
            cookie,
            seen,
        }
    }

    /// The browser applies the answer's cookie as it arrives.
    fn apply_to(&self, jar: &mut Option<String>) {
        match &self.cookie {
            Cookie::Untouched => {}
            Cookie::Set(key) => *jar = Some(key.clone()),
            Cookie::Removed => *jar = None,
        }
    }
}

/// How often the interesting clauses came up in a run.
#[derive(Default, Debug, Clone, Copy)]
struct Counts {
    /// Requests that began with a key retired within the grace.
    retired: usize,
    /// ... whose change was dropped.
    dropped: usize,
    /// Requests in flight across a cycle whose change landed in the renamed session.
    forwarded: usize,
    /// Requests in flight across a flush (or past the forward) refused with 400.
    refused: usize,
    /// Requests in flight across a flush whose answer deleted the browser's cookie.
    stale_removed: usize,
    /// Increments and appends that met a value of another kind (502).
    unfit: usize,
    /// Increments and appends that landed.
    counted: usize,
    /// Sessions `X-Session-Revoke` ended.
    revoked: usize,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.retired += o.retired;
        self.dropped += o.dropped;
        self.forwarded += o.forwarded;
        self.refused += o.refused;
        self.stale_removed += o.stale_removed;
        self.unfit += o.unfit;
        self.counted += o.counted;
        self.revoked += o.revoked;
    }
}

/// The contract's view of the store.
#[derive(Default)]
struct Model {
    cells: HashMap<String, Cell>,
    counts: Counts,
}

impl Model {
    /// What a request that comes in now with `key` finds (§1, "Retired keys").
    fn load(&self, key: Option<&str>, now: i64) -> Loaded {
        let Some(key) = key else {
            return Loaded::Absent { carried: false };
        };
        match self.cells.get(key) {
            Some(Cell::Live {
                data,
                saved,
                subject,
            }) if saved + ms(COOKIE_AGE_S) > now => Loaded::Live {
                key: key.to_string(),
                data: data.clone(),
                subject: subject.clone(),
            },
            Some(Cell::Retired { at, .. }) if at + ms(RETIRED_GRACE_S) > now => Loaded::Retired,
            _ => Loaded::Absent { carried: true },
        }
    }

    /// The live session a request already in flight with `key` reaches now, following a cycle's
    /// forward (§4): its key, data, subject, and whether it was forwarded.
    fn resolve(&self, key: &str, now: i64) -> Option<(String, Dict, Option<String>, bool)> {
        let mut current = key.to_string();
        for hop in 0..=MAX_HOPS {
            match self.cells.get(&current) {
                Some(Cell::Live {
                    data,
                    saved,
                    subject,
                }) if saved + ms(COOKIE_AGE_S) > now => {
                    return Some((current, data.clone(), subject.clone(), hop > 0));
                }
                Some(Cell::Retired { to: Some(next), at }) if at + ms(FORWARD_S) > now => {
                    current = next.clone();
                }
                _ => return None,
            }
        }
        None
    }

    /// Checks the answer to a request that found `loaded`, answered by the app with `op` and
    /// landing now, and applies it to the model: the change, then a revoke (§2: after the change
    /// is stored, with the subject the session has then; `all` as a flush).
    fn commit(&mut self, loaded: &Loaded, op: &Op, now: i64, a: &Answer) -> Result<(), String> {
        let mut change = op.change(&loaded.sent());
        let flushed = change.flush;
        // The subject the answer names; under `all` it names whose sessions end and tags
        // nothing: the fresh session is logged out too.
        let named = change.subject.clone();
        if change.revoke == Some(true) {
            change.flush = true;
            change.subject = None;
        }
        self.commit_change(loaded, &change, now, a)?;
        let Some(all) = change.revoke else {
            return Ok(());
        };
        if a.status != 200 || matches!(loaded, Loaded::Retired) {
            return Ok(());
        }
        let before = named.clone().or(match loaded {
            Loaded::Live { subject, .. } => subject.clone(),
            _ => None,
        });
        let subject = if !all && flushed {
            change.subject.clone()
        } else {
            before
        };
        let kept = match (&a.cookie, loaded) {
            (Cookie::Set(k), _) => Some(k.clone()),
            (_, Loaded::Live { key, .. }) => self.resolve(key, now).map(|r| r.0),
            _ => None,
        };
        let Some(subject) = subject else {
            return Ok(());
        };
        let ended: Vec<String> = self
            .cells
            .iter()
            .filter(|(k, c)| {
                matches!(c, Cell::Live { subject: Some(t), saved, .. }
                    if *t == subject && saved + ms(COOKIE_AGE_S) > now)
                    && Some(*k) != kept.as_ref()
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in ended {
            self.cells.remove(&k);
            self.counts.revoked += 1;
        }
        Ok(())
    }

    fn commit_change(
        &mut self,
        loaded: &Loaded,
        change: &Change,
        now: i64,
        a: &Answer,
    ) -> Result<(), String> {
        if let Some((status, data, subject)) = &a.seen {
            let (expected, tag) = match loaded {
                Loaded::Live { subject, .. } => ("existing", subject.clone()),
                _ => ("new", None),
            };
            if (status.as_str(), data, subject) != (expected, &json!(loaded.sent()), &tag) {
                return Err(format!(
                    "the app was shown {status} {data} {subject:?}, the model says {expected} {} {tag:?}",
                    json!(loaded.sent())
                ));
            }
        }
        let cookie = match loaded {
            // "Retired keys": new to the app, the change dropped, the cookie untouched.
            Loaded::Retired => {
                self.counts.retired += 1;
                if change
                    .apply(&Dict::new())
                    .map_err(|_| "unfit on nothing")?
                    .1
                {
                    self.counts.dropped += 1;
                }
                Cookie::Untouched
            }
            Loaded::Absent { carried } => return self.fresh(change, now, *carried, a),
            Loaded::Live { key, .. } if change.flush => {
                // A logout ends the session the key reaches now (a login in flight renamed it).
                if let Some((current, ..)) = self.resolve(key, now) {
                    self.cells
                        .insert(current, Cell::Retired { to: None, at: now });
                }
                return self.fresh(change, now, true, a);
            }
            Loaded::Live {
                key, data: sent, ..
            } => match self.resolve(key, now) {
                // Ended while in flight (§3): refused if it would store something (as bad input
                // if it does not fit what the request loaded), else the stale cookie goes.
                None => match change.apply(sent) {
                    Err(Unfit) => {
                        self.counts.unfit += 1;
                        return expect(a, 502, Cookie::Untouched);
                    }
                    Ok((_, true)) => {
                        self.counts.refused += 1;
                        return expect(a, 400, Cookie::Untouched);
                    }
                    Ok((_, false)) => {
                        self.counts.stale_removed += 1;
                        Cookie::Removed
                    }
                },
                Some(_) if change.is_empty() => Cookie::Untouched,
                Some((current, data, subject, forwarded)) => {
                    let subject = change.subject.clone().or(subject);
                    self.counts.forwarded += usize::from(forwarded);
                    // Against the latest state: what does not fit it is bad input (502).
                    let Ok((after, save)) = change.apply(&data) else {
                        self.counts.unfit += 1;
                        return expect(a, 502, Cookie::Untouched);
                    };
                    self.counts.counted += change
                        .ops
                        .iter()
                        .filter(|(_, m)| matches!(m, M::Incr(_) | M::Append(_)))
                        .count();
                    if after.is_empty() {
                        self.cells.remove(&current);
                        if forwarded {
                            Cookie::Untouched
                        } else {
                            Cookie::Removed
                        }
                    } else if !save {
                        Cookie::Untouched
                    } else if change.cycle && !forwarded {
                        let new = self.fresh_key(a)?;
                        self.cells.insert(
                            current,
                            Cell::Retired {
                                to: Some(new.clone()),
                                at: now,
                            },
                        );
                        self.cells.insert(
                            new,
                            Cell::Live {
                                data: after,
                                saved: now,
                                subject,
                            },
                        );
                        return Ok(());
                    } else {
                        self.cells.insert(
                            current.clone(),
                            Cell::Live {
                                data: after,
                                saved: now,
                                subject,
                            },
                        );
                        // Landed in the session a cycle renamed: that cycle's answer carries the
                        // cookie, this one none.
                        if forwarded {
                            Cookie::Untouched
                        } else {
                            Cookie::Set(current)
                        }
                    }
                }
            },
        };
        expect(a, 200, cookie)
    }

    /// A visitor without a session (or after a flush): a new one if the change leaves data.
    fn fresh(&mut self, change: &Change, now: i64, stale: bool, a: &Answer) -> Result<(), String> {
        let (data, save) = change.apply(&Dict::new()).map_err(|_| "unfit on nothing")?;
        if !save {
            let cookie = if stale {
                Cookie::Removed
            } else {
                Cookie::Untouched
            };
            return expect(a, 200, cookie);
        }
        let key = self.fresh_key(a)?;
        self.cells.insert(
            key,
            Cell::Live {
                data,
                saved: now,
                subject: change.subject.clone(),
            },
        );
        Ok(())
    }

    /// The key of a session the answer created: set in the cookie, never seen before.
    fn fresh_key(&self, a: &Answer) -> Result<String, String> {
        match &a.cookie {
            Cookie::Set(key) if a.status == 200 && !self.cells.contains_key(key) => Ok(key.clone()),
            _ => Err(format!(
                "expected 200 with a new session's cookie, got {} {:?}",
                a.status, a.cookie
            )),
        }
    }
}

fn expect(a: &Answer, status: u16, cookie: Cookie) -> Result<(), String> {
    if (a.status, &a.cookie) == (status, &cookie) {
        Ok(())
    } else {
        Err(format!(
            "expected {status} {cookie:?}, got {} {:?}",
            a.status, a.cookie
        ))
    }
}

/// A simulated browser: its own connections and its own cookie jar.
struct Browser {
    client: reqwest::Client,
    jar: Option<String>,
}

struct Run {
    s: Sidecar,
    gate: std::sync::Arc<Gate>,
    browsers: Vec<Browser>,
    model: Model,
    requests: usize,
    seed: u64,
    step: usize,
}

impl Run {
    fn now(&self) -> i64 {
        self.s.now()
    }

    /// What a request browser `b` sends now would find.
    fn load(&self, b: usize) -> Loaded {
        self.model.load(self.browsers[b].jar.as_deref(), self.now())
    }

    /// Browser `b`'s request to `path`, with the cookie its jar holds now, that the app answers
    /// with `op`. Sent when spawned or awaited.
    fn request(&mut self, b: usize, op: &Op, path: &str) -> impl Future<Output = Answer> + use<> {
        self.requests += 1;
        let headers = op.headers();
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let browser = &self.browsers[b];
        let mut visit = self.s.get(&browser.client, path).reply(&pairs);
        if let Some(key) = &browser.jar {
            visit = visit.cookie(format!("sessionid={key}"));
        }
        async move { Answer::read(visit.send().await).await }
    }

    fn commit(&mut self, b: usize, loaded: &Loaded, op: &Op, a: &Answer, what: &str) {
        let now = self.now();
        if let Err(e) = self.model.commit(loaded, op, now, a) {
            panic!(
                "seed {} step {} browser {b} ({what}): {op:?} on {loaded:?}: {e}",
                self.seed, self.step
            );
        }
    }

    /// One request, answered and applied before anything else happens.
    async fn one(&mut self, b: usize, op: &Op, path: &str, what: &str) {
        let loaded = self.load(b);
        let a = self.request(b, op, path).await;
        self.commit(b, &loaded, op, &a, what);
        a.apply_to(&mut self.browsers[b].jar);
    }

    /// The browser's next request: what the app sees must be the session the model holds under
    /// the key in the browser's jar (and its answer is checked and applied like any other).
    async fn check(&mut self, b: usize, what: &str) {
        self.one(b, &Op::Noop, "/", &format!("the next request after {what}"))
            .await;
    }

    fn advance(&mut self, secs: u64) {
        self.s.clock.advance(Duration::from_secs(secs));
    }

    /// Browser `b` sends `poll` while it logs in or out with `login`. `in_flight`: the poll is
    /// already at the sidecar when the login lands; otherwise it left with the old key before the
    /// login's answer arrived and reaches the sidecar after the login landed. `held`: seconds the
    /// poll is held up after the login landed (past the grace or the forward). `poll_last`: its
    /// answer arrives after the login's, and is applied to the jar after it.
    async fn race(
        &mut self,
        b: usize,
        login: &Op,
        poll: &Op,
        in_flight: bool,
        held: u64,
        poll_last: bool,
    ) {
        let what = format!(
            "{poll:?} {} {login:?}{}, answered {}",
            if in_flight {
                "in flight across"
            } else {
                "sent with the key before"
            },
            if held > 0 {
                format!(", held up {held} s")
            } else {
                String::new()
            },
            if poll_last { "last" } else { "first" }
        );
        let (l, p, loaded_p) = if in_flight {
            let loaded_p = self.load(b);
            let p = tokio::spawn(self.request(b, poll, "/gate/poll"));
            self.gate.wait_arrival().await;
            let loaded_l = self.load(b);
            let l = self.request(b, login, "/login").await;
            self.commit(b, &loaded_l, login, &l, &what);
            self.advance(held);
            self.gate.open(1);
            let p = p.await.unwrap();
            self.commit(b, &loaded_p, poll, &p, &what);
            (l, p, loaded_p)
        } else {
            let loaded_l = self.load(b);
            let l = self.request(b, login, "/login").await;
            self.commit(b, &loaded_l, login, &l, &what);
            self.advance(held);
            // The jar still holds the old key: the login's answer has not arrived yet.
            let loaded_p = self.load(b);
            let p = self.request(b, poll, "/poll").await;
            self.commit(b, &loaded_p, poll, &p, &what);
            (l, p, loaded_p)
        };
        let jar = &mut self.browsers[b].jar;
        if poll_last {
            l.apply_to(jar);
            p.apply_to(jar);
        } else {
            p.apply_to(jar);
            l.apply_to(jar);
        }
        // The point of "Retired keys", whatever the model says: a poll that began with the key
        // the login or logout retired leaves the browser with the key that answer gave it.
        if let (Loaded::Retired, Cookie::Set(key)) = (&loaded_p, &l.cookie) {
            assert_eq!(
                jar.as_ref(),
                Some(key),
                "seed {} step {}: {what}",
                self.seed,
                self.step
            );
        }
        self.check(b, &what).await;
    }
}

async fn run(seed: u64, steps: usize, browsers: usize) -> (usize, Counts) {
    let (app, gate) = gated_app().await;
    let s = sidecar_for(app, &format!("[expiry]\ncookie_age = {COOKIE_AGE_S}")).await;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut r = Run {
        gate,
        browsers: (0..browsers)
            .map(|_| Browser {
                client: plain(),
                jar: None,
            })
            .collect(),
        model: Model::default(),
        s,
        requests: 0,
        seed,
        step: 0,
    };
    for step in 0..steps {
        r.step = step;
        let b = rng.gen_range(0..browsers);
        match rng.gen_range(0..17) {
            0 => {
                // Time passes: sometimes past the retired grace, sometimes past the expiry of
                // sessions not saved since.
                let secs = match rng.gen_range(0..6) {
                    0 => COOKIE_AGE_S / 2 + 1,
                    1 => RETIRED_GRACE_S + 1,
                    _ => 7,
                };
                r.advance(secs);
                for b in 0..browsers {
                    r.check(b, &format!("{secs} s passing")).await;
                }
            }
            3 | 4 => {
                // Several browsers at once, one request each: sessions do not interfere.
                let mut chosen: Vec<usize> = (0..browsers).collect();
                for i in (1..chosen.len()).rev() {
                    chosen.swap(i, rng.gen_range(0..=i));
                }
                chosen.truncate(rng.gen_range(2..=browsers.clamp(2, 4)));
                let mut sent = Vec::new();
                for c in chosen {
                    // A revoke ends other browsers' sessions: which of these requests lands
                    // first would decide the outcome, and the model commits them in turn.
                    let o = match op(&mut rng) {
                        Op::Revoke(_) | Op::RevokeAllAs(_) => Op::Noop,
                        o => o,
                    };
                    let loaded = r.load(c);
                    let answer = tokio::spawn(r.request(c, &o, "/many"));
                    sent.push((c, o, loaded, answer));
                }
                let mut done = Vec::new();
                for (c, o, loaded, answer) in sent {
                    let a = answer.await.unwrap();
                    r.commit(c, &loaded, &o, &a, "alongside other browsers");
                    a.apply_to(&mut r.browsers[c].jar);
                    done.push((c, o));
                }
                for (c, o) in done {
                    r.check(c, &format!("{o:?} alongside other browsers")).await;
                }
            }
            1 | 2 if matches!(r.load(b), Loaded::Live { .. }) => {
                let (x, y) = pair(&mut rng);
                // Both requests reach the app before either is answered (a double click is that
                // fast): each began before the other's change landed. Which lands first is random;
                // the browser applies the answers in the order they land.
                let order = if rng.r#gen() { [x, y] } else { [y, x] };
                let what = format!("pair {:?} then {:?}", order[0], order[1]);
                let loaded = r.load(b);
                let first = tokio::spawn(r.request(b, &order[0], "/gate/1"));
                r.gate.wait_arrival().await;
                let second = tokio::spawn(r.request(b, &order[1], "/gate/2"));
                r.gate.wait_arrival().await;
                r.gate.open(1);
                let a1 = first.await.unwrap();
                r.commit(b, &loaded, &order[0], &a1, &what);
                r.gate.open(1);
                let a2 = second.await.unwrap();
                r.commit(b, &loaded, &order[1], &a2, &what);
                a1.apply_to(&mut r.browsers[b].jar);
                a2.apply_to(&mut r.browsers[b].jar);
                r.check(b, &what).await;
            }
            8 => {
                // One user on several browsers; one of them revokes the others (after a password
                // change) or all (log out everywhere); then every browser's next request.
                let who = ["alice", "bob"][rng.gen_range(0..2)].to_string();
                let mut on: Vec<usize> =
                    (0..browsers).filter(|_| rng.gen_range(0..3) != 0).collect();
                on.push(b);
                on.sort();
                on.dedup();
                for &c in &on {
                    let login = Op::LoginAs(who.clone());
                    r.one(c, &login, "/login", "logging in before a revoke")
                        .await;
                }
                let revoke = Op::Revoke(rng.r#gen());
                r.one(b, &revoke, "/revoke", "a revoke").await;
                for c in 0..browsers {
                    r.check(c, &format!("{revoke:?} by browser {b} of {who}"))
                        .await;
                }
            }
            5..=7 => {
                // A page polls while its user logs in or out.
                let login = match rng.gen_range(0..4) {
                    0 | 1 => Op::CycleAndSet("user".into(), value(&mut rng)),
                    2 => Op::Flush,
                    _ => Op::FlushThenSet("flash".into(), value(&mut rng)),
                };
                let poll = if rng.r#gen() { Op::Noop } else { op(&mut rng) };
                let in_flight = rng.r#gen::<bool>();
                let held = match rng.gen_range(0..10) {
                    0 if in_flight => FORWARD_S + 1,
                    0 => RETIRED_GRACE_S + 1,
                    _ => 0,
                };
                let poll_last = rng.gen_range(0..4) != 0;
                r.race(b, &login, &poll, in_flight, held, poll_last).await;
            }
            _ => {
                let o = op(&mut rng);
                r.one(b, &o, "/step", &format!("{o:?}")).await;
                r.check(b, &format!("{o:?}")).await;
            }
        }
    }
    let (requests, counts) = (r.requests, r.model.counts);
    let _ = r.s.stop().await;
    (requests, counts)
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
    let mut counts = Counts::default();
    for seed in first..first + seeds as u64 {
        let (n, c) = run(seed, steps, browsers).await;
        requests += n;
        counts += c;
    }
    println!(
        "model: {seeds} seeds from {first}, {steps} steps each, {browsers} browsers, {requests} requests, 0 disagreements"
    );
    println!(
        "model: {} requests began with a retired key ({} changes dropped), {} in flight across a \
         cycle landed in the renamed session, {} in flight across a flush (or past the forward) \
         refused with 400, {} deleted a stale cookie; {} increments and appends landed in a \
         session, {} met a value of another kind (502); {} sessions ended by a revoke",
        counts.retired,
        counts.dropped,
        counts.forwarded,
        counts.refused,
        counts.stale_removed,
        counts.counted,
        counts.unfit,
        counts.revoked,
    );
    assert!(
        counts.retired > 0 && counts.forwarded > 0 && counts.counted > 0 && counts.revoked > 0,
        "the races did not come up: {counts:?}"
    );
}
