//! `SESSION_SIDECAR_*` overrides: each variable's text converted to the type of its key.

use std::collections::BTreeMap;

use super::{ConfigError, ENV_PREFIX, invalid};

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
    ("", "idle_connection_timeout", Kind::Int),
    ("", "workers", Kind::Int),
    ("", "upgrades", Kind::List),
    ("", "log_format", Kind::Str),
    ("", "log_level", Kind::Str),
    ("cookie", "name", Kind::Str),
    ("cookie", "path", Kind::Str),
    ("cookie", "domain", Kind::Str),
    ("cookie", "secure", Kind::Bool),
    ("cookie", "http_only", Kind::Bool),
    ("cookie", "same_site", Kind::Str),
    ("cookie", "partitioned", Kind::Bool),
    ("expiry", "cookie_age", Kind::Int),
    ("expiry", "expire_at_browser_close", Kind::Bool),
    ("expiry", "save_every_request", Kind::Bool),
    ("expiry", "idle_timeout", Kind::Int),
    ("expiry", "absolute_timeout", Kind::Int),
    ("expiry", "retired_grace", Kind::Int),
    ("expiry", "sweep_interval", Kind::Int),
    ("store", "backend", Kind::Str),
    ("store", "path", Kind::Str),
    ("store", "durable", Kind::Bool),
    ("store", "encrypt", Kind::Bool),
    ("store", "legacy_names", Kind::Bool),
    ("store", "sentinels", Kind::List),
    ("store", "master_name", Kind::Str),
    ("store", "cluster_nodes", Kind::List),
    ("store", "wait_replicas", Kind::Int),
    ("store", "wait_timeout_ms", Kind::Int),
    ("store", "cache_capacity", Kind::Int),
    ("store", "url", Kind::Str),
    ("store", "key_prefix", Kind::Str),
    ("store", "connect_timeout", Kind::Int),
    ("store", "command_timeout", Kind::Int),
    ("store", "tls_ca_file", Kind::Str),
    ("security", "secret_key", Kind::Str),
    ("security", "secret_key_file", Kind::Str),
    ("security", "secret_key_fallbacks", Kind::List),
    ("security", "upstream_signing_key", Kind::Str),
    ("security", "upstream_signing_key_file", Kind::Str),
    ("identity", "header", Kind::Str),
    ("admin", "listen", Kind::Str),
    ("admin", "token", Kind::Str),
    ("admin", "token_file", Kind::Str),
    ("limits", "max_sessions_per_subject", Kind::Int),
    ("limits", "new_sessions_per_minute", Kind::Int),
    ("csrf", "check_origin", Kind::Bool),
    ("csrf", "trusted_origins", Kind::List),
    ("csrf", "exempt_paths", Kind::List),
    ("csrf", "token", Kind::Bool),
    ("csrf", "token_header", Kind::Str),
    ("csrf", "token_field", Kind::Str),
    ("csrf", "max_form_bytes", Kind::Int),
];

pub(crate) fn apply_env(
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

#[cfg(test)]
mod tests {
    /// Every key the file may hold can be set from the environment: walks the defaults as TOML
    /// (keys whose default is absent are set to a placeholder first).
    #[test]
    fn every_key_of_the_file_has_a_variable() {
        let mut raw = super::super::RawConfig::default();
        raw.cookie.domain = Some("x".into());
        raw.store.tls_ca_file = Some("x".into());
        raw.security.secret_key = Some("x".into());
        raw.security.secret_key_file = Some("x".into());
        raw.admin.token = Some("x".into());
        raw.admin.token_file = Some("x".into());
        let table: toml::Table = toml::from_str(&toml::to_string(&raw).unwrap()).unwrap();
        for (name, value) in &table {
            let keys: Vec<(String, String)> = match value {
                toml::Value::Table(t) => t.keys().map(|k| (name.clone(), k.clone())).collect(),
                _ => vec![(String::new(), name.clone())],
            };
            for (section, key) in keys {
                assert!(
                    super::KEYS
                        .iter()
                        .any(|(s, k, _)| *s == section && *k == key),
                    "no SESSION_SIDECAR_ variable for {section}.{key}"
                );
            }
        }
    }
}
