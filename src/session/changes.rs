//! One response's changes and the per-key merge that applies them.
//!
//! The upstream's full `X-Session` dictionary is turned into per-key operations by diffing it
//! against what the upstream was sent, so that two concurrent requests that change different keys
//! both keep their change when their operations are applied to the latest stored record.

use num_bigint::BigInt;
use serde_json::{Number, Value};

use super::{Data, ExpiryMode, Millis, Policy, Record, json};

/// One data operation, in header order.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Set(String, Value),
    Delete(String),
    /// Add to the integer stored at the key (a missing key counts as 0), any size.
    Incr(String, BigInt),
    /// Append to the list stored at the key (a missing key starts an empty list).
    Append(String, Vec<Value>),
}

/// The integer a JSON number token holds, if it is one: `-?digits`, any size (`1.0` and `1e3`
/// are not integers).
pub fn integer(n: &Number) -> Option<BigInt> {
    let text = n.to_string();
    let digits = text.strip_prefix('-').unwrap_or(&text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `X-Session-Revoke`: which of the subject's sessions end once the change is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoke {
    /// Every other session of the subject (after a password change).
    Others,
    /// Those, and this one as with a flush ("log out everywhere").
    All,
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
    pub revoke: Option<Revoke>,
}

impl Change {
    /// Whether the response asked for nothing at all.
    pub fn is_empty(&self) -> bool {
        !self.flush
            && !self.cycle
            && self.ops.is_empty()
            && self.expiry.is_none()
            && self.subject.is_none()
            && self.revoke.is_none()
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

/// Why a change does not fit the stored session: bad upstream input (502), and the session
/// stays exactly as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    /// An increment of a key that holds something other than an integer.
    #[error("the session's {key:?} holds {held}, not an integer")]
    NotAnInteger { key: String, held: String },
    /// An append to a key that holds something other than a list.
    #[error("the session's {key:?} holds {held}, not a list")]
    NotAList { key: String, held: String },
}

impl Unfit {
    /// The change headers (suffixes after the prefix) that carried what does not fit.
    pub fn suffixes(&self) -> &'static [&'static str] {
        match self {
            Unfit::TooLarge(_) => &["", "-set", "-delete", "-incr", "-append"],
            Unfit::NotAnInteger { .. } => &["-incr"],
            Unfit::NotAList { .. } => &["-append"],
        }
    }
}

/// A stored value as a short text for a message.
fn shown(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
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
) -> Result<Effect, Unfit> {
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
            Op::Incr(k, by) => data_changed |= incr(&mut record.data, k, by)?,
            Op::Append(k, items) => data_changed |= append(&mut record.data, k, items)?,
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
                }
                .into());
            }
        }
        record.saved = now;
        record.accessed = now;
        record.deadline = policy.deadline(record);
    }
    Ok(Effect { save, empty })
}

/// Adds `by` to the integer at `key` (missing: 0); whether the data changed.
fn incr(data: &mut Data, key: &str, by: &BigInt) -> Result<bool, Unfit> {
    let held = match data.get(key) {
        None => BigInt::ZERO,
        Some(Value::Number(n)) if integer(n).is_some() => integer(n).unwrap_or_default(),
        Some(other) => {
            return Err(Unfit::NotAnInteger {
                key: key.to_string(),
                held: shown(other),
            });
        }
    };
    if *by == BigInt::ZERO && data.contains_key(key) {
        return Ok(false);
    }
    let sum = Number::from_string_unchecked((held + by).to_string());
    data.insert(key.to_string(), Value::Number(sum));
    Ok(true)
}

/// Appends `items` to the list at `key` (missing: an empty list); whether the data changed.
fn append(data: &mut Data, key: &str, items: &[Value]) -> Result<bool, Unfit> {
    match data.get_mut(key) {
        None => {
            data.insert(key.to_string(), Value::Array(items.to_vec()));
            Ok(true)
        }
        Some(Value::Array(list)) => {
            list.extend_from_slice(items);
            Ok(!items.is_empty())
        }
        Some(other) => Err(Unfit::NotAList {
            key: key.to_string(),
            held: shown(other),
        }),
    }
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
        assert!(matches!(err, Unfit::TooLarge(TooLarge { size, .. }) if size > 500));
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

    fn incr(k: &str, by: &str) -> Op {
        Op::Incr(k.into(), by.parse().unwrap())
    }

    #[test]
    fn increments_add_to_the_latest_value_at_any_size() {
        let mut r = Record::new(0);
        r.data = data(json!({"n": 5}));
        let c = set(vec![incr("n", "-7"), incr("new", "3")]);
        assert!(apply(&mut r, &c, &policy(), 1, 8192, false).unwrap().save);
        assert_eq!(r.data, data(json!({"n": -2, "new": 3})));
        let huge = "123456789012345678901234567890";
        r.data = crate::session::json::parse_object(format!("{{\"n\":{huge}}}").as_bytes())
            .unwrap()
            .unwrap();
        apply(
            &mut r,
            &set(vec![incr("n", huge)]),
            &policy(),
            2,
            8192,
            false,
        )
        .unwrap();
        assert_eq!(
            crate::session::json::encode_ascii(&r.data),
            "{\"n\":246913578024691357802469135780}"
        );
        // Adding 0 to a stored integer is no change; to a missing key it stores 0.
        let e = apply(
            &mut r,
            &set(vec![incr("n", "0")]),
            &policy(),
            3,
            8192,
            false,
        )
        .unwrap();
        assert!(!e.save);
        apply(
            &mut r,
            &set(vec![incr("z", "0")]),
            &policy(),
            4,
            8192,
            false,
        )
        .unwrap();
        assert_eq!(r.data["z"], json!(0));
    }

    #[test]
    fn an_increment_of_a_value_that_is_no_integer_is_unfit() {
        for held in [json!(1.5), json!("1"), json!(null), json!([1]), json!(1e3)] {
            let mut r = Record::new(0);
            r.data = data(json!({ "n": held }));
            let before = r.data.clone();
            let err = apply(
                &mut r,
                &set(vec![incr("n", "1")]),
                &policy(),
                1,
                8192,
                false,
            )
            .unwrap_err();
            assert!(
                matches!(err, Unfit::NotAnInteger { ref key, .. } if key == "n"),
                "{err}"
            );
            assert_eq!(err.suffixes(), ["-incr"]);
            assert_eq!(r.data, before);
        }
    }

    #[test]
    fn appends_extend_the_latest_list_and_refuse_other_values() {
        let mut r = Record::new(0);
        r.data = data(json!({"cart": ["pen"]}));
        let c = set(vec![
            Op::Append("cart".into(), vec![json!("ink")]),
            Op::Append("new".into(), vec![json!(1), json!({"a": 2})]),
        ]);
        apply(&mut r, &c, &policy(), 1, 8192, false).unwrap();
        assert_eq!(
            r.data,
            data(json!({"cart": ["pen", "ink"], "new": [1, {"a": 2}]}))
        );
        r.data = data(json!({"cart": {"pen": 1}}));
        let err = apply(
            &mut r,
            &set(vec![Op::Append("cart".into(), vec![json!("ink")])]),
            &policy(),
            2,
            8192,
            false,
        )
        .unwrap_err();
        assert!(matches!(err, Unfit::NotAList { .. }), "{err}");
        // A list that would pass the size cap is refused like any oversize change.
        r.data = data(json!({"cart": []}));
        let big = set(vec![Op::Append(
            "cart".into(),
            vec![json!("x".repeat(600))],
        )]);
        let err = apply(&mut r, &big, &policy(), 3, 500, false).unwrap_err();
        assert!(matches!(err, Unfit::TooLarge(_)), "{err}");
    }
}
