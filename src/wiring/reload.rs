//! Live reload (SIGHUP): the config file and its secret files are read again and validated;
//! what may change live is taken by every worker, the admin listener, the sweeper and the store
//! at once, while connections stay open and requests in flight finish under the configuration
//! they started with. A changed key that is read only at start refuses the whole reload, with a
//! log line naming it: the running configuration stays, as it does for a file that no longer
//! validates.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::{Backend, Config};
use crate::proxy::Worker;
use crate::session::Storage;
use crate::settings::Settings;

/// The keys read only at start (a socket bound, a store opened, threads and limits sized)
/// whose values differ between `old` and `new`.
pub fn start_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |key: &'static str, same: bool| {
        if !same {
            changed.push(key);
        }
    };
    check("listen", old.listen == new.listen);
    check("workers", old.workers == new.workers);
    check(
        "max_connections",
        old.max_connections == new.max_connections,
    );
    check(
        "max_header_bytes",
        old.max_header_bytes == new.max_header_bytes,
    );
    check("max_headers", old.max_headers == new.max_headers);
    check(
        "header_read_timeout",
        old.header_read_timeout == new.header_read_timeout,
    );
    check(
        "idle_connection_timeout",
        old.idle_connection_timeout == new.idle_connection_timeout,
    );
    check("shutdown_grace", old.shutdown_grace == new.shutdown_grace);
    check(
        "max_session_bytes",
        old.max_session_bytes == new.max_session_bytes,
    );
    check("log_format", old.log_json == new.log_json);
    check("admin.listen", old.admin.listen == new.admin.listen);
    let (a, b) = (&old.store, &new.store);
    match (&a.backend, &b.backend) {
        (Backend::Sled, Backend::Sled) => {
            check("store.path", a.path == b.path);
            check("store.durable", a.durable == b.durable);
            check("store.cache_capacity", a.cache_capacity == b.cache_capacity);
        }
        (Backend::Redis(x), Backend::Redis(y)) => {
            // One name for the connection settings: which of them differ would say little more,
            // and naming them keeps passwords in URLs out of the log.
            check("store (the Redis connection settings)", x == y);
        }
        _ => check("store.backend", false),
    }
    changed
}

/// Sets the process's log filter; given by whoever installed the subscriber.
pub type LogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where reloads come from and what they read.
pub struct Reloads {
    /// The config file, read again on each reload.
    pub path: PathBuf,
    /// One message per reload asked for.
    pub asked: mpsc::Receiver<()>,
    /// `None` when something else owns the filter (`RUST_LOG` is set): `log_level` then
    /// changes nothing, and a reload that changes it says so.
    pub log_filter: Option<LogFilter>,
}

impl Reloads {
    /// A reload on every SIGHUP the process receives.
    #[cfg(unix)]
    pub fn on_hangup(path: PathBuf, log_filter: Option<LogFilter>) -> std::io::Result<Reloads> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup())?;
        let (tx, asked) = mpsc::channel(1);
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                // A reload already waiting covers this one too: it reads the file afresh.
                if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                    return;
                }
            }
        });
        Ok(Reloads {
            path,
            asked,
            log_filter,
        })
    }
}

/// What a reload changes: every part that reads the configuration after start.
pub(crate) struct Reloader {
    pub settings: watch::Sender<Arc<Settings>>,
    pub sweep_interval: watch::Sender<Duration>,
    pub workers: Vec<Arc<Worker>>,
    pub store: Storage,
}

/// Why a reload was not applied; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] crate::config::ConfigError),
    #[error(
        "config key(s) {} cannot change while the sidecar runs (restart it to change them)",
        .0.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
    )]
    StartOnly(Vec<&'static str>),
}

impl Reloader {
    /// Applies each reload asked for, one at a time, until no more can be asked.
    pub async fn serve(self, mut reloads: Reloads) {
        while reloads.asked.recv().await.is_some() {
            match self.reload(&reloads) {
                Ok(()) => {}
                Err(ReloadError::StartOnly(keys)) => {
                    for key in &keys {
                        tracing::error!(
                            key,
                            "reload refused: config key `{key}` is read only at start; the running configuration stays"
                        );
                    }
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "reload refused; the running configuration stays"
                ),
            }
        }
    }

    fn reload(&self, reloads: &Reloads) -> Result<(), ReloadError> {
        let new = Config::load(&reloads.path)?;
        let old = self.settings.borrow().clone();
        let start_only = start_only_changes(&old.config, &new);
        if !start_only.is_empty() {
            return Err(ReloadError::StartOnly(start_only));
        }
        if new.log_level != old.config.log_level {
            match &reloads.log_filter {
                Some(set) => {
                    if let Err(e) = set(&new.log_level) {
                        tracing::error!(error = %e, "the new log_level could not be set");
                    }
                }
                None => tracing::warn!(
                    "log_level changed, but RUST_LOG is set and keeps the log filter"
                ),
            }
        }
        let rotated = new.secret_key != old.config.secret_key
            || new.secret_key_fallbacks != old.config.secret_key_fallbacks;
        let settings = Arc::new(Settings::new(new, Some(&old), &self.store));
        // The store first: a request that already runs under the new settings writes records
        // sealed with the new secret.
        self.store
            .reconfigure(settings.policy.clone(), settings.codec());
        for worker in &self.workers {
            worker.reload(&settings);
        }
        // Only a new interval restarts the sweeper's clock: reloads more frequent than the
        // interval must not keep postponing the sweep.
        let every = settings.config.expiry.sweep_interval;
        self.sweep_interval.send_if_modified(|current| {
            let changed = *current != every;
            *current = every;
            changed
        });
        self.settings.send_replace(settings.clone());
        tracing::info!(
            path = %reloads.path.display(),
            secrets_rotated = rotated,
            upstream = %settings.config.upstream,
            "configuration reloaded"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml(extra).unwrap()
    }

    #[test]
    fn keys_read_only_at_start_are_named_and_live_ones_are_not() {
        let base = config("");
        let live = config(
            "upstream = \"http://127.0.0.1:9\"\nupstream_timeout = 9\nskip_paths = [\"/s\"]\n\
             log_level = \"warn\"\nheader_prefix = \"X-Sess\"\n\
             [cookie]\nname = \"sid\"\nsame_site = \"Strict\"\n[expiry]\ncookie_age = 60\n\
             sweep_interval = 5\n[security]\nsecret_key = \"a new secret of at least thirty-two bytes\"\n\
             [csrf]\ncheck_origin = true\n[limits]\nnew_sessions_per_minute = 5\n",
        );
        assert_eq!(start_only_changes(&base, &live), Vec::<&str>::new());
        for (extra, key) in [
            ("listen = \"127.0.0.1:1\"", "listen"),
            ("workers = 3", "workers"),
            ("max_connections = 5", "max_connections"),
            ("max_header_bytes = 4096", "max_header_bytes"),
            ("max_headers = 50", "max_headers"),
            ("header_read_timeout = 3", "header_read_timeout"),
            ("idle_connection_timeout = 3", "idle_connection_timeout"),
            ("shutdown_grace = 3", "shutdown_grace"),
            ("max_session_bytes = 100", "max_session_bytes"),
            ("log_format = \"json\"", "log_format"),
            ("[admin]\nlisten = \"127.0.0.1:1\"", "admin.listen"),
            ("[store]\npath = \"elsewhere\"", "store.path"),
            ("[store]\ndurable = false", "store.durable"),
            ("[store]\ncache_capacity = 2097152", "store.cache_capacity"),
            ("[store]\nbackend = \"redis\"", "store.backend"),
        ] {
            assert_eq!(
                start_only_changes(&base, &config(extra)),
                vec![key],
                "{extra}"
            );
        }
        let redis = config("[store]\nbackend = \"redis\"");
        let other = config("[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:7000/0\"");
        assert_eq!(
            start_only_changes(&redis, &other),
            vec!["store (the Redis connection settings)"]
        );
    }
}
