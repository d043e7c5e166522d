//! Configuration: one TOML file, overridable from `SESSION_SIDECAR_*` variables.
//!
//! Two steps, as the contract asks: [`RawConfig`] is what serde reads (unknown keys rejected),
//! [`Config`] is what the rest of the program uses, and it can only hold values that passed
//! [`RawConfig::validate`]. Every error names the key and the bad value.

mod env;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use raw::*;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(String),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("environment variable `{var}`: {reason}")]
    Env { var: String, reason: String },
}

pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------- validated layer

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Strict,
    Lax,
    None,
}

#[derive(Debug, Clone)]
pub struct CookieConfig {
    pub name: String,
    pub path: String,
    pub domain: Option<String>,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: SameSite,
    pub partitioned: bool,
}

#[derive(Debug, Clone)]
pub struct ExpiryConfig {
    pub cookie_age: Duration,
    pub expire_at_browser_close: bool,
    pub save_every_request: bool,
    pub idle_timeout: Option<Duration>,
    pub absolute_timeout: Option<Duration>,
    /// How long a key retired by a cycle or a flush stays known (zero: off).
    pub retired_grace: Duration,
    pub sweep_interval: Duration,
}

impl ExpiryConfig {
    /// How stale the recorded last activity may get before a request writes it again.
    /// Idle expiry can therefore fire early by at most this much (docs/HEADERS.md §5).
    pub fn touch_interval(&self) -> Option<Duration> {
        self.idle_timeout
            .map(|idle| (idle / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)))
    }

    /// The session core's expiry policy; a cycle's forward lives `upstream_timeout` + 60 s, the
    /// longest a request begun before the cycle can take.
    pub fn policy(&self, upstream_timeout: Duration) -> crate::session::Policy {
        crate::session::Policy {
            cookie_age: self.cookie_age,
            expire_at_browser_close: self.expire_at_browser_close,
            save_every_request: self.save_every_request,
            idle_timeout: self.idle_timeout,
            absolute_timeout: self.absolute_timeout,
            touch_interval: self.touch_interval(),
            forward_ttl: upstream_timeout + Duration::from_secs(60),
            retired_grace: self.retired_grace,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: Backend,
    pub path: PathBuf,
    pub durable: bool,
    pub cache_capacity: u64,
    /// Seal records with a key derived from `secret_key` (on by default when one is set).
    pub encrypt: bool,
    /// Write sessions under their keys in clear, as the release before did (a rolling upgrade
    /// of a fleet on Redis).
    pub legacy_names: bool,
}

impl StoreConfig {
    /// What the embedded store needs to open.
    pub fn sled(&self) -> crate::session::SledSettings {
        crate::session::SledSettings {
            path: self.path.clone(),
            durable: self.durable,
            cache_capacity: self.cache_capacity,
        }
    }
}

/// Where sessions live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Sled,
    Redis(RedisConfig),
}

/// The shared store's settings (owned by the store, named here as the config calls them).
pub use crate::session::RedisSettings as RedisConfig;

/// The CSRF defences (`[csrf]`).
#[derive(Debug, Clone, Default)]
pub struct CsrfConfig {
    pub check_origin: bool,
    /// Lower-cased `scheme://host[:port]`.
    pub trusted_origins: Vec<String>,
    pub exempt_paths: Vec<String>,
    /// The per-session token, when required.
    pub token: Option<CsrfToken>,
}

#[derive(Debug, Clone)]
pub struct CsrfToken {
    pub header: http::HeaderName,
    /// The urlencoded form field, if the token may come that way.
    pub field: Option<String>,
    pub max_form_bytes: usize,
}

impl CsrfConfig {
    /// Whether a request to `path` is checked at all.
    pub fn guards(&self, path: &str) -> bool {
        (self.check_origin || self.token.is_some())
            && !self
                .exempt_paths
                .iter()
                .any(|p| path.starts_with(p.as_str()))
    }
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
}

/// Where the app listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    /// `http://host:port`.
    Tcp(http::uri::Authority),
    /// `unix:/path/to/app.sock` (gunicorn, uWSGI, Puma, an app in the same pod).
    Unix(PathBuf),
}

impl UpstreamAddr {
    /// As the operator wrote it, for logs and errors: `host:port` or `unix:/path`.
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        match self {
            UpstreamAddr::Tcp(a) => a.as_str().into(),
            UpstreamAddr::Unix(p) => format!("unix:{}", p.display()).into(),
        }
    }
}

impl std::fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.as_str())
    }
}

/// The validated configuration: every field holds a value the sidecar can use as it is.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// The app: `host:port` over TCP, or a Unix socket.
    pub upstream: UpstreamAddr,
    pub upstream_timeout: Duration,
    /// Lower-cased prefix, e.g. `x-session`.
    pub header_prefix: String,
    pub expose_id: bool,
    pub max_session_bytes: usize,
    pub skip_paths: Vec<String>,
    pub trust_forwarded: bool,
    pub shutdown_grace: Duration,
    /// Request line plus headers, in bytes; beyond it the client gets 431.
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Time a client has to send a complete request head (slowloris defence).
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// A connection with no request in flight for this long is closed (HTTP/1 keep-alive, h2c).
    pub idle_connection_timeout: Duration,
    /// Threads serving connections, each with its own event loop and upstream connections.
    pub workers: usize,
    /// Lower-cased protocols a client may switch to (`Upgrade`); others go up as plain requests.
    pub upgrades: Vec<String>,
    /// One JSON object per log line instead of text.
    pub log_json: bool,
    /// The log filter, in `RUST_LOG`'s syntax; changed by a reload.
    pub log_level: String,
    pub cookie: CookieConfig,
    pub expiry: ExpiryConfig,
    pub store: StoreConfig,
    pub secret_key: Option<String>,
    pub secret_key_fallbacks: Vec<String>,
    /// `[security] upstream_signing_key`: requests to the app carry `X-Session-Signature`.
    pub upstream_signing_key: Option<String>,
    /// `[identity] header`, lower-cased: the app's user header, set from the subject.
    pub identity_header: Option<http::HeaderName>,
    pub admin: AdminConfig,
    pub csrf: CsrfConfig,
    /// `[limits] max_sessions_per_subject`, when set.
    pub max_sessions_per_subject: Option<usize>,
    /// `[limits] new_sessions_per_minute` per client address, when set.
    pub new_sessions_per_minute: Option<std::num::NonZeroU32>,
}

impl Config {
    /// Reads `path`, applies the `SESSION_SIDECAR_*` variables of the process, validates.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_with_env(&text, std::env::vars())
    }

    /// Parses TOML text without looking at the environment (tests, `from_toml_with_env`).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(text, std::iter::empty())
    }

    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        env::apply_env(&mut table, env)?;
        to_raw(table)?.validate()
    }
}

/// Deserializes with the path of the offending key in the error (`cookie.same_site: ...`).
pub(crate) fn to_raw(table: toml::Table) -> Result<RawConfig, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let reason = inner.message().trim().to_string();
        if path == "." || path.is_empty() {
            ConfigError::Parse(reason)
        } else {
            invalid(&path, reason)
        }
    })
}

/// The effective configuration as TOML with secrets masked, for `check-config`.
pub fn effective_toml(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<String, ConfigError> {
    let mut table: toml::Table =
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
    env::apply_env(&mut table, env)?;
    let mut raw = to_raw(table)?;
    raw.clone().validate()?;
    let mask = |s: &mut String| *s = "********".into();
    if let Some(k) = raw.security.secret_key.as_mut() {
        mask(k);
    }
    raw.security.secret_key_fallbacks.iter_mut().for_each(mask);
    if let Some(k) = raw.security.upstream_signing_key.as_mut() {
        mask(k);
    }
    raw.store.url = crate::session::redact(&raw.store.url);
    for url in raw
        .store
        .sentinels
        .iter_mut()
        .chain(&mut raw.store.cluster_nodes)
    {
        *url = crate::session::redact(url);
    }
    if let Some(t) = raw.admin.token.as_mut() {
        mask(t);
    }
    toml::to_string(&raw).map_err(|e| ConfigError::Parse(e.to_string()))
}
