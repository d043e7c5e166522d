//! Configuration: one TOML file, overridable from `SESSION_SIDECAR_*` variables.
//!
//! Two steps, as the contract asks: [`RawConfig`] is what serde reads (unknown keys rejected),
//! [`Config`] is what the rest of the program uses, and it can only hold values that passed
//! [`RawConfig::validate`]. Every error names the key and the bad value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:8000";
pub const DEFAULT_UPSTREAM_TIMEOUT: u64 = 30;
pub const DEFAULT_HEADER_PREFIX: &str = "X-Session";
pub const DEFAULT_MAX_SESSION_BYTES: usize = 8192;
pub const DEFAULT_SHUTDOWN_GRACE: u64 = 30;
pub const DEFAULT_COOKIE_NAME: &str = "sessionid";
pub const DEFAULT_COOKIE_AGE: u64 = 1_209_600;
pub const DEFAULT_SWEEP_INTERVAL: u64 = 300;
pub const DEFAULT_STORE_PATH: &str = "data/sessions";
pub const DEFAULT_CACHE_CAPACITY: u64 = 64 * 1024 * 1024;
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_HEADERS: usize = 100;
pub const DEFAULT_HEADER_READ_TIMEOUT: u64 = 30;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Prefix of the environment variables that override keys of the file.
pub const ENV_PREFIX: &str = "SESSION_SIDECAR_";

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

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------- raw (serde) layer

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub listen: String,
    pub upstream: String,
    pub upstream_timeout: u64,
    pub header_prefix: String,
    pub expose_id: bool,
    pub max_session_bytes: usize,
    pub skip_paths: Vec<String>,
    pub trust_forwarded: bool,
    pub shutdown_grace: u64,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: u64,
    pub max_connections: usize,
    pub cookie: RawCookie,
    pub expiry: RawExpiry,
    pub store: RawStore,
    pub security: RawSecurity,
    pub admin: RawAdmin,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCookie {
    pub name: String,
    pub path: String,
    pub domain: Option<String>,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawExpiry {
    pub cookie_age: u64,
    pub expire_at_browser_close: bool,
    pub save_every_request: bool,
    pub idle_timeout: u64,
    pub absolute_timeout: u64,
    pub sweep_interval: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    pub backend: String,
    pub path: String,
    /// Wait for the disk (group-committed fsync) before a response that changed a session leaves.
    pub durable: bool,
    /// sled's page cache, in bytes.
    pub cache_capacity: u64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSecurity {
    pub secret_key: Option<String>,
    pub secret_key_fallbacks: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub listen: String,
    pub token: Option<String>,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen: DEFAULT_LISTEN.into(),
            upstream: DEFAULT_UPSTREAM.into(),
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            header_prefix: DEFAULT_HEADER_PREFIX.into(),
            expose_id: false,
            max_session_bytes: DEFAULT_MAX_SESSION_BYTES,
            skip_paths: Vec::new(),
            trust_forwarded: false,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            cookie: RawCookie::default(),
            expiry: RawExpiry::default(),
            store: RawStore::default(),
            security: RawSecurity::default(),
            admin: RawAdmin::default(),
        }
    }
}

impl Default for RawCookie {
    fn default() -> Self {
        RawCookie {
            name: DEFAULT_COOKIE_NAME.into(),
            path: "/".into(),
            domain: None,
            secure: false,
            http_only: true,
            same_site: "Lax".into(),
        }
    }
}

impl Default for RawExpiry {
    fn default() -> Self {
        RawExpiry {
            cookie_age: DEFAULT_COOKIE_AGE,
            expire_at_browser_close: false,
            save_every_request: false,
            idle_timeout: 0,
            absolute_timeout: 0,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            backend: "sled".into(),
            path: DEFAULT_STORE_PATH.into(),
            durable: true,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
        }
    }
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: DEFAULT_ADMIN_LISTEN.into(),
            token: None,
        }
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
}

#[derive(Debug, Clone)]
pub struct ExpiryConfig {
    pub cookie_age: Duration,
    pub expire_at_browser_close: bool,
    pub save_every_request: bool,
    pub idle_timeout: Option<Duration>,
    pub absolute_timeout: Option<Duration>,
    pub sweep_interval: Duration,
}

impl ExpiryConfig {
    /// How stale the recorded last activity may get before a request writes it again.
    /// Idle expiry can therefore fire early by at most this much (documented in the README).
    pub fn touch_interval(&self) -> Option<Duration> {
        self.idle_timeout
            .map(|idle| (idle / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)))
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub durable: bool,
    pub cache_capacity: u64,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
}

/// The validated configuration: every field holds a value the sidecar can use as it is.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `scheme://authority` of the upstream, without a trailing slash.
    pub upstream: http::uri::Authority,
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
    pub cookie: CookieConfig,
    pub expiry: ExpiryConfig,
    pub store: StoreConfig,
    pub secret_key: Option<String>,
    pub secret_key_fallbacks: Vec<String>,
    pub admin: AdminConfig,
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
        apply_env(&mut table, env)?;
        to_raw(table)?.validate()
    }
}

/// Deserializes with the path of the offending key in the error (`cookie.same_site: ...`).
fn to_raw(table: toml::Table) -> Result<RawConfig, ConfigError> {
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

// ---------------------------------------------------------------- environment overrides

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
    List,
}

/// Every key of the file with its type, so that a variable's text converts to the key's type.
const KEYS: &[(&str, &str, Kind)] = &[
    ("", "listen", Kind::Str),
    ("", "upstream", Kind::Str),
    ("", "upstream_timeout", Kind::Int),
    ("", "header_prefix", Kind::Str),
    ("", "expose_id", Kind::Bool),
    ("", "max_session_bytes", Kind::Int),
    ("", "skip_paths", Kind::List),
    ("", "trust_forwarded", Kind::Bool),
    ("", "shutdown_grace", Kind::Int),
    ("", "max_header_bytes", Kind::Int),
    ("", "max_headers", Kind::Int),
    ("", "header_read_timeout", Kind::Int),
    ("", "max_connections", Kind::Int),
    ("cookie", "name", Kind::Str),
    ("cookie", "path", Kind::Str),
    ("cookie", "domain", Kind::Str),
    ("cookie", "secure", Kind::Bool),
    ("cookie", "http_only", Kind::Bool),
    ("cookie", "same_site", Kind::Str),
    ("expiry", "cookie_age", Kind::Int),
    ("expiry", "expire_at_browser_close", Kind::Bool),
    ("expiry", "save_every_request", Kind::Bool),
    ("expiry", "idle_timeout", Kind::Int),
    ("expiry", "absolute_timeout", Kind::Int),
    ("expiry", "sweep_interval", Kind::Int),
    ("store", "backend", Kind::Str),
    ("store", "path", Kind::Str),
    ("store", "durable", Kind::Bool),
    ("store", "cache_capacity", Kind::Int),
    ("security", "secret_key", Kind::Str),
    ("security", "secret_key_fallbacks", Kind::List),
    ("admin", "listen", Kind::Str),
    ("admin", "token", Kind::Str),
];

fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    // Sorted so that errors and overrides do not depend on the order of the environment.
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    for (var, text) in vars {
        let name = &var[ENV_PREFIX.len()..];
        let (section, key) = name
            .split_once("__")
            .map(|(s, k)| (s.to_ascii_lowercase(), k.to_ascii_lowercase()))
            .unwrap_or_else(|| (String::new(), name.to_ascii_lowercase()));
        let Some(&(_, _, kind)) = KEYS.iter().find(|(s, k, _)| *s == section && *k == key) else {
            return Err(ConfigError::Env {
                var,
                reason: "unknown setting".into(),
            });
        };
        let value = convert(&text, kind).map_err(|reason| ConfigError::Env {
            var: var.clone(),
            reason,
        })?;
        let target = if section.is_empty() {
            &mut *table
        } else {
            match table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(invalid(&section, "must be a table"));
                }
            }
        };
        target.insert(key, value);
    }
    Ok(())
}

fn convert(text: &str, kind: Kind) -> Result<toml::Value, String> {
    match kind {
        Kind::Str => Ok(toml::Value::String(text.to_string())),
        Kind::Int => text
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("expected a whole number, got {text:?}")),
        Kind::Bool => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(toml::Value::Boolean(true)),
            "false" | "0" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("expected true or false, got {text:?}")),
        },
        Kind::List => {
            let doc: toml::Table = toml::from_str(&format!("v = {text}")).map_err(|_| {
                format!("expected a TOML array such as [\"a\", \"b\"], got {text:?}")
            })?;
            match doc.get("v") {
                Some(v @ toml::Value::Array(_)) => Ok(v.clone()),
                _ => Err(format!("expected a TOML array, got {text:?}")),
            }
        }
    }
}

// ---------------------------------------------------------------- validation

fn secs(key: &str, v: u64, allow_zero: bool) -> Result<Duration, ConfigError> {
    if v == 0 && !allow_zero {
        return Err(invalid(key, "must be greater than 0"));
    }
    if v > 10 * 365 * 24 * 3600 {
        return Err(invalid(key, format!("{v} seconds is more than ten years")));
    }
    Ok(Duration::from_secs(v))
}

fn optional_secs(key: &str, v: u64) -> Result<Option<Duration>, ConfigError> {
    (v > 0).then(|| secs(key, v, false)).transpose()
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl RawConfig {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            invalid(
                "listen",
                format!("{:?} is not an address like 127.0.0.1:8080", self.listen),
            )
        })?;
        let upstream = parse_upstream(&self.upstream)?;
        let header_prefix = self.header_prefix.to_ascii_lowercase();
        if !is_token(&header_prefix)
            || http::HeaderName::from_bytes(header_prefix.as_bytes()).is_err()
        {
            return Err(invalid(
                "header_prefix",
                format!("{:?} is not a valid header name", self.header_prefix),
            ));
        }
        if self.max_session_bytes < 2 {
            return Err(invalid(
                "max_session_bytes",
                "must be at least 2 (the size of `{}`)",
            ));
        }
        for p in &self.skip_paths {
            if !p.starts_with('/') {
                return Err(invalid("skip_paths", format!("{p:?} must start with '/'")));
            }
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_header_bytes) {
            return Err(invalid(
                "max_header_bytes",
                format!("{} is outside 1024..=16777216", self.max_header_bytes),
            ));
        }
        if !(1..=10_000).contains(&self.max_headers) {
            return Err(invalid(
                "max_headers",
                format!("{} is outside 1..=10000", self.max_headers),
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be greater than 0"));
        }
        let cookie = self.cookie.validate()?;
        let expiry = self.expiry.validate()?;
        let store = self.store.validate()?;
        let sec = self.security;
        if sec.secret_key.as_deref() == Some("") {
            return Err(invalid(
                "security.secret_key",
                "must not be empty (omit it instead)",
            ));
        }
        if sec.secret_key.is_none() && !sec.secret_key_fallbacks.is_empty() {
            return Err(invalid(
                "security.secret_key_fallbacks",
                "fallbacks need a security.secret_key",
            ));
        }
        if sec.secret_key_fallbacks.iter().any(|k| k.is_empty()) {
            return Err(invalid(
                "security.secret_key_fallbacks",
                "keys must not be empty",
            ));
        }
        let admin = self.admin.validate()?;
        Ok(Config {
            listen,
            upstream,
            upstream_timeout: secs("upstream_timeout", self.upstream_timeout, false)?,
            header_prefix,
            expose_id: self.expose_id,
            max_session_bytes: self.max_session_bytes,
            skip_paths: self.skip_paths,
            trust_forwarded: self.trust_forwarded,
            shutdown_grace: secs("shutdown_grace", self.shutdown_grace, true)?,
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
            header_read_timeout: secs("header_read_timeout", self.header_read_timeout, false)?,
            max_connections: self.max_connections,
            cookie,
            expiry,
            store,
            secret_key: sec.secret_key,
            secret_key_fallbacks: sec.secret_key_fallbacks,
            admin,
        })
    }
}

fn parse_upstream(text: &str) -> Result<http::uri::Authority, ConfigError> {
    let bad = |why: &str| invalid("upstream", format!("{text:?} {why}"));
    let uri: http::Uri = text.parse().map_err(|_| bad("is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(bad(&format!(
                "uses scheme {other:?}; only http:// is supported"
            )));
        }
        None => return Err(bad("needs a scheme, e.g. http://127.0.0.1:8000")),
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("must not have a path or query"));
    }
    let authority = uri.authority().cloned().ok_or_else(|| bad("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("must not contain credentials"));
    }
    Ok(authority)
}

impl RawCookie {
    fn validate(self) -> Result<CookieConfig, ConfigError> {
        if !is_token(&self.name) {
            return Err(invalid(
                "cookie.name",
                format!("{:?} is not a valid cookie name", self.name),
            ));
        }
        if !self.path.starts_with('/')
            || self.path.bytes().any(|b| b == b';' || b.is_ascii_control())
        {
            return Err(invalid(
                "cookie.path",
                format!("{:?} must start with '/' and hold no ';'", self.path),
            ));
        }
        if let Some(d) = &self.domain {
            if d.is_empty() || d.bytes().any(|b| b == b';' || b <= b' ' || b >= 0x7f) {
                return Err(invalid("cookie.domain", format!("{d:?} is not a domain")));
            }
        }
        let same_site = match self.same_site.to_ascii_lowercase().as_str() {
            "strict" => SameSite::Strict,
            "lax" => SameSite::Lax,
            "none" => SameSite::None,
            _ => {
                return Err(invalid(
                    "cookie.same_site",
                    format!(
                        "{:?} is not one of \"Strict\", \"Lax\", \"None\"",
                        self.same_site
                    ),
                ));
            }
        };
        Ok(CookieConfig {
            name: self.name,
            path: self.path,
            domain: self.domain,
            secure: self.secure,
            http_only: self.http_only,
            same_site,
        })
    }
}

impl RawExpiry {
    fn validate(self) -> Result<ExpiryConfig, ConfigError> {
        Ok(ExpiryConfig {
            cookie_age: secs("expiry.cookie_age", self.cookie_age, false)?,
            expire_at_browser_close: self.expire_at_browser_close,
            save_every_request: self.save_every_request,
            idle_timeout: optional_secs("expiry.idle_timeout", self.idle_timeout)?,
            absolute_timeout: optional_secs("expiry.absolute_timeout", self.absolute_timeout)?,
            sweep_interval: secs("expiry.sweep_interval", self.sweep_interval, false)?,
        })
    }
}

impl RawStore {
    fn validate(self) -> Result<StoreConfig, ConfigError> {
        match self.backend.as_str() {
            "sled" => {}
            "redis" => {
                return Err(invalid(
                    "store.backend",
                    "\"redis\" is not available in this version yet; use \"sled\"",
                ));
            }
            other => {
                return Err(invalid(
                    "store.backend",
                    format!("{other:?} is not one of \"sled\""),
                ));
            }
        }
        if self.path.is_empty() {
            return Err(invalid("store.path", "must not be empty"));
        }
        if self.cache_capacity < 1024 * 1024 {
            return Err(invalid(
                "store.cache_capacity",
                format!("{} bytes is below the 1 MiB minimum", self.cache_capacity),
            ));
        }
        Ok(StoreConfig {
            path: PathBuf::from(self.path),
            durable: self.durable,
            cache_capacity: self.cache_capacity,
        })
    }
}

impl RawAdmin {
    fn validate(self) -> Result<AdminConfig, ConfigError> {
        let listen = if self.listen.is_empty() {
            None
        } else {
            Some(self.listen.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "admin.listen",
                    format!("{:?} is not an address like 127.0.0.1:9091", self.listen),
                )
            })?)
        };
        if self.token.as_deref() == Some("") {
            return Err(invalid(
                "admin.token",
                "must not be empty (omit it instead)",
            ));
        }
        if let Some(addr) = listen {
            if !addr.ip().is_loopback() && self.token.is_none() {
                return Err(invalid(
                    "admin.token",
                    format!("admin.listen = {addr} is not loopback, so a token is required"),
                ));
            }
        }
        Ok(AdminConfig {
            listen,
            token: self.token,
        })
    }
}

/// The effective configuration as TOML with secrets masked, for `check-config`.
pub fn effective_toml(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<String, ConfigError> {
    let mut table: toml::Table =
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
    apply_env(&mut table, env)?;
    let mut raw = to_raw(table)?;
    raw.clone().validate()?;
    let mask = |s: &mut String| *s = "********".into();
    if let Some(k) = raw.security.secret_key.as_mut() {
        mask(k);
    }
    raw.security.secret_key_fallbacks.iter_mut().for_each(mask);
    if let Some(t) = raw.admin.token.as_mut() {
        mask(t);
    }
    toml::to_string(&raw).map_err(|e| ConfigError::Parse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.upstream.as_str(), "127.0.0.1:8000");
        assert_eq!(c.header_prefix, "x-session");
        assert_eq!(c.cookie.name, "sessionid");
        assert!(c.cookie.http_only && !c.cookie.secure);
        assert_eq!(c.cookie.same_site, SameSite::Lax);
        assert_eq!(c.expiry.cookie_age, Duration::from_secs(1_209_600));
        assert!(c.expiry.idle_timeout.is_none());
        assert!(c.store.durable);
        assert_eq!(c.max_session_bytes, 8192);
    }

    #[test]
    fn the_documented_example_file_is_valid() {
        let text = include_str!("../config/sidecar.toml");
        Config::from_toml(text).unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        assert!(err("listn = \"x\"").contains("listn"));
        assert!(err("[cookie]\nnmae = \"x\"").contains("nmae"));
    }

    #[test]
    fn bad_values_name_the_key_and_value() {
        let e = err("listen = \"nowhere\"");
        assert!(e.contains("`listen`") && e.contains("nowhere"), "{e}");
        let e = err("[cookie]\nsame_site = \"Sometimes\"");
        assert!(
            e.contains("cookie.same_site") && e.contains("Sometimes"),
            "{e}"
        );
        let e = err("upstream = \"https://x\"");
        assert!(e.contains("upstream"), "{e}");
        let e = err("[expiry]\ncookie_age = 0");
        assert!(e.contains("expiry.cookie_age"), "{e}");
        let e = err("upstream_timeout = \"soon\"");
        assert!(e.contains("upstream_timeout"), "{e}");
        let e = err("[admin]\nlisten = \"0.0.0.0:9091\"");
        assert!(e.contains("admin.token"), "{e}");
    }

    #[test]
    fn environment_overrides_convert_to_the_key_type() {
        let env = [
            ("SESSION_SIDECAR_UPSTREAM", "http://127.0.0.1:9000"),
            ("SESSION_SIDECAR_STORE__PATH", "/tmp/x"),
            ("SESSION_SIDECAR_UPSTREAM_TIMEOUT", "7"),
            ("SESSION_SIDECAR_COOKIE__SECURE", "true"),
            ("SESSION_SIDECAR_SKIP_PATHS", "[\"/static/\"]"),
            ("SESSION_SIDECAR_SECURITY__SECRET_KEY", "s3cret"),
            ("OTHER", "ignored"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()));
        let c = Config::from_toml_with_env("upstream_timeout = 3", env).unwrap();
        assert_eq!(c.upstream.as_str(), "127.0.0.1:9000");
        assert_eq!(c.store.path, PathBuf::from("/tmp/x"));
        assert_eq!(c.upstream_timeout, Duration::from_secs(7));
        assert!(c.cookie.secure);
        assert_eq!(c.skip_paths, vec!["/static/".to_string()]);
        assert_eq!(c.secret_key.as_deref(), Some("s3cret"));
    }

    #[test]
    fn unknown_or_mistyped_environment_variables_are_errors_naming_them() {
        let one = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let e = Config::from_toml_with_env("", one("SESSION_SIDECAR_LISTN", "x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SESSION_SIDECAR_LISTN"), "{e}");
        let e = Config::from_toml_with_env("", one("SESSION_SIDECAR_EXPIRY__COOKIE_AGE", "soon"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SESSION_SIDECAR_EXPIRY__COOKIE_AGE"), "{e}");
        let e = Config::from_toml_with_env("", one("SESSION_SIDECAR_SKIP_PATHS", "/static/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SESSION_SIDECAR_SKIP_PATHS"), "{e}");
    }

    #[test]
    fn check_config_output_masks_secrets() {
        let out = effective_toml(
            "[security]\nsecret_key = \"topsecretvalue\"\nsecret_key_fallbacks = [\"oldsecretvalue\"]",
            std::iter::empty(),
        )
        .unwrap();
        assert!(
            !out.contains("topsecretvalue") && !out.contains("oldsecretvalue"),
            "{out}"
        );
        assert!(out.contains("********"));
    }
}
