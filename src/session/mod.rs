//! Sessions: what a session is, how long it lives, how a response changes it, where it is kept.
//!
//! - [`id`]: random keys; [`json`]: the ASCII-only wire form of the data; [`changes`]: the
//!   per-key merge of one response's changes into a record.
//! - [`Sessions`]: the API the HTTP pipeline uses: open a request's session, commit its change.
//! - [`Storage`]: the opened store as the rest of the sidecar holds it, offering only
//!   [`Upkeep`] (the admin's look-ups and removals, sweep, sync, ping, reconfigure).
//!
//! Private, so that nothing outside this module reaches a stored record but through the two
//! doors above: `store` (the storage traits), `entry` (what a store keeps under a key),
//! `engine` (the store logic shared by backends, written once over compare-and-swap cells),
//! `sled_store` (the embedded default), `redis_store` (the shared store for several
//! sidecars), `sweeper` (the background removal of expired records). The store's own tests
//! reach them through [`testing`], built only with the `testing` feature.

pub mod changes;
mod engine;
mod entry;
pub mod id;
pub mod json;
mod redis_store;
mod sessions;
mod sled_store;
mod storage;
mod store;
mod sweeper;

pub use entry::Codec;
pub use redis_store::{RedisSettings, redact};
pub use sessions::{CommitError, CookieOp, Gate, Loaded, Outcome, Sessions, Unavailable};
pub use sled_store::SledSettings;
pub use storage::{Backend, Storage, Watch};
pub use store::{BoxError, Cell, StoreError, Swept, Upkeep, chain};
pub use sweeper::sweep_every;

/// The store's own API, for the store's tests (tests/store.rs and its kin): built only with
/// the `testing` feature, which the test targets turn on through the dev-dependency on this
/// crate. A normal build has no such door.
#[cfg(feature = "testing")]
pub mod testing {
    use std::sync::Arc;

    pub use super::redis_store::RedisStore;
    pub use super::sled_store::{BUCKET_MS, SledStore};
    pub use super::store::{Liveness, Lookup, Mark, Seen, Store, Update, UpdateError, Updated};

    use super::Storage;

    /// A [`Storage`] over a store a test opened (and may keep using directly).
    pub fn storage(store: Arc<dyn Store>) -> Storage {
        Storage::from_store(store)
    }

    /// The store under `storage`, with its request operations.
    pub fn store_of(storage: &Storage) -> Arc<dyn Store> {
        storage.store().clone()
    }
}

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The visitor's dictionary.
pub type Data = serde_json::Map<String, serde_json::Value>;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Where the time comes from, so that tests can move it instead of sleeping.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Millis;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        d.as_millis() as Millis
    }
}

/// A clock that only moves when told to.
#[derive(Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn starting_now() -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicI64::new(SystemClock.now())))
    }
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// Django's `set_expiry`, as the upstream last asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ExpiryMode {
    /// The configured policy (`cookie_age`, `expire_at_browser_close`).
    #[default]
    Default,
    /// N seconds after the last save.
    Seconds(u64),
    /// A browser-session cookie; the record still lives `cookie_age` on the server.
    BrowserClose,
    /// A fixed instant.
    At(Millis),
}

/// One stored session. Every field has a default, so that a record written before a field
/// existed still reads (see `entry` for the format versions).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    #[serde(deserialize_with = "json::deserialize_data")]
    pub data: Data,
    pub created: Millis,
    pub saved: Millis,
    /// Last recorded activity; refreshed at most once per touch interval.
    pub accessed: Millis,
    pub expiry: ExpiryMode,
    pub subject: Option<String>,
    /// When the record stops being loadable; kept in the record so the expiry index entry can be
    /// found again even after the policy changed.
    pub deadline: Millis,
}

impl Record {
    pub fn new(now: Millis) -> Record {
        Record {
            data: Data::new(),
            created: now,
            saved: now,
            accessed: now,
            expiry: ExpiryMode::Default,
            subject: None,
            deadline: now,
        }
    }
}

/// The expiry rules of docs/HEADERS.md §5, computed in one place. The session core's own
/// settings type: the config module builds it (`ExpiryConfig::policy`).
#[derive(Debug, Clone)]
pub struct Policy {
    pub cookie_age: Duration,
    pub expire_at_browser_close: bool,
    pub save_every_request: bool,
    pub idle_timeout: Option<Duration>,
    pub absolute_timeout: Option<Duration>,
    pub touch_interval: Option<Duration>,
    /// How long an old key keeps forwarding to its successor after a cycle.
    pub forward_ttl: Duration,
    /// How long a key a cycle or a flush retired stays known as retired: a request that starts
    /// with it gets no session cookie, so that it cannot replace the one the cycle or flush
    /// gave the browser. Zero: off.
    pub retired_grace: Duration,
}

fn ms(d: Duration) -> Millis {
    d.as_millis() as Millis
}

impl Policy {
    /// When the session expires through its save-based expiry and the absolute timeout; this
    /// is what the cookie's Max-Age follows.
    pub fn expires_at(&self, r: &Record) -> Millis {
        let base = match r.expiry {
            ExpiryMode::Default | ExpiryMode::BrowserClose => r.saved + ms(self.cookie_age),
            ExpiryMode::Seconds(n) => r.saved + (n as Millis).saturating_mul(1000),
            ExpiryMode::At(t) => t,
        };
        match self.absolute_timeout {
            Some(abs) => base.min(r.created + ms(abs)),
            None => base,
        }
    }

    /// When the record stops being loadable: the expiry above or the idle timeout.
    pub fn deadline(&self, r: &Record) -> Millis {
        self.deadline_if_accessed(r, r.accessed)
    }

    /// The deadline if the last activity were `accessed`.
    pub fn deadline_if_accessed(&self, r: &Record, accessed: Millis) -> Millis {
        let at = self.expires_at(r);
        match self.idle_timeout {
            Some(idle) => at.min(accessed + ms(idle)),
            None => at,
        }
    }

    /// Whether the cookie should be a browser-session cookie (no Max-Age/Expires).
    pub fn browser_close(&self, r: &Record) -> bool {
        match r.expiry {
            ExpiryMode::BrowserClose => true,
            ExpiryMode::Default => self.expire_at_browser_close,
            _ => false,
        }
    }

    /// Whole seconds a new session would get: the smallest of `cookie_age` and the timeouts.
    pub fn new_session_age(&self) -> u64 {
        [
            Some(self.cookie_age),
            self.idle_timeout,
            self.absolute_timeout,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.cookie_age)
        .as_secs()
    }

    /// Until when a key retired at `now` stays known as retired (`now` itself when off).
    pub fn retired_until(&self, now: Millis) -> Millis {
        now + ms(self.retired_grace)
    }

    /// Whether a read-only request should record its activity now.
    pub fn touch_due(&self, r: &Record, now: Millis) -> bool {
        self.touch_interval
            .is_some_and(|t| now - r.accessed >= ms(t))
    }
}

/// Whole seconds from `now` until `at`, never negative.
pub fn seconds_until(at: Millis, now: Millis) -> u64 {
    ((at - now).max(0) / 1000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(idle: u64, abs: u64) -> Policy {
        let cfg = crate::config::Config::from_toml(&format!(
            "[expiry]\nidle_timeout = {idle}\nabsolute_timeout = {abs}\ncookie_age = 1000"
        ))
        .unwrap();
        cfg.expiry.policy(Duration::from_secs(30))
    }

    #[test]
    fn deadline_is_the_earliest_of_save_idle_and_absolute() {
        let mut r = Record::new(0);
        assert_eq!(policy(0, 0).deadline(&r), 1_000_000);
        assert_eq!(policy(100, 0).deadline(&r), 100_000);
        r.saved = 900_000;
        r.accessed = 900_000;
        assert_eq!(policy(0, 500).deadline(&r), 500_000);
        r.expiry = ExpiryMode::Seconds(5);
        assert_eq!(policy(0, 0).deadline(&r), 905_000);
    }

    #[test]
    fn a_new_session_gets_the_smallest_age_in_force() {
        assert_eq!(policy(0, 0).new_session_age(), 1000);
        assert_eq!(policy(300, 0).new_session_age(), 300);
        assert_eq!(policy(300, 200).new_session_age(), 200);
    }
}
