//! The validation step: raw values into types that cannot hold a bad value.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

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
        if self.workers > 1024 {
            return Err(invalid(
                "workers",
                format!("{} is outside 0..=1024 (0: one per CPU)", self.workers),
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be greater than 0"));
        }
        let cookie = self.cookie.validate()?;
        let expiry = self.expiry.validate()?;
        let encrypt = self.store.encrypt;
        let mut store = self.store.validate()?;
        let mut sec = self.security;
        sec.secret_key = from_file(
            "security.secret_key",
            sec.secret_key,
            sec.secret_key_file.as_deref(),
        )?;
        if sec.secret_key.as_deref() == Some("") {
            return Err(invalid(
                "security.secret_key",
                "must not be empty (omit it instead)",
            ));
        }
        long_enough("security.secret_key", sec.secret_key.as_deref())?;
        let upstream_signing_key = from_file(
            "security.upstream_signing_key",
            sec.upstream_signing_key.take(),
            sec.upstream_signing_key_file.as_deref(),
        )?;
        long_enough(
            "security.upstream_signing_key",
            upstream_signing_key.as_deref(),
        )?;
        let identity_header = identity_header(&self.identity.header, &header_prefix)?;
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
        store.encrypt = match (encrypt, &sec.secret_key) {
            (Some(true), None) => {
                return Err(invalid(
                    "store.encrypt",
                    "encrypting records needs a security.secret_key to derive the key from",
                ));
            }
            (Some(on), _) => on,
            (None, secret) => secret.is_some(),
        };
        let admin = self.admin.validate()?;
        let csrf = self.csrf.validate()?;
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
            idle_connection_timeout: secs(
                "idle_connection_timeout",
                self.idle_connection_timeout,
                false,
            )?,
            workers: match self.workers {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            },
            upgrades: validate_upgrades(&self.upgrades)?,
            log_json: match self.log_format.as_str() {
                "text" => false,
                "json" => true,
                other => {
                    return Err(invalid(
                        "log_format",
                        format!("{other:?} is not one of \"text\", \"json\""),
                    ));
                }
            },
            log_level: validate_log_level(self.log_level)?,
            cookie,
            expiry,
            store,
            secret_key: sec.secret_key,
            secret_key_fallbacks: sec.secret_key_fallbacks,
            upstream_signing_key,
            identity_header,
            admin,
            csrf,
            max_sessions_per_subject: (self.limits.max_sessions_per_subject > 0)
                .then_some(self.limits.max_sessions_per_subject),
            new_sessions_per_minute: std::num::NonZeroU32::new(self.limits.new_sessions_per_minute),
        })
    }
}

/// A secret of at least [`MIN_SECRET_BYTES`], when given.
fn long_enough(key: &str, secret: Option<&str>) -> Result<(), ConfigError> {
    match secret {
        Some(k) if k.len() < MIN_SECRET_BYTES => Err(invalid(
            key,
            format!(
                "is {} bytes; use at least {MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -hex 32`)",
                k.len()
            ),
        )),
        _ => Ok(()),
    }
}

/// `[identity] header`: a header name of the app's own, not one the sidecar or HTTP already
/// gives a meaning to.
fn identity_header(name: &str, prefix: &str) -> Result<Option<http::HeaderName>, ConfigError> {
    if name.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| invalid("identity.header", format!("{name:?} {why}"));
    let header = http::HeaderName::from_bytes(name.as_bytes())
        .ok()
        .filter(|_| is_token(name))
        .ok_or_else(|| bad("is not a valid header name"))?;
    if crate::headers::is_ours(header.as_str(), prefix) {
        return Err(bad(
            "is one of the sidecar's own session headers (header_prefix)",
        ));
    }
    let reserved = crate::headers::HOP_BY_HOP.contains(&header)
        || crate::headers::UNTRUSTED_FORWARDING.contains(&header)
        || [
            http::header::HOST,
            http::header::COOKIE,
            http::header::AUTHORIZATION,
            http::header::CONTENT_LENGTH,
            http::header::CONTENT_TYPE,
            http::header::UPGRADE,
        ]
        .contains(&header)
        || header.as_str().starts_with("x-forwarded-");
    if reserved {
        return Err(bad("already means something to HTTP or to the proxy chain"));
    }
    Ok(Some(header))
}

fn validate_upgrades(list: &[String]) -> Result<Vec<String>, ConfigError> {
    list.iter()
        .map(|p| {
            let p = p.trim().to_ascii_lowercase();
            if !is_token(&p) {
                return Err(invalid("upgrades", format!("{p:?} is not a protocol name")));
            }
            if p == "h2c" {
                return Err(invalid(
                    "upgrades",
                    "h2c cannot be allowed: a spliced HTTP/2 connection would carry later requests to the app unscrubbed",
                ));
            }
            Ok(p)
        })
        .collect()
}

fn parse_upstream(text: &str) -> Result<UpstreamAddr, ConfigError> {
    let bad = |why: &str| invalid("upstream", format!("{text:?} {why}"));
    if let Some(path) = text.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(bad(
                "needs an absolute socket path, e.g. unix:/run/app.sock",
            ));
        }
        return Ok(UpstreamAddr::Unix(PathBuf::from(path)));
    }
    let uri: http::Uri = text.parse().map_err(|_| bad("is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(bad(&format!(
                "uses scheme {other:?}; only http:// and unix:/path are supported"
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
    Ok(UpstreamAddr::Tcp(authority))
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
        if let Some(d) = &self.domain
            && (d.is_empty() || d.bytes().any(|b| b == b';' || b <= b' ' || b >= 0x7f))
        {
            return Err(invalid("cookie.domain", format!("{d:?} is not a domain")));
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
        // Browsers drop a cookie whose name prefix promises what its attributes do not keep
        // (RFC 6265bis §4.1.3; the prefixes are matched without regard to case).
        let lower = self.name.to_ascii_lowercase();
        if lower.starts_with("__host-")
            && !(self.secure && self.path == "/" && self.domain.is_none())
        {
            return Err(invalid(
                "cookie.name",
                format!(
                    "{:?}: a __Host- cookie needs secure = true, path = \"/\" and no domain, or browsers drop it",
                    self.name
                ),
            ));
        }
        if lower.starts_with("__secure-") && !self.secure {
            return Err(invalid(
                "cookie.name",
                format!(
                    "{:?}: a __Secure- cookie needs secure = true, or browsers drop it",
                    self.name
                ),
            ));
        }
        if self.partitioned && !self.secure {
            return Err(invalid(
                "cookie.partitioned",
                "a Partitioned cookie needs secure = true, or browsers drop it",
            ));
        }
        Ok(CookieConfig {
            name: self.name,
            path: self.path,
            domain: self.domain,
            secure: self.secure,
            http_only: self.http_only,
            same_site,
            partitioned: self.partitioned,
        })
    }
}

impl RawCsrf {
    fn validate(self) -> Result<CsrfConfig, ConfigError> {
        let mut trusted_origins = Vec::new();
        for o in &self.trusted_origins {
            let lower = o.to_ascii_lowercase();
            let well_formed = lower
                .split_once("://")
                .filter(|(scheme, _)| matches!(*scheme, "http" | "https"))
                .and_then(|(_, authority)| authority.parse::<http::uri::Authority>().ok())
                .is_some_and(|a| !a.as_str().contains('@') && !a.host().is_empty());
            if !well_formed || lower.ends_with('/') {
                return Err(invalid(
                    "csrf.trusted_origins",
                    format!(
                        "{o:?} is not an origin like \"https://example.com\" or \"https://example.com:8443\" (scheme and host, no path)"
                    ),
                ));
            }
            trusted_origins.push(lower);
        }
        for p in &self.exempt_paths {
            if !p.starts_with('/') {
                return Err(invalid(
                    "csrf.exempt_paths",
                    format!("{p:?} must start with '/'"),
                ));
            }
        }
        let token = if self.token {
            let header = http::HeaderName::from_bytes(self.token_header.as_bytes())
                .ok()
                .filter(|_| is_token(&self.token_header))
                .ok_or_else(|| {
                    invalid(
                        "csrf.token_header",
                        format!("{:?} is not a valid header name", self.token_header),
                    )
                })?;
            if self.max_form_bytes == 0 {
                return Err(invalid("csrf.max_form_bytes", "must be greater than 0"));
            }
            Some(CsrfToken {
                header,
                field: (!self.token_field.is_empty()).then_some(self.token_field),
                max_form_bytes: self.max_form_bytes,
            })
        } else {
            None
        };
        Ok(CsrfConfig {
            check_origin: self.check_origin,
            trusted_origins,
            exempt_paths: self.exempt_paths,
            token,
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
            retired_grace: secs("expiry.retired_grace", self.retired_grace, true)?,
            sweep_interval: secs("expiry.sweep_interval", self.sweep_interval, false)?,
        })
    }
}

impl RawStore {
    fn validate(self) -> Result<StoreConfig, ConfigError> {
        if self.backend != "redis" && self.wait_replicas > 0 {
            return Err(invalid(
                "store.wait_replicas",
                "waiting for replicas applies only with store.backend = \"redis\"",
            ));
        }
        if self.backend != "redis" && !self.cluster_nodes.is_empty() {
            return Err(invalid(
                "store.cluster_nodes",
                "Redis Cluster applies only with store.backend = \"redis\"",
            ));
        }
        if !self.cluster_nodes.is_empty() && !self.sentinels.is_empty() {
            return Err(invalid(
                "store.cluster_nodes",
                "give store.cluster_nodes or store.sentinels, not both",
            ));
        }
        if self.backend != "redis" && !(self.sentinels.is_empty() && self.master_name.is_empty()) {
            return Err(invalid(
                "store.sentinels",
                "Redis Sentinel applies only with store.backend = \"redis\"",
            ));
        }
        if self.backend != "redis" && self.legacy_names {
            return Err(invalid(
                "store.legacy_names",
                "applies only with store.backend = \"redis\": one process holds a sled store, so no older release shares it",
            ));
        }
        let backend = match self.backend.as_str() {
            "sled" => Backend::Sled,
            "redis" => {
                let scheme = self.url.split("://").next().unwrap_or("");
                if !matches!(scheme, "redis" | "rediss") || !self.url.contains("://") {
                    return Err(invalid(
                        "store.url",
                        "must be redis://host:port/db or rediss://host:port/db",
                    ));
                }
                if self.tls_ca_file.is_some() && scheme != "rediss" {
                    return Err(invalid(
                        "store.tls_ca_file",
                        "only applies to a rediss:// (TLS) url",
                    ));
                }
                if self.key_prefix.is_empty() {
                    return Err(invalid("store.key_prefix", "must not be empty"));
                }
                let master_name = match (self.sentinels.is_empty(), self.master_name.is_empty()) {
                    (true, true) => None,
                    (false, false) => Some(self.master_name),
                    (true, false) => {
                        return Err(invalid(
                            "store.master_name",
                            "applies only with store.sentinels",
                        ));
                    }
                    (false, true) => {
                        return Err(invalid(
                            "store.master_name",
                            "store.sentinels needs the name the sentinels monitor the master under",
                        ));
                    }
                };
                for (key, urls) in [
                    ("store.sentinels", &self.sentinels),
                    ("store.cluster_nodes", &self.cluster_nodes),
                ] {
                    if let Some(bad) = urls
                        .iter()
                        .find(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
                    {
                        return Err(invalid(
                            key,
                            format!(
                                "{:?} is not redis://host:port or rediss://host:port",
                                crate::session::redact(bad)
                            ),
                        ));
                    }
                    if !urls.is_empty() && self.tls_ca_file.is_some() {
                        return Err(invalid(
                            "store.tls_ca_file",
                            format!(
                                "is not supported with {key} (a certificate from the public web PKI works)"
                            ),
                        ));
                    }
                }
                let command_timeout = secs("store.command_timeout", self.command_timeout, false)?;
                if self.wait_replicas > 0
                    && !(1..command_timeout.as_millis() as u64).contains(&self.wait_timeout_ms)
                {
                    return Err(invalid(
                        "store.wait_timeout_ms",
                        format!(
                            "{} is outside 1..{} (it must end before store.command_timeout)",
                            self.wait_timeout_ms,
                            command_timeout.as_millis()
                        ),
                    ));
                }
                Backend::Redis(RedisConfig {
                    url: self.url,
                    wait_replicas: self.wait_replicas,
                    wait_timeout: Duration::from_millis(self.wait_timeout_ms),
                    sentinels: self.sentinels,
                    master_name,
                    cluster_nodes: self.cluster_nodes,
                    key_prefix: self.key_prefix,
                    connect_timeout: secs("store.connect_timeout", self.connect_timeout, false)?,
                    command_timeout,
                    tls_ca_file: self.tls_ca_file.map(PathBuf::from),
                })
            }
            other => {
                return Err(invalid(
                    "store.backend",
                    format!("{other:?} is not one of \"sled\", \"redis\""),
                ));
            }
        };
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
            backend,
            path: PathBuf::from(self.path),
            durable: self.durable,
            cache_capacity: self.cache_capacity,
            // Decided with the secret, in `RawConfig::validate`.
            encrypt: false,
            legacy_names: self.legacy_names,
        })
    }
}

/// A secret given inline or as a file (`{key}_file`), not both. The file's content is taken as
/// it is but for one trailing newline, which `echo` and editors add.
fn from_file(
    key: &str,
    inline: Option<String>,
    file: Option<&str>,
) -> Result<Option<String>, ConfigError> {
    let Some(path) = file else {
        return Ok(inline);
    };
    if inline.is_some() {
        return Err(invalid(
            &format!("{key}_file"),
            format!("give {key} or {key}_file, not both"),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(&format!("{key}_file"), format!("cannot read {path:?}: {e}")))?;
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if text.is_empty() {
        return Err(invalid(
            &format!("{key}_file"),
            format!("{path:?} is empty"),
        ));
    }
    Ok(Some(text.to_string()))
}

impl RawAdmin {
    fn validate(mut self) -> Result<AdminConfig, ConfigError> {
        self.token = from_file("admin.token", self.token, self.token_file.as_deref())?;
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
        if let Some(addr) = listen
            && !addr.ip().is_loopback()
            && self.token.is_none()
        {
            return Err(invalid(
                "admin.token",
                format!("admin.listen = {addr} is not loopback, so a token is required"),
            ));
        }
        Ok(AdminConfig {
            listen,
            token: self.token,
        })
    }
}

/// A filter `tracing` accepts, in `RUST_LOG`'s syntax.
fn validate_log_level(level: String) -> Result<String, ConfigError> {
    match tracing_subscriber::EnvFilter::builder().parse(&level) {
        Ok(_) => Ok(level),
        Err(e) => Err(invalid(
            "log_level",
            format!("{level:?} is not a log filter (such as \"info\" or \"warn,access=off\"): {e}"),
        )),
    }
}
