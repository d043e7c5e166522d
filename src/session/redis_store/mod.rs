//! The shared store: Redis, for several sidecars serving the same visitors (docs/HEADERS.md §9).
//!
//! The same [`Engine`] as sled runs on top, so every clause holds the same way; Redis provides
//! the cells. A cell is one string key, `{prefix}r:{session key}`, holding the same bytes as a
//! sled entry, with a Redis expiry at the entry's deadline (no sweeper needed). The swap is one
//! Lua script, run with EVALSHA, so compare, write and the subject-set update are one atomic
//! step on the Redis side. Subjects are sets `{prefix}u:{subject}`; members whose session has
//! gone are dropped when the set is read.
//!
//! Durability follows the Redis server's persistence settings (docs/SCALING.md, "More than one
//! machine"); `sync` has nothing to wait for here.
//!
//! End notices spare a read-only request its second round trip: every swap that ends a
//! session, cycles it or brings its expiry forward publishes the session's handle (a one-way
//! name, [`super::id::handle`]) on `{prefix}ended` from inside the script, and each sidecar listens on its own data connection
//! (RESP3 carries replies and pushes on one connection). The liveness check after a read-only
//! response then asks Redis only when a notice for its key arrived since the load, or when a
//! notice may have been missed (see `notices::Notices`).

mod link;
mod notices;

pub use link::redact;
use link::{Conn, Link, Source, fixed_client, redact_all, sentinel_client};
use notices::{Notices, listen};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use redis::aio::ConnectionManagerConfig;
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncCommands, ProtocolVersion, Script};

use super::engine::{Cells, Engine, Indexed};
use super::entry::Codec;
use super::store::{BoxError, Cell, Mark, StoreError, Swept};
use super::{Millis, Policy};

/// Where the shared store is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]

pub struct RedisSettings {
    pub url: String,
    /// Sentinel addresses; when given, the master is found through them (`url` then gives the
    /// data nodes' user, password and database only).
    pub sentinels: Vec<String>,
    pub master_name: Option<String>,
    /// Redis Cluster seed nodes; when given, keys go to the node serving their slot.
    pub cluster_nodes: Vec<String>,
    /// Replicas that must have a change before it is acknowledged (`WAIT`); 0: none.
    pub wait_replicas: u32,
    pub wait_timeout: Duration,
    pub key_prefix: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub tls_ca_file: Option<PathBuf>,
}

/// KEYS[1] the cell. ARGV: 1 "0" = expect absent, "1" = expect ARGV[2]; 3 new bytes ("" =
/// delete); 4 new deadline (ms, PXAT); 5 session key; 6 old subject set ("" none); 7 new
/// subject set ("" none); 8 the channel to publish the session's handle (ARGV 9) on ("" none:
/// the change ends nothing). The handle, not the key: a subscriber learns nothing it could use. Every sidecar trusts the others' notices, so one that cannot publish must not
/// run: start-up checks it may (ACL), and a notice refused later fails the swap (503).
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
if ARGV[8] ~= '' then redis.call('PUBLISH', ARGV[8], ARGV[9]) end
return 1
"#;

/// Redis drops a cell this long after its deadline: the sidecars decide expiry by their own
/// clocks, so a Redis clock a little ahead of theirs must not remove a live session.
const EXPIRY_GRACE_MS: Millis = 60_000;

fn backend(e: impl Into<BoxError>) -> StoreError {
    StoreError::Backend("redis", e.into())
}

pub struct RedisCells {
    link: Arc<Link>,
    prefix: String,
    swap: Script,
    codec: ArcSwap<Codec>,
    replicas: Replicas,
    /// A sweep found none of the release before's cells or subject sets left.
    legacy_gone: std::sync::atomic::AtomicBool,
}

/// How many replicas must have a change before it is acknowledged (`WAIT`), and for how long
/// to wait for them.
struct Replicas {
    wanted: u32,
    timeout: Duration,
}

impl Replicas {
    /// `WAIT`'s answer: enough replicas, or the change is not acknowledged (503).
    fn confirmed(&self, acked: u32) -> Result<(), StoreError> {
        if acked >= self.wanted {
            return Ok(());
        }
        Err(backend(format!(
            "{acked} of {} replica(s) confirmed the change within {:?}",
            self.wanted, self.timeout
        )))
    }

    /// Adds the `WAIT` for this many replicas to `pipe`, after the command it confirms.
    fn wait(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("WAIT")
            .arg(self.wanted)
            .arg(self.timeout.as_millis() as u64);
    }
}

impl RedisCells {
    /// SCANs one server for every key matching `pattern`; `node` picks a cluster node by
    /// address.
    async fn scan_node(
        &self,
        mut conn: Conn,
        node: Option<(String, u16)>,
        pattern: &str,
        found: &mut Vec<String>,
    ) -> Result<(), StoreError> {
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) = match (&mut conn, &node) {
                (Conn::Cluster(c), Some((host, port))) => {
                    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    });
                    let value = self.link.run(c.route_command(scan, routing)).await?;
                    redis::from_redis_value(value)
                        .map_err(|e| backend(redis::RedisError::from(e)))?
                }
                _ => self.link.run(scan.query_async(&mut conn)).await?,
            };
            found.extend(keys);
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Every key matching `pattern`, on every master of a cluster (SCAN walks one node).
    async fn scan_all(&self, pattern: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.link.get();
        let mut found = Vec::new();
        let Conn::Cluster(mut cluster) = conn.clone() else {
            self.scan_node(conn, None, pattern, &mut found).await?;
            return Ok(found);
        };
        let nodes: String = self
            .link
            .run(cluster.route_command(
                redis::cmd("CLUSTER").arg("NODES").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            ))
            .await
            .and_then(|v| {
                redis::from_redis_value(v).map_err(|e| backend(redis::RedisError::from(e)))
            })?;
        for line in nodes
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
        {
            let Some((host, port)) = line
                .split_whitespace()
                .nth(1)
                .and_then(|a| a.split('@').next())
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
            else {
                continue;
            };
            self.scan_node(conn.clone(), Some((host, port)), pattern, &mut found)
                .await?;
        }
        Ok(found)
    }

    /// The Redis key of a cell: `{prefix}s:{digest}`, or the release before's
    /// `{prefix}r:{session key}`.
    fn cell(&self, cell: &Cell) -> String {
        let kind = if cell.legacy { "r" } else { "s" };
        format!("{}{kind}:{}", self.prefix, cell.name)
    }

    /// The Redis key of a subject set: `{prefix}t:{subject digest}`, or the release before's
    /// `{prefix}u:{subject}`.
    fn subject_set(&self, legacy: bool, index: Option<&Indexed>) -> String {
        let kind = if legacy { "u" } else { "t" };
        index
            .and_then(|i| i.tag.as_deref())
            .map(|t| format!("{}{kind}:{t}", self.prefix))
            .unwrap_or_default()
    }
}

/// Whether replacing `old` with `new` may end a session a request in flight has loaded: it is
/// removed, cycled (moved), or its expiry brought forward.
fn ends(old: Option<&Indexed>, new: Option<&Indexed>) -> bool {
    match (old, new) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(_), Some(new)) if !new.session => true,
        (Some(old), Some(new)) => new.deadline < old.deadline,
    }
}

#[async_trait]
impl Cells for RedisCells {
    fn codec(&self) -> &ArcSwap<Codec> {
        &self.codec
    }

    fn mark(&self) -> Option<Mark> {
        self.link.notices.mark()
    }

    fn unchanged_since(&self, handle: &str, mark: Mark) -> bool {
        self.link.notices.unchanged_since(handle, mark)
    }

    async fn get(&self, cell: &Cell) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.link.get();
        self.link.run(conn.get(self.cell(cell))).await
    }

    async fn swap(
        &self,
        cell: &Cell,
        expected: Option<&[u8]>,
        old: Option<&Indexed>,
        new: Option<(&[u8], &Indexed)>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.link.get();
        let new_index = new.map(|(_, i)| i);
        let (old_set, new_set) = (
            self.subject_set(cell.legacy, old),
            self.subject_set(cell.legacy, new_index),
        );
        let key = cell.name.as_str();
        // On a cluster a script may touch only the keys it is given, all in one slot, and a
        // subject's set is in another slot than the cell: the set changes go around the script
        // instead, added before the swap and removed after it (a crash leaves an extra member,
        // which a read of the set drops, never a missing one).
        let cluster = matches!(self.link.source, Source::Cluster(..));
        let around = cluster && old_set != new_set;
        if around && !new_set.is_empty() {
            if self.replicas.wanted == 0 {
                let _: i64 = self.link.run(conn.sadd(&new_set, key)).await?;
            } else {
                // The set is on another master than the cell: its replicas confirm it (a lost
                // member would let "log out everywhere" miss this session after a failover).
                let mut pipe = redis::pipe();
                pipe.sadd(&new_set, key);
                self.replicas.wait(&mut pipe);
                let (_, acked): (i64, u32) = self.link.run(pipe.query_async(&mut conn)).await?;
                self.replicas.confirmed(acked)?;
            }
        }
        let mut invocation = self.swap.key(self.cell(cell));
        invocation
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or_default())
            .arg(new.map(|(bytes, _)| bytes).unwrap_or_default())
            .arg(new_index.map_or(0, |i| i.deadline).max(0) + EXPIRY_GRACE_MS)
            .arg(key);
        if cluster {
            invocation.arg("").arg("");
        } else {
            invocation.arg(&old_set).arg(&new_set);
        }
        if ends(old, new_index) {
            invocation
                .arg(self.link.notices.channel.as_str())
                .arg(cell.handle());
        } else {
            invocation.arg("").arg("");
        }
        if self.replicas.wanted == 0 {
            let swapped: i64 = self.link.run(invocation.invoke_async(&mut conn)).await?;
            if around && swapped == 1 && !old_set.is_empty() {
                let _: i64 = self.link.run(conn.srem(&old_set, key)).await?;
            }
            return Ok(swapped == 1);
        }
        // The swap and its `WAIT` go out together on one connection, so the `WAIT` is for
        // exactly this change: a reconnect or a failover between them fails both (503). On a
        // cluster the pipeline goes whole to the master of the cell's slot, whose replicas
        // the `WAIT` counts.
        for first in [true, false] {
            let mut pipe = redis::pipe();
            pipe.invoke_script(&invocation);
            self.replicas.wait(&mut pipe);
            match self
                .link
                .run(pipe.query_async::<(i64, u32)>(&mut conn))
                .await
            {
                Ok((swapped, acked)) => {
                    self.replicas.confirmed(acked)?;
                    if around && swapped == 1 && !old_set.is_empty() {
                        let _: i64 = self.link.run(conn.srem(&old_set, key)).await?;
                    }
                    return Ok(swapped == 1);
                }
                Err(e) if first && super::chain(&e).contains("NoScript") => {
                    // A server that has not seen the script yet (a fresh master after a
                    // failover): load it, then try once more.
                    let mut load = redis::cmd("SCRIPT");
                    load.arg("LOAD").arg(SWAP);
                    self.link.run(load.query_async::<String>(&mut conn)).await?;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the second attempt returns")
    }

    async fn subject_members(&self, tag: &str, legacy: bool) -> Result<Vec<Cell>, StoreError> {
        let mut conn = self.link.get();
        let kind = if legacy { "u" } else { "t" };
        let names: Vec<String> = self
            .link
            .run(conn.smembers(format!("{}{kind}:{tag}", self.prefix)))
            .await?;
        Ok(names
            .into_iter()
            .map(|name| Cell { name, legacy })
            .collect())
    }

    /// A SCAN for the cells whose digest starts with the handle (Redis has no ordered seek),
    /// then, while any are left, for the release before's cells.
    async fn find_handle(&self, handle: &str) -> Result<Option<Cell>, StoreError> {
        let current = format!("{}s:", self.prefix);
        let found = self.scan_all(&format!("{current}{handle}*")).await?;
        if let Some(name) = found.iter().find_map(|k| k.strip_prefix(&current)) {
            return Ok(Some(Cell {
                name: name.to_string(),
                legacy: false,
            }));
        }
        let (legacy, _) = self.legacy_page(None).await?;
        Ok(legacy.into_iter().find(|c| c.handle() == handle))
    }

    /// One page: the release before's cells are few and gone after one sweep of a new release.
    async fn legacy_page(
        &self,
        _cursor: Option<String>,
    ) -> Result<(Vec<Cell>, Option<String>), StoreError> {
        if self.legacy_gone.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok((Vec::new(), None));
        }
        let prefix = format!("{}r:", self.prefix);
        let names = self.scan_all(&format!("{prefix}*")).await?;
        Ok((
            names
                .iter()
                .filter_map(|k| k.strip_prefix(&prefix))
                .map(Cell::legacy)
                .collect(),
            None,
        ))
    }

    async fn forget_member(&self, tag: &str, cell: &Cell) -> Result<(), StoreError> {
        let mut conn = self.link.get();
        let kind = if cell.legacy { "u" } else { "t" };
        let _: i64 = self
            .link
            .run(conn.srem(format!("{}{kind}:{tag}", self.prefix), &cell.name))
            .await?;
        Ok(())
    }

    /// Redis expires every cell at its deadline by itself. What is left to do is the release
    /// before's subject sets (subjects in clear): once none of its cells is left, they go.
    async fn sweep(&self, _now: Millis) -> Result<Swept, StoreError> {
        use std::sync::atomic::Ordering;
        if self.legacy_gone.load(Ordering::Relaxed) || self.codec.load().writes_legacy() {
            return Ok(Swept::default());
        }
        if self
            .scan_all(&format!("{}r:*", self.prefix))
            .await?
            .is_empty()
        {
            let mut conn = self.link.get();
            for set in self.scan_all(&format!("{}u:*", self.prefix)).await? {
                let _: i64 = self.link.run(conn.del(&set)).await?;
            }
            self.legacy_gone.store(true, Ordering::Relaxed);
        }
        Ok(Swept::default())
    }

    async fn sync(&self) -> Result<(), StoreError> {
        // Each swap waited for its replicas itself (`wait_replicas`), or durability is the
        // Redis server's.
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.link.get();
        let ping = redis::cmd("PING");
        self.link
            .run(ping.query_async::<String>(&mut conn))
            .await
            .map(|_| ())
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
            path: match &cfg.master_name {
                None if !cfg.cluster_nodes.is_empty() => {
                    format!("the cluster of {}", redact_all(&cfg.cluster_nodes))
                }
                Some(name) => format!(
                    "master {name:?} of the sentinels {}",
                    redact_all(&cfg.sentinels)
                ),
                None => redact(&cfg.url),
            },
            reason,
        };
        if cfg.url.starts_with("rediss://") {
            // rustls needs one crypto provider for the process; ring is the one built in.
            // Installing twice (a second store, tests) is harmless.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(cfg.command_timeout))
            .set_number_of_retries(2);
        let source = match &cfg.master_name {
            Some(name) => Source::Sentinel(tokio::sync::Mutex::new(
                sentinel_client(cfg, name).map_err(open)?,
            )),
            None if !cfg.cluster_nodes.is_empty() => Source::Cluster(
                ClusterClient::builder(cfg.cluster_nodes.clone())
                    .connection_timeout(cfg.connect_timeout)
                    .response_timeout(cfg.command_timeout)
                    .use_protocol(ProtocolVersion::RESP3)
                    .build()
                    .map_err(|e| open(format!("store.cluster_nodes: {e}")))?,
                ClusterConfig::new()
                    .set_connection_timeout(cfg.connect_timeout)
                    .set_response_timeout(cfg.command_timeout),
            ),
            None => Source::Fixed(fixed_client(cfg).map_err(open)?),
        };
        let notices = Arc::new(Notices::new(format!("{}ended", cfg.key_prefix)));
        let (id, push) = notices.sender();
        let conn = source
            .connect(&config, cfg.connect_timeout, push)
            .await
            .map_err(open)?;
        // Fail at start, not on the first visitor, when the store does not answer.
        let mut probe = conn.clone();
        tokio::time::timeout(
            cfg.connect_timeout + cfg.command_timeout,
            redis::cmd("PING").query_async::<String>(&mut probe),
        )
        .await
        .map_err(|_| open("no answer to PING".into()))?
        .map_err(|e| open(format!("{e} (the store needs Redis 6 or newer: RESP3)")))?;
        // Every sidecar relies on the others' end notices: one whose user may not publish them
        // (a Redis 7 ACL user starts without channels) must not serve.
        let channel = notices.channel.clone();
        let publish = redis::cmd("PUBLISH").arg(&channel).arg("").clone();
        tokio::time::timeout(cfg.command_timeout, publish.query_async::<i64>(&mut probe))
            .await
            .map_err(|_| open("no answer to PUBLISH".into()))?
            .map_err(|e| {
                open(format!(
                    "cannot publish end notices on {channel:?} ({e}); grant the user the channel, \
                 e.g. ACL SETUSER <user> &{channel}"
                ))
            })?;
        let link = Arc::new(Link {
            source,
            config,
            current: std::sync::RwLock::new(conn),
            replaced: std::sync::Mutex::new(std::time::Instant::now()),
            pause: cfg.command_timeout,
            connect_timeout: cfg.connect_timeout,
            notices: notices.clone(),
        });
        notices.adopt(id);
        tokio::spawn(listen(
            Arc::downgrade(&link),
            notices,
            cfg.connect_timeout + cfg.command_timeout,
        ));
        Ok(Engine::new(
            RedisCells {
                link,
                prefix: cfg.key_prefix.clone(),
                swap: Script::new(SWAP),
                codec: ArcSwap::from_pointee(Codec::plain()),
                replicas: Replicas {
                    wanted: cfg.wait_replicas,
                    timeout: cfg.wait_timeout,
                },
                legacy_gone: std::sync::atomic::AtomicBool::new(false),
            },
            policy,
            max_bytes,
        ))
    }
}

impl RedisStore {
    /// Records written from now on are sealed with `codec` (unsealed ones still read): whoever
    /// reads the Redis keys sees no session data.
    pub fn sealed(mut self, codec: Codec) -> RedisStore {
        self.cells.codec = ArcSwap::from_pointee(codec);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ends_cycles_and_shortened_expiries_are_announced() {
        let record = |deadline| Indexed {
            deadline,
            tag: None,
            session: true,
        };
        let (long, short) = (record(10_000), record(5_000));
        let moved = Indexed {
            deadline: 20_000,
            tag: None,
            session: false,
        };
        assert!(!ends(None, Some(&long)), "a new session");
        assert!(!ends(Some(&short), Some(&long)), "extended");
        assert!(!ends(Some(&long), Some(&long)), "same deadline");
        assert!(ends(Some(&long), Some(&short)), "brought forward");
        assert!(ends(Some(&long), None), "flushed");
        assert!(ends(Some(&long), Some(&moved)), "cycled");
    }
}
