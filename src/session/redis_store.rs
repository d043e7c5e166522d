//! The shared store: Redis, for several sidecars serving the same visitors (docs/HEADERS.md §9).
//!
//! The same [`Engine`] as sled runs on top, so every clause holds the same way; Redis provides
//! the cells. A cell is one string key, `{prefix}r:{session key}`, holding the same bytes as a
//! sled entry, with a Redis expiry at the entry's deadline (no sweeper needed). The swap is one
//! Lua script, run with EVALSHA, so compare, write and the subject-set update are one atomic
//! step on the Redis side. Subjects are sets `{prefix}u:{subject}`; members whose session has
//! gone are dropped when the set is read.
//!
//! Durability follows the Redis server's persistence settings (README, "More than one
//! machine"); `sync` has nothing to wait for here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::engine::{Cells, Engine};
use super::entry::Entry;
use super::store::{StoreError, Swept};
use super::{Millis, Policy};

/// Where the shared store is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    pub url: String,
    pub key_prefix: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub tls_ca_file: Option<PathBuf>,
}

/// KEYS[1] the cell. ARGV: 1 "0" = expect absent, "1" = expect ARGV[2]; 3 new bytes ("" =
/// delete); 4 new deadline (ms, PXAT); 5 session key; 6 old subject set ("" none); 7 new
/// subject set ("" none).
const SWAP: &str = r#"
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '0' then
  if cur then return 0 end
elseif cur ~= ARGV[2] then
  return 0
end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PXAT', ARGV[4])
end
if ARGV[6] ~= ARGV[7] then
  if ARGV[6] ~= '' then redis.call('SREM', ARGV[6], ARGV[5]) end
  if ARGV[7] ~= '' then redis.call('SADD', ARGV[7], ARGV[5]) end
end
return 1
"#;

/// Redis drops a cell this long after its deadline: the sidecars decide expiry by their own
/// clocks, so a Redis clock a little ahead of theirs must not remove a live session.
const EXPIRY_GRACE_MS: Millis = 60_000;

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(format!("redis: {e}"))
}

pub struct RedisCells {
    conn: ConnectionManager,
    prefix: String,
    swap: Script,
}

impl RedisCells {
    fn cell(&self, key: &str) -> String {
        format!("{}r:{key}", self.prefix)
    }

    fn subject_set(&self, entry: Option<&Entry>) -> String {
        match entry {
            Some(Entry::Session(r)) => r
                .subject
                .as_deref()
                .map(|s| format!("{}u:{s}", self.prefix))
                .unwrap_or_default(),
            _ => String::new(),
        }
    }
}

#[async_trait]
impl Cells for RedisCells {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.conn.clone();
        conn.get(self.cell(key)).await.map_err(backend)
    }

    async fn swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        old: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let swapped: i64 = self
            .swap
            .key(self.cell(key))
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or_default())
            .arg(new.map(Entry::encode).unwrap_or_default())
            .arg(new.map_or(0, Entry::deadline).max(0) + EXPIRY_GRACE_MS)
            .arg(key)
            .arg(self.subject_set(old))
            .arg(self.subject_set(new))
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(swapped == 1)
    }

    async fn subject_members(&self, subject: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        conn.smembers(format!("{}u:{subject}", self.prefix))
            .await
            .map_err(backend)
    }

    async fn find_key(
        &self,
        wanted: &(dyn for<'k> Fn(&'k str) -> bool + Sync),
    ) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        let cells = format!("{}r:", self.prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{cells}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(backend)?;
            if let Some(k) = keys
                .iter()
                .filter_map(|k| k.strip_prefix(&cells))
                .find(|k| wanted(k))
            {
                return Ok(Some(k.to_string()));
            }
            if next == 0 {
                return Ok(None);
            }
            cursor = next;
        }
    }

    async fn forget_member(&self, subject: &str, key: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = conn
            .srem(format!("{}u:{subject}", self.prefix), key)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn sweep(&self, _now: Millis) -> Result<Swept, StoreError> {
        // Redis expires every cell at its deadline by itself.
        Ok(Swept::default())
    }

    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(backend)
    }
}

/// The shared store: the same [`Engine`] as sled, over Redis cells.
pub type RedisStore = Engine<RedisCells>;

impl RedisStore {
    pub async fn connect(
        cfg: &RedisSettings,
        policy: Arc<Policy>,
        max_bytes: usize,
    ) -> Result<RedisStore, StoreError> {
        let open = |reason: String| StoreError::Open {
            path: redact(&cfg.url),
            reason,
        };
        if cfg.url.starts_with("rediss://") {
            // rustls needs one crypto provider for the process; ring is the one built in.
            // Installing twice (a second store, tests) is harmless.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = match &cfg.tls_ca_file {
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| open(format!("store.tls_ca_file {}: {e}", ca.display())))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                redis::Client::build_with_tls(cfg.url.as_str(), certs)
            }
            None => redis::Client::open(cfg.url.as_str()),
        }
        .map_err(|e| open(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(cfg.command_timeout))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| open(e.to_string()))?;
        Ok(Engine {
            cells: RedisCells {
                conn,
                prefix: cfg.key_prefix.clone(),
                swap: Script::new(SWAP),
            },
            policy,
            max_bytes,
        })
    }
}

/// The URL without its user and password, for messages: the userinfo ends at the authority's
/// last `@` (a password may hold `@` itself).
pub fn redact(url: &str) -> String {
    let Some(s) = url.find("://").map(|s| s + 3) else {
        return url.to_string();
    };
    let authority_end = url[s..].find(['/', '?', '#']).map_or(url.len(), |e| s + e);
    match url[s..authority_end].rfind('@') {
        Some(at) => format!("{}********{}", &url[..s], &url[s + at..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_a_password_holding_at_signs() {
        let r = super::redact("redis://user:p@ss@w0rd@redis.internal:6379/0");
        assert_eq!(r, "redis://********@redis.internal:6379/0");
        assert_eq!(super::redact("redis://h:1/0?x=a@b"), "redis://h:1/0?x=a@b");
        assert_eq!(super::redact("not a url"), "not a url");
    }
}
