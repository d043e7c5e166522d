//! The serde layer: what the file may hold, every key with its default.

use serde::{Deserialize, Serialize};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:8000";
pub const DEFAULT_UPSTREAM_TIMEOUT: u64 = 30;
pub const DEFAULT_LOG_LEVEL: &str = "info";
pub const DEFAULT_HEADER_PREFIX: &str = "X-Session";
pub const DEFAULT_MAX_SESSION_BYTES: usize = 8192;
pub const DEFAULT_SHUTDOWN_GRACE: u64 = 30;
pub const DEFAULT_COOKIE_NAME: &str = "sessionid";
pub const DEFAULT_COOKIE_AGE: u64 = 1_209_600;
pub const DEFAULT_SWEEP_INTERVAL: u64 = 300;
/// Seconds a key retired by a cycle or a flush stays known as retired.
pub const DEFAULT_RETIRED_GRACE: u64 = 60;
pub const DEFAULT_STORE_PATH: &str = "data/sessions";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
pub const DEFAULT_REDIS_PREFIX: &str = "session-sidecar:";
pub const DEFAULT_CACHE_CAPACITY: u64 = 64 * 1024 * 1024;
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_HEADERS: usize = 100;
pub const DEFAULT_HEADER_READ_TIMEOUT: u64 = 30;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_IDLE_CONNECTION_TIMEOUT: u64 = 120;
/// The protocols a client may switch to through the sidecar: those it can vouch for.
pub const DEFAULT_UPGRADES: &[&str] = &["websocket"];
/// The shortest `secret_key` accepted: 32 bytes, the strength of the HMAC it keys.
pub const MIN_SECRET_BYTES: usize = 32;
/// Prefix of the environment variables that override keys of the file.
pub const ENV_PREFIX: &str = "SESSION_SIDECAR_";
pub const DEFAULT_CSRF_TOKEN_HEADER: &str = "X-CSRF-Token";
pub const DEFAULT_CSRF_TOKEN_FIELD: &str = "csrfmiddlewaretoken";
pub const DEFAULT_CSRF_MAX_FORM_BYTES: usize = 1024 * 1024;

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
    pub idle_connection_timeout: u64,
    /// 0: one per CPU the process may use.
    pub workers: usize,
    pub upgrades: Vec<String>,
    pub log_format: String,
    /// A `tracing` filter (`info`, `warn,access=off`); `RUST_LOG`, when set, wins.
    pub log_level: String,
    pub cookie: RawCookie,
    pub expiry: RawExpiry,
    pub store: RawStore,
    pub security: RawSecurity,
    pub admin: RawAdmin,
    pub csrf: RawCsrf,
    pub limits: RawLimits,
    pub identity: RawIdentity,
}

/// `[identity]`: the subject handed to an app that takes its user from a proxy header
/// (Grafana's `X-WEBAUTH-USER`, Gitea's reverse-proxy auth, `REMOTE_USER` through a front
/// server).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIdentity {
    /// The request header that carries the session's subject ("": none). Every client spelling
    /// of it is removed.
    pub header: String,
}

/// Per-user and per-client limits (docs/PROTECTING.md).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// A subject keeps at most this many sessions: tagging one more ends the oldest others.
    /// 0 = no limit.
    pub max_sessions_per_subject: usize,
    /// New sessions one client address may create per minute (429 beyond). 0 = no limit.
    pub new_sessions_per_minute: u32,
}

/// Cross-site request forgery defences for the app (docs/PROTECTING.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCsrf {
    /// Refuse an unsafe request carrying the session cookie that a browser says comes from
    /// another site (`Sec-Fetch-Site`), or whose `Origin` is not the request's own host.
    pub check_origin: bool,
    /// Origins (`https://host[:port]`) whose requests pass the origin check.
    pub trusted_origins: Vec<String>,
    /// Path prefixes with no CSRF check at all (webhooks).
    pub exempt_paths: Vec<String>,
    /// Require a per-session token on unsafe requests carrying the session cookie; the app
    /// receives it in `{header_prefix}-Csrf`.
    pub token: bool,
    /// The request header the token comes back in.
    pub token_header: String,
    /// Or the field of an `application/x-www-form-urlencoded` body ("": the header only).
    pub token_field: String,
    /// The most of such a body read to find the field (413 beyond it).
    pub max_form_bytes: usize,
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
    /// CHIPS: a cookie kept per top-level site when the app is embedded in another's page.
    pub partitioned: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawExpiry {
    pub cookie_age: u64,
    pub expire_at_browser_close: bool,
    pub save_every_request: bool,
    pub idle_timeout: u64,
    pub absolute_timeout: u64,
    /// Seconds a key retired by a cycle or a flush stays known (0: off).
    pub retired_grace: u64,
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
    /// Encrypt session records with a key derived from `security.secret_key`. Absent: on when a
    /// secret is configured.
    pub encrypt: Option<bool>,
    /// Redis: write sessions as the release before did (under their keys in clear), while
    /// sidecars of that release share the store (a rolling upgrade). Off: every session moves
    /// to its key's digest.
    pub legacy_names: bool,
    /// Redis: `redis://[user:password@]host:port/db` or `rediss://` (TLS).
    pub url: String,
    /// Redis: prefix of every key the sidecar writes.
    pub key_prefix: String,
    /// Redis: seconds to establish a connection.
    pub connect_timeout: u64,
    /// Redis: seconds to wait for one command's answer before the request gets 503.
    pub command_timeout: u64,
    /// Redis over TLS: a PEM file of the CA that signed the server's certificate, when it is not
    /// in the public web PKI (a private CA). Absent: the public roots.
    pub tls_ca_file: Option<String>,
    /// Redis Sentinel: the sentinels' addresses (`redis://host:26379`); the master is found
    /// through them, and found again after a failover. `url` then gives only the user, password
    /// and database of the data nodes.
    pub sentinels: Vec<String>,
    /// Redis Sentinel: the name the sentinels monitor the master under.
    pub master_name: String,
    /// Redis Cluster: some of its nodes' URLs (the rest are discovered); `url` is then unused.
    pub cluster_nodes: Vec<String>,
    /// Redis: acknowledge a change only once this many replicas have it (`WAIT`); 0 = off.
    pub wait_replicas: u32,
    /// Redis: milliseconds `WAIT` may take before the change is refused with 503.
    pub wait_timeout_ms: u64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSecurity {
    pub secret_key: Option<String>,
    /// A file holding the secret (Docker and Kubernetes secrets); one trailing newline is dropped.
    pub secret_key_file: Option<String>,
    pub secret_key_fallbacks: Vec<String>,
    /// A key shared with the app: every request to it carries `X-Session-Signature`.
    pub upstream_signing_key: Option<String>,
    /// The key in a file, as `secret_key_file`.
    pub upstream_signing_key_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub listen: String,
    pub token: Option<String>,
    /// A file holding the token, as `security.secret_key_file`.
    pub token_file: Option<String>,
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
            idle_connection_timeout: DEFAULT_IDLE_CONNECTION_TIMEOUT,
            workers: 0,
            upgrades: DEFAULT_UPGRADES.iter().map(|s| s.to_string()).collect(),
            log_format: "text".into(),
            log_level: DEFAULT_LOG_LEVEL.into(),
            cookie: RawCookie::default(),
            expiry: RawExpiry::default(),
            store: RawStore::default(),
            security: RawSecurity::default(),
            admin: RawAdmin::default(),
            csrf: RawCsrf::default(),
            limits: RawLimits::default(),
            identity: RawIdentity::default(),
        }
    }
}

impl Default for RawCsrf {
    fn default() -> Self {
        RawCsrf {
            check_origin: false,
            trusted_origins: Vec::new(),
            exempt_paths: Vec::new(),
            token: false,
            token_header: DEFAULT_CSRF_TOKEN_HEADER.into(),
            token_field: DEFAULT_CSRF_TOKEN_FIELD.into(),
            max_form_bytes: DEFAULT_CSRF_MAX_FORM_BYTES,
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
            partitioned: false,
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
            retired_grace: DEFAULT_RETIRED_GRACE,
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
            encrypt: None,
            legacy_names: false,
            url: DEFAULT_REDIS_URL.into(),
            key_prefix: DEFAULT_REDIS_PREFIX.into(),
            connect_timeout: 5,
            command_timeout: 2,
            tls_ca_file: None,
            sentinels: Vec::new(),
            master_name: String::new(),
            cluster_nodes: Vec::new(),
            wait_replicas: 0,
            wait_timeout_ms: 1000,
        }
    }
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: DEFAULT_ADMIN_LISTEN.into(),
            token: None,
            token_file: None,
        }
    }
}
