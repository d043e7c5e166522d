//! session-sidecar: a reverse proxy that gives a legacy web app Django-style sessions.
//!
//! The browser gets a cookie holding only a random key; the data lives in an embedded sled
//! store; the app reads it from the `X-Session` request header and changes it with response
//! headers that the sidecar applies atomically and strips. `docs/HEADERS.md` is the contract.
//!
//! The parts, the direction of their dependencies and the file layout: `docs/ARCHITECTURE.md`.

#![forbid(unsafe_code)]

// The crate's public API is what the binary, the tests and the fuzz targets use: the
// configuration, the cookie and header parsers, the session core, and the wiring below.
pub mod config;
pub mod cookie;
pub mod headers;
pub mod session;

mod admin;
mod csrf;
mod drain;
mod error;
mod limits;
mod metrics;
mod proxy;
mod settings;
mod signing;
mod upstream;
mod wiring;

use std::sync::Arc;

pub use config::Config;
pub use proxy::{Scrub, scrub_request_head};
use session::{Backend, Clock, Storage, StoreError, SystemClock};
pub use wiring::{LogFilter, Reloads, RunError, bind_admin, run, run_with_admin, shutdown_signal};

/// The parts of a running sidecar that tests may swap: where sessions live and what time it is.
#[derive(Clone)]
pub struct Deps {
    pub store: Storage,
    pub clock: Arc<dyn Clock>,
}

impl Deps {
    /// The production wiring: the configured store and the system clock.
    pub async fn open(config: &Config) -> Result<Deps, StoreError> {
        let backend = match &config.store.backend {
            config::Backend::Sled => Backend::Sled(config.store.sled()),
            config::Backend::Redis(redis) => Backend::Redis(redis),
        };
        let policy = Arc::new(settings::policy(config));
        let codec = settings::codec(config);
        let store = Storage::open(backend, policy, codec, config.max_session_bytes).await?;
        Ok(Deps {
            store,
            clock: Arc::new(SystemClock),
        })
    }
}
