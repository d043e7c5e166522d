//! The session-level API the HTTP pipeline talks to: [`Sessions::open`] the keys a request
//! presented, then [`Sessions::commit`] the change its response asked for and get back an
//! [`Outcome`] to render. Every session decision (flush, cycle, fresh session, the "ended" refusal,
//! activity for the idle timeout) is made here, so each can be tested without a server.

use std::sync::Arc;

use super::chain;
use super::changes::{self, Change, Revoke, Unfit};
use super::store::{Liveness, Lookup, Mark, Seen, Store, StoreError, Update, UpdateError, Updated};
use super::{Data, Millis, Policy, Record, Storage, id, seconds_until};

/// What a request found under the keys its cookie presented.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The live session: its key, the record and the stored bytes (a compare-and-swap hint).
    live: Option<(String, Record, Vec<u8>)>,
    /// The request carried our cookie (live or not).
    carried: bool,
    /// No key reached a live session, and one of them was retired by a cycle or a flush within
    /// the retired grace: the answer must not touch the browser's cookie.
    retired: bool,
    /// Where the store's end notices stood before the load (spares the liveness check a read).
    mark: Option<Mark>,
    /// The key a session created by this request's answer gets, chosen early when something
    /// derived from it must reach the app first (the CSRF token).
    next_key: Option<String>,
    /// Asked before a session is created: `Err(seconds)` refuses it (a rate limit).
    gate: Option<Gate>,
}

/// Admits or refuses the creation of a session: `Err` holds the seconds to wait.
pub struct Gate(pub Box<dyn FnOnce() -> Result<(), u64> + Send + Sync>);

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

static EMPTY: std::sync::LazyLock<Data> = std::sync::LazyLock::new(Data::new);

impl Loaded {
    /// The data the upstream is shown: the live session's, or `{}`.
    pub fn data(&self) -> &Data {
        self.live.as_ref().map_or(&EMPTY, |(_, r, _)| &r.data)
    }

    /// `true` for an existing session (`X-Session-Status: existing`, docs/HEADERS.md §1).
    pub fn is_existing(&self) -> bool {
        self.live.is_some()
    }

    /// The live session's key (for `expose_id`).
    pub fn key(&self) -> Option<&str> {
        self.live.as_ref().map(|(k, _, _)| k.as_str())
    }

    pub fn record(&self) -> Option<&Record> {
        self.live.as_ref().map(|(_, r, _)| r)
    }

    /// Sets what is asked before this request's answer may create a session.
    pub fn set_gate(&mut self, gate: Gate) {
        self.gate = Some(gate);
    }

    /// The live session's key, or the key a session created by this request will get.
    pub fn key_or_next(&mut self) -> &str {
        match &self.live {
            Some((k, _, _)) => k,
            None => self.next_key.get_or_insert_with(id::generate),
        }
    }
}

/// What the response does with the browser's cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CookieOp {
    /// Nothing: the browser's cookie (or lack of one) stays right.
    Keep,
    /// Set the cookie to `key`; `max_age` in seconds, `None` for a browser-session cookie.
    Set { key: String, max_age: Option<u64> },
    /// Delete the cookie (the session is gone, or the presented one was stale).
    Remove,
}

/// What a commit did, for the response and for the metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub cookie: CookieOp,
    pub created: bool,
    pub flushed: bool,
    pub cycled: bool,
    /// A change was merged into an existing session.
    pub merged: bool,
    /// A change was not stored: the request presented a key retired moments ago.
    pub dropped: bool,
    /// The key of the live session this answer leaves the browser with, when the commit knows
    /// it (set, kept, or the renamed session a change in flight landed in).
    pub kept: Option<String>,
    /// Sessions of the subject `X-Session-Revoke` ended.
    pub revoked: usize,
}

impl Outcome {
    fn cookie(cookie: CookieOp) -> Outcome {
        Outcome {
            cookie,
            created: false,
            flushed: false,
            cycled: false,
            merged: false,
            dropped: false,
            kept: None,
            revoked: 0,
        }
    }

    fn kept(self, key: &str) -> Outcome {
        Outcome {
            kept: Some(key.to_string()),
            ..self
        }
    }
}

/// The store could not be reached or read; nothing changed. The store's own error is the
/// source (for the log, not the client).
#[derive(Debug, thiserror::Error)]
#[error("the session store is unavailable")]
pub struct Unavailable(#[from] StoreError);

/// Why a change was not committed; the stored session is exactly as it was.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The session ended while the request was in flight and the change would revive it.
    #[error("the session ended while the request was in flight")]
    Ended,
    #[error(transparent)]
    Unfit(#[from] Unfit),
    /// Too many sessions created from this client lately; retry after this many seconds.
    #[error("too many new sessions from this address; retry in {0} s")]
    TooMany(u64),
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
}

impl From<StoreError> for CommitError {
    fn from(e: StoreError) -> CommitError {
        CommitError::Unavailable(Unavailable(e))
    }
}

impl From<UpdateError> for CommitError {
    fn from(e: UpdateError) -> CommitError {
        match e {
            UpdateError::Unfit(u) => CommitError::Unfit(u),
            UpdateError::Store(s) => s.into(),
        }
    }
}

pub struct Sessions {
    store: Arc<dyn Store>,
    policy: Arc<Policy>,
    max_bytes: usize,
    /// A subject's sessions beyond this many end, oldest first, when one more is tagged.
    max_per_subject: Option<usize>,
}

impl Sessions {
    pub fn new(storage: &Storage, policy: Arc<Policy>, max_bytes: usize) -> Sessions {
        Sessions {
            store: storage.store().clone(),
            policy,
            max_bytes,
            max_per_subject: None,
        }
    }

    /// At most `n` sessions per subject (Kibana's `maxSessions`): tagging one more ends the
    /// oldest others.
    pub fn with_subject_limit(mut self, n: Option<usize>) -> Sessions {
        self.max_per_subject = n;
        self
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Loads the first of `keys` that holds a live session.
    pub async fn open(
        &self,
        keys: &[String],
        carried: bool,
        now: Millis,
    ) -> Result<Loaded, Unavailable> {
        // Taken before the load: a notice that arrives after it may concern a change made
        // before the load (a needless read later), never the reverse.
        let mark = self.store.mark();
        let mut loaded = Loaded {
            live: None,
            carried,
            retired: false,
            mark,
            next_key: None,
            gate: None,
        };
        for key in keys {
            match self.store.lookup(key, now).await? {
                Lookup::Live(record, raw) => {
                    loaded.live = Some((key.clone(), record, raw));
                    loaded.retired = false;
                    break;
                }
                Lookup::Retired => loaded.retired = true,
                Lookup::Absent => {}
            }
        }
        Ok(loaded)
    }

    /// Whole seconds left (`X-Session-Expiry-Age`), counting this request as activity.
    pub fn expiry_age(&self, loaded: &Loaded, now: Millis) -> u64 {
        let Some(r) = loaded.record() else {
            return self.policy.new_session_age();
        };
        let accessed = if self.policy.touch_due(r, now) {
            now
        } else {
            r.accessed
        };
        seconds_until(self.policy.deadline_if_accessed(r, accessed), now)
    }

    /// Records that a request reached the live session, whatever its response (idle timeout).
    /// Failure is logged, not fatal: the request itself did not ask for a write.
    pub async fn activity(&self, loaded: &Loaded, now: Millis) {
        if let Some((key, r, _)) = &loaded.live {
            self.touch(key, r, now).await;
        }
    }

    async fn touch(&self, key: &str, record: &Record, now: Millis) {
        if self.policy.touch_due(record, now)
            && let Err(e) = self.store.touch(key, now).await
        {
            tracing::error!(error = %chain(&e), "recording session activity failed");
        }
    }

    /// Applies one response's change (docs/HEADERS.md §2 order: flush, cycle, data, expiry)
    /// against the latest stored state and says what to do with the cookie; then, when the
    /// change tagged a subject that has a session limit, ends that subject's oldest others;
    /// then `X-Session-Revoke`.
    pub async fn commit(
        &self,
        loaded: Loaded,
        change: &Change,
        now: Millis,
    ) -> Result<Outcome, CommitError> {
        // A key retired moments ago: its answer's change is not stored, nor its revoke run
        // (it would end the session the browser now holds).
        let retired = loaded.retired && loaded.live.is_none();
        // The subject the session has once the change is stored, before a flush.
        let subject = match &change.subject {
            Some(tag) => tag.clone(),
            None => loaded.record().and_then(|r| r.subject.clone()),
        };
        // `Revoke: all` ends this session as a flush does; a subject in the answer names whose
        // sessions end, and does not tag the fresh session its data starts: that one is
        // logged out too.
        let flushed;
        let change = match change.revoke {
            Some(Revoke::All) => {
                flushed = Change {
                    flush: true,
                    subject: None,
                    ..change.clone()
                };
                &flushed
            }
            _ => change,
        };
        let mut outcome = self.apply(loaded, change, now).await?;
        if let (Some(limit), Some(Some(tag))) = (self.max_per_subject, &change.subject) {
            self.end_beyond(tag, outcome.kept.as_deref(), limit, now)
                .await?;
        }
        if let Some(revoke) = change.revoke.filter(|_| !retired) {
            let subject = match revoke {
                // After a flush the browser is left with the fresh session: its tag, if any.
                Revoke::Others if change.flush => change.subject.clone().flatten(),
                Revoke::Others | Revoke::All => subject,
            };
            outcome.revoked = self
                .revoke(subject.as_deref(), outcome.kept.as_deref(), now)
                .await?;
        }
        Ok(outcome)
    }

    /// Ends every session of `subject` but `kept` (`X-Session-Revoke`); how many ended.
    async fn revoke(
        &self,
        subject: Option<&str>,
        kept: Option<&str>,
        now: Millis,
    ) -> Result<usize, CommitError> {
        let Some(subject) = subject else {
            tracing::info!(
                "X-Session-Revoke: the session has no subject, so it has no other sessions to end"
            );
            return Ok(0);
        };
        let kept = kept.map(id::handle);
        let mut ended = 0;
        for (cell, _) in self.store.subject_sessions(subject, now).await? {
            if Some(cell.handle()) != kept && self.store.remove_stored(&cell).await? {
                ended += 1;
            }
        }
        self.store.sync().await?;
        tracing::info!(
            ended,
            "X-Session-Revoke: the subject's other sessions ended"
        );
        Ok(ended)
    }

    /// Ends `subject`'s sessions beyond `limit`, keeping `kept` (the one just tagged) and the
    /// most recently created others.
    async fn end_beyond(
        &self,
        subject: &str,
        kept: Option<&str>,
        limit: usize,
        now: Millis,
    ) -> Result<(), CommitError> {
        let found = self.store.subject_sessions(subject, now).await?;
        if found.len() <= limit {
            return Ok(());
        }
        let kept = kept.map(id::handle);
        let mut others: Vec<_> = found
            .into_iter()
            .filter(|(cell, _)| Some(cell.handle()) != kept)
            .map(|(cell, r)| (r.created, cell.handle(), cell))
            .collect();
        // Newest first; the tagged session counts as one of the `limit`.
        others.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
        let room = limit.saturating_sub(usize::from(kept.is_some()));
        for (_, handle, cell) in others.into_iter().skip(room) {
            if self.store.remove_stored(&cell).await? {
                tracing::info!(
                    %handle,
                    "session ended: its subject is over max_sessions_per_subject"
                );
            }
        }
        self.store.sync().await?;
        Ok(())
    }

    async fn apply(
        &self,
        loaded: Loaded,
        change: &Change,
        now: Millis,
    ) -> Result<Outcome, CommitError> {
        let force = self.policy.save_every_request;
        let carried = loaded.carried;
        let seen = loaded.mark;
        let Some((key, snapshot, raw)) = loaded.live else {
            if loaded.retired {
                return self.retired(change, now);
            }
            return self
                .fresh(change, now, carried, loaded.next_key, loaded.gate)
                .await;
        };
        if change.flush {
            // Refuse an oversized fresh session before the old one is gone.
            changes::apply(
                &mut Record::new(now),
                change,
                &self.policy,
                now,
                self.max_bytes,
                false,
            )?;
            self.store.retire(&key, now).await?;
            tracing::info!("session flushed");
            let mut outcome = self.fresh(change, now, true, None, loaded.gate).await?;
            self.store.sync().await?;
            outcome.flushed = true;
            return Ok(outcome);
        }
        if change.is_empty() && !force {
            // The session may have ended while the upstream worked: then drop the stale cookie.
            let seen = seen.map(|mark| Seen {
                mark,
                deadline: snapshot.deadline,
            });
            if self.store.liveness(&key, now, seen).await? == Liveness::Ended {
                return Ok(Outcome::cookie(CookieOp::Remove));
            }
            self.touch(&key, &snapshot, now).await;
            return Ok(Outcome::cookie(CookieOp::Keep).kept(&key));
        }
        let new_key = change.cycle.then(id::generate);
        let updated = self
            .store
            .update(Update {
                seen: Some((&snapshot, &raw)),
                new_key: new_key.as_deref(),
                force_save: force,
                ..Update::new(&key, change, now)
            })
            .await?;
        let outcome = match updated {
            Updated::Ended => {
                // The change as it would have applied to what the request loaded: an increment
                // of a value that is no integer is bad input whether or not the session lives.
                let mut would = snapshot;
                let effect =
                    changes::apply(&mut would, change, &self.policy, now, usize::MAX, force)?;
                if effect.save {
                    return Err(CommitError::Ended);
                }
                return Ok(Outcome::cookie(CookieOp::Remove));
            }
            Updated::Unchanged { key, .. } => {
                return Ok(Outcome::cookie(CookieOp::Keep).kept(&key));
            }
            // Landed in the session a concurrent cycle renamed: that cycle's response carries the
            // cookie, this one carries none.
            Updated::Removed { forwarded: true } => Outcome {
                merged: true,
                ..Outcome::cookie(CookieOp::Keep)
            },
            Updated::Saved {
                key: renamed,
                forwarded: true,
                ..
            } => Outcome {
                merged: true,
                ..Outcome::cookie(CookieOp::Keep).kept(&renamed)
            },
            Updated::Removed { forwarded: false } => Outcome::cookie(CookieOp::Remove),
            Updated::Saved {
                key: saved, record, ..
            } => {
                let cycled = saved != key;
                if cycled {
                    tracing::info!("session key cycled");
                }
                Outcome {
                    merged: true,
                    cycled,
                    ..Outcome::cookie(self.cookie_for(saved.clone(), &record, now)).kept(&saved)
                }
            }
        };
        self.store.sync().await?;
        Ok(outcome)
    }

    /// A request that began with a key a cycle or a flush retired moments ago: the browser may
    /// already hold the key that cycle or flush gave it (the answers can arrive in either
    /// order), so this answer leaves the cookie alone, and a change it asks for is not stored:
    /// storing it would need a cookie.
    fn retired(&self, change: &Change, now: Millis) -> Result<Outcome, CommitError> {
        let dropped = self.new_record(change, now)?.is_some();
        if dropped {
            tracing::warn!(
                "change not stored: the request presented a session key retired by a cycle or a flush moments ago (retired_grace); its answer sets no cookie"
            );
        }
        Ok(Outcome {
            dropped,
            ..Outcome::cookie(CookieOp::Keep)
        })
    }

    /// The session `change` would create for a visitor without one, if it leaves anything to
    /// keep (the size limit checked).
    fn new_record(&self, change: &Change, now: Millis) -> Result<Option<Record>, CommitError> {
        let mut record = Record::new(now);
        let effect = changes::apply(
            &mut record,
            change,
            &self.policy,
            now,
            self.max_bytes,
            self.policy.save_every_request,
        )?;
        Ok((effect.save && record.deadline > now).then_some(record))
    }

    fn cookie_for(&self, key: String, record: &Record, now: Millis) -> CookieOp {
        let max_age = (!self.policy.browser_close(record))
            .then(|| seconds_until(self.policy.expires_at(record), now));
        CookieOp::Set { key, max_age }
    }

    /// A visitor without a live session: store a new one if the change leaves data.
    /// A new session for `change`'s data, under `key` if given and free, else a random one.
    async fn fresh(
        &self,
        change: &Change,
        now: Millis,
        stale: bool,
        mut key: Option<String>,
        gate: Option<Gate>,
    ) -> Result<Outcome, CommitError> {
        let Some(record) = self.new_record(change, now)? else {
            return Ok(Outcome::cookie(if stale {
                CookieOp::Remove
            } else {
                CookieOp::Keep
            }));
        };
        if let Some(gate) = gate {
            (gate.0)().map_err(CommitError::TooMany)?;
        }
        loop {
            let key = key.take().unwrap_or_else(id::generate);
            if self.store.create(&key, &record).await? {
                self.store.sync().await?;
                tracing::debug!("session created");
                return Ok(Outcome {
                    created: true,
                    ..Outcome::cookie(self.cookie_for(key.clone(), &record, now)).kept(&key)
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every outcome of a commit, without a server: a sled store on a temporary directory.
    use super::*;
    use crate::session::changes::Op;
    use crate::session::sled_store::{SledSettings, SledStore};
    use serde_json::json;

    fn sessions(dir: &std::path::Path) -> Sessions {
        let cfg = crate::config::Config::from_toml("").unwrap();
        let policy = Arc::new(cfg.expiry.policy(std::time::Duration::from_secs(30)));
        let settings = SledSettings {
            path: dir.join("s"),
            durable: false,
            cache_capacity: 1 << 20,
        };
        let store = SledStore::open(&settings, policy.clone(), 8192).unwrap();
        Sessions::new(&Storage::from_store(Arc::new(store)), policy, 8192)
    }

    fn set(k: &str, v: serde_json::Value) -> Change {
        Change {
            ops: vec![Op::Set(k.into(), v)],
            ..Change::default()
        }
    }

    const NOW: Millis = 1_000_000;

    /// A live session holding `{"n": 1}`; returns its key.
    async fn live(s: &Sessions) -> String {
        let loaded = s.open(&[], false, NOW).await.unwrap();
        match s
            .commit(loaded, &set("n", json!(1)), NOW)
            .await
            .unwrap()
            .cookie
        {
            CookieOp::Set { key, .. } => key,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_visitor_without_data_gets_nothing_and_with_data_a_new_session() {
        let dir = tempfile::tempdir().unwrap();
        let s = sessions(dir.path());
        let loaded = s.open(&[], false, NOW).await.unwrap();
        assert!(!loaded.is_existing());
        let out = s.commit(loaded, &Change::default(), NOW).await.unwrap();
        assert_eq!(out.cookie, CookieOp::Keep);
        let loaded = s.open(&[], false, NOW).await.unwrap();
        let out = s.commit(loaded, &set("a", json!(1)), NOW).await.unwrap();
        assert!(
            out.created
                && matches!(
                    out.cookie,
                    CookieOp::Set {
                        max_age: Some(1_209_600),
                        ..
                    }
                )
        );
    }

    #[tokio::test]
    async fn a_stale_cookie_without_data_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = sessions(dir.path());
        let loaded = s.open(&["0".repeat(64)], true, NOW).await.unwrap();
        assert!(!loaded.is_existing());
        let out = s.commit(loaded, &Change::default(), NOW).await.unwrap();
        assert_eq!(out.cookie, CookieOp::Remove);
    }

    #[tokio::test]
    async fn flush_removes_and_cycle_renames() {
        let dir = tempfile::tempdir().unwrap();
        let s = sessions(dir.path());
        let key = live(&s).await;
        let loaded = s.open(std::slice::from_ref(&key), true, NOW).await.unwrap();
        let cycle = Change {
            cycle: true,
            ..Change::default()
        };
        let out = s.commit(loaded, &cycle, NOW + 1).await.unwrap();
        let CookieOp::Set { key: renamed, .. } = &out.cookie else {
            panic!("{out:?}")
        };
        assert!(out.cycled && *renamed != key);
        assert!(!s.open(&[key], true, NOW + 2).await.unwrap().is_existing());
        let loaded = s
            .open(std::slice::from_ref(renamed), true, NOW + 2)
            .await
            .unwrap();
        assert_eq!(loaded.data()["n"], 1);
        let flush = Change {
            flush: true,
            ..Change::default()
        };
        let out = s.commit(loaded, &flush, NOW + 3).await.unwrap();
        assert!(out.flushed && out.cookie == CookieOp::Remove);
    }

    #[tokio::test]
    async fn a_change_to_a_session_that_ended_in_flight_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = sessions(dir.path());
        let key = live(&s).await;
        let slow = s.open(std::slice::from_ref(&key), true, NOW).await.unwrap();
        let logout = s.open(std::slice::from_ref(&key), true, NOW).await.unwrap();
        let flush = Change {
            flush: true,
            ..Change::default()
        };
        s.commit(logout, &flush, NOW + 1).await.unwrap();
        let err = s
            .commit(slow, &set("b", json!(2)), NOW + 2)
            .await
            .unwrap_err();
        assert!(matches!(err, CommitError::Ended), "{err:?}");
    }

    #[tokio::test]
    async fn a_second_cycle_in_flight_lands_without_a_cookie() {
        let dir = tempfile::tempdir().unwrap();
        let s = sessions(dir.path());
        let key = live(&s).await;
        let first = s.open(std::slice::from_ref(&key), true, NOW).await.unwrap();
        let second = s.open(std::slice::from_ref(&key), true, NOW).await.unwrap();
        let cycle = |k: &str| Change {
            cycle: true,
            ..set(k, json!(true))
        };
        let one = s.commit(first, &cycle("a"), NOW + 1).await.unwrap();
        let two = s.commit(second, &cycle("b"), NOW + 2).await.unwrap();
        let CookieOp::Set { key: renamed, .. } = one.cookie else {
            panic!("{one:?}")
        };
        assert_eq!(two.cookie, CookieOp::Keep);
        assert!(!two.cycled && two.merged);
        let after = s.open(&[renamed], true, NOW + 3).await.unwrap();
        assert_eq!(json!(after.data()), json!({"n": 1, "a": true, "b": true}));
    }

    #[tokio::test]
    async fn an_oversized_change_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = sessions(dir.path());
        let key = live(&s).await;
        let loaded = s.open(std::slice::from_ref(&key), true, NOW).await.unwrap();
        let big = set("big", json!("x".repeat(9000)));
        assert!(matches!(
            s.commit(loaded, &big, NOW + 1).await,
            Err(CommitError::Unfit(Unfit::TooLarge(_)))
        ));
        let again = s.open(&[key], true, NOW + 2).await.unwrap();
        assert_eq!(json!(again.data()), json!({"n": 1}));
    }
}
