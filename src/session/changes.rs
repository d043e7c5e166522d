//! One response's changes and the per-key merge that applies them.
//!
//! The upstream's full `X-Session` dictionary is turned into per-key operations by diffing it
//! against what the upstream was sent, so that two concurrent requests that change different keys
//! both keep their change when their operations are applied to the latest stored record.

use serde_json::Value;

use super::{Data, ExpiryMode, Millis, Policy, Record, json};

/// One data operation, in header order.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Set(String, Value),
    Delete(String),
}

/// Everything a response asks of the session, already parsed and validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    pub flush: bool,
    pub cycle: bool,
    pub ops: Vec<Op>,
    pub expiry: Option<ExpiryMode>,
    /// `Some(None)` removes the tag.
    pub subject: Option<Option<String>>,
}

impl Change {
    /// Whether the response asked for nothing at all.
    pub fn is_empty(&self) -> bool {
        !self.flush
            && !self.cycle
            && self.ops.is_empty()
            && self.expiry.is_none()
            && self.subject.is_none()
    }
}

/// The operations that turn `from` into `to`.
pub fn diff(from: &Data, to: &Data) -> Vec<Op> {
    let mut ops = Vec::new();
    for (k, v) in to {
        if from.get(k) != Some(v) {
            ops.push(Op::Set(k.clone(), v.clone()));
        }
    }
    for k in from.keys() {
        if !to.contains_key(k) {
            ops.push(Op::Delete(k.clone()));
        }
    }
    ops
}

/// What applying a change did to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effect {
    /// The record must be written (data, expiry, subject or key changed, or a forced save).
    pub save: bool,
    /// The data is empty afterwards: the record is to be removed.
    pub empty: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the session would be {size} bytes, over max_session_bytes = {max}")]
pub struct TooLarge {
    pub size: usize,
    pub max: usize,
}

/// Applies the data, expiry and subject parts of `change` (not flush or cycle, which move keys)
/// to `record` and refreshes its timestamps and deadline when it is to be saved.
///
/// `force_save` is `save_every_request`. On `Err` the record may be partly changed: callers
/// apply to a copy and drop it.
pub fn apply(
    record: &mut Record,
    change: &Change,
    policy: &Policy,
    now: Millis,
    max_bytes: usize,
    force_save: bool,
) -> Result<Effect, TooLarge> {
    let mut data_changed = false;
    for op in &change.ops {
        match op {
            Op::Set(k, v) => {
                if record.data.get(k) != Some(v) {
                    record.data.insert(k.clone(), v.clone());
                    data_changed = true;
                }
            }
            Op::Delete(k) => data_changed |= record.data.remove(k).is_some(),
        }
    }
    if let Some(mode) = &change.expiry {
        record.expiry = mode.clone();
    }
    if let Some(subject) = &change.subject {
        record.subject = subject.clone();
    }
    let modified =
        data_changed || change.expiry.is_some() || change.subject.is_some() || change.cycle;
    let empty = record.data.is_empty();
    let save = !empty && (modified || force_save);
    if save {
        if data_changed {
            let size = json::encode_ascii(&record.data).len();
            if size > max_bytes {
                return Err(TooLarge {
                    size,
                    max: max_bytes,
                });
            }
        }
        record.saved = now;
        record.accessed = now;
        record.deadline = policy.deadline(record);
    }
    Ok(Effect { save, empty })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data(v: Value) -> Data {
        v.as_object().unwrap().clone()
    }

    fn policy() -> Policy {
        let cfg = crate::config::Config::from_toml("").unwrap();
        cfg.expiry.policy(std::time::Duration::from_secs(30))
    }

    fn set(ops: Vec<Op>) -> Change {
        Change {
            ops,
            ..Change::default()
        }
    }

    #[test]
    fn diff_then_apply_gives_the_target() {
        let a = data(json!({"x": 1, "y": [1, 2], "z": "gone"}));
        let b = data(json!({"x": 2, "y": [1, 2], "w": {"n": null}}));
        let mut r = Record::new(0);
        r.data = a.clone();
        let ops = diff(&a, &b);
        assert_eq!(ops.len(), 3, "y is unchanged: {ops:?}");
        apply(&mut r, &set(ops), &policy(), 1, 8192, false).unwrap();
        assert_eq!(r.data, b);
    }

    #[test]
    fn echoing_the_session_is_a_no_op() {
        let a = data(json!({"x": 1}));
        assert!(diff(&a, &a).is_empty());
        let mut r = Record::new(0);
        r.data = a.clone();
        let e = apply(&mut r, &set(diff(&a, &a)), &policy(), 5, 8192, false).unwrap();
        assert!(!e.save && !e.empty);
        assert_eq!(r.saved, 0);
    }

    #[test]
    fn disjoint_changes_both_survive_in_either_order() {
        let base = data(json!({"a": 0, "b": 0}));
        let c1 = set(diff(&base, &data(json!({"a": 1, "b": 0}))));
        let c2 = set(diff(&base, &data(json!({"a": 0, "b": 2}))));
        for (first, second) in [(&c1, &c2), (&c2, &c1)] {
            let mut r = Record::new(0);
            r.data = base.clone();
            apply(&mut r, first, &policy(), 1, 8192, false).unwrap();
            apply(&mut r, second, &policy(), 2, 8192, false).unwrap();
            assert_eq!(r.data, data(json!({"a": 1, "b": 2})));
        }
    }

    #[test]
    fn deleting_the_last_key_empties_the_record() {
        let mut r = Record::new(0);
        r.data = data(json!({"a": 1}));
        let e = apply(
            &mut r,
            &set(vec![Op::Delete("a".into())]),
            &policy(),
            1,
            8192,
            false,
        )
        .unwrap();
        assert!(e.empty && !e.save);
    }

    #[test]
    fn a_change_over_the_size_cap_is_refused() {
        let mut r = Record::new(0);
        let big = "é".repeat(100); // 600 bytes once escaped
        let err = apply(
            &mut r,
            &set(vec![Op::Set("k".into(), json!(big))]),
            &policy(),
            1,
            500,
            false,
        )
        .unwrap_err();
        assert!(err.size > 500);
    }

    #[test]
    fn a_subject_or_expiry_alone_is_a_modification() {
        let mut r = Record::new(0);
        r.data = data(json!({"a": 1}));
        let c = Change {
            subject: Some(Some("u1".into())),
            ..Change::default()
        };
        assert!(apply(&mut r, &c, &policy(), 9, 8192, false).unwrap().save);
        assert_eq!(r.subject.as_deref(), Some("u1"));
        assert_eq!(r.saved, 9);
    }
}
