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
//!
//! End notices spare a read-only request its second round trip: every swap that ends a
//! session, cycles it or brings its expiry forward publishes the session's handle (a one-way
//! name, [`super::id::handle`]) on `{prefix}ended` from inside the script, and each sidecar listens on its own data connection
//! (RESP3 carries replies and pushes on one connection). The liveness check after a read-only
//! response then asks Redis only when a notice for its key arrived since the load, or when a
//! notice may have been missed (see [`Notices`]).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncCommands, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Script, Value,
};

use super::engine::{Cells, Engine, Indexed};
use super::entry::Codec;
use super::store::{Cell, Mark, StoreError, Swept};
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

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(format!("redis: {e}"))
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
        Err(StoreError::Backend(format!(
            "redis: {acked} of {} replica(s) confirmed the change within {:?}",
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

/// The connection to Redis, replaced after a command times out.
///
/// redis' manager reconnects when the connection drops, but a half-open TCP connection (the
/// network cut off and back, a peer gone without a reset, a container given a new address)
/// never drops: every command on it times out until the kernel gives up, minutes later. So a
/// timeout makes the link start over with a fresh manager (at most once per command timeout);
/// it connects on its next command.
///
/// Behind Sentinel the master can move: the old one gone (connections refused or dropped), cut
/// off (timeouts), or back as a replica (writes answer `READONLY`). Any of those makes the link
/// ask the sentinels for the master again before it starts over, so the requests after a
/// failover go to the promoted replica.
struct Link {
    source: Source,
    config: ConnectionManagerConfig,
    current: std::sync::RwLock<Conn>,
    /// When the link last started over, and the shortest time between two starts.
    replaced: std::sync::Mutex<std::time::Instant>,
    pause: Duration,
    connect_timeout: Duration,
    notices: Arc<Notices>,
}

/// What this sidecar heard on the end-notice channel: for each session handle, the sequence
/// number of the last notice about it.
///
/// A mark (epoch, sequence) is taken before a request's load; its liveness check needs no read
/// when the epoch is unchanged and no notice about its key came after the mark. Only pushes of
/// the current connection count. Whatever may lose a notice ends the epoch or stops the
/// listening until the subscription is confirmed again: the connection dropping (redis'
/// `Disconnection` push), the link starting over on a new connection, the subscription not
/// (yet) confirmed, or more notices than are kept since the mark. A notice arrives a moment
/// after its change; a session ended within that moment before a response goes out is found
/// ended by the next request instead, which then deletes the cookie.
pub struct Notices {
    channel: String,
    heard: std::sync::Mutex<Heard>,
    /// Wakes the task that subscribes (again).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Heard {
    /// The connection whose pushes count; a replaced one's late pushes are ignored.
    conn: u64,
    /// Connections handed out so far (the ids).
    made: u64,
    epoch: u64,
    listening: bool,
    seq: u64,
    last: HashMap<String, u64>,
    order: VecDeque<(u64, String)>,
    /// Notices up to this sequence number were forgotten.
    floor: u64,
}

/// How many notices are kept: more during one request's flight and its check reads instead.
const NOTICES_KEPT: usize = 16_384;

impl Notices {
    fn new(channel: String) -> Notices {
        Notices {
            channel,
            heard: std::sync::Mutex::new(Heard::default()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn heard(&self) -> std::sync::MutexGuard<'_, Heard> {
        self.heard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn mark(&self) -> Option<Mark> {
        let h = self.heard();
        h.listening.then_some(Mark {
            epoch: h.epoch,
            seq: h.seq,
        })
    }

    /// Notices name sessions by their handle (one-way).
    fn unchanged_since(&self, handle: &str, mark: Mark) -> bool {
        let h = self.heard();
        h.listening
            && h.epoch == mark.epoch
            && mark.seq >= h.floor
            && h.last.get(handle).is_none_or(|&seq| seq <= mark.seq)
    }

    /// A push sender for a new connection; its pushes count once [`Notices::adopt`] makes it
    /// the current one.
    fn sender(self: &Arc<Self>) -> (u64, impl redis::aio::AsyncPushSender + Clone) {
        let id = {
            let mut h = self.heard();
            h.made += 1;
            h.made
        };
        let notices = Arc::downgrade(self);
        let sender = move |push: PushInfo| -> Result<(), redis::aio::SendError> {
            if let Some(notices) = notices.upgrade() {
                notices.push(id, push);
            }
            Ok(())
        };
        (id, sender)
    }

    /// Connection `id` is now the link's: nothing is trusted until it has subscribed.
    fn adopt(&self, id: u64) {
        {
            let mut h = self.heard();
            h.conn = id;
            h.epoch += 1;
            h.listening = false;
        }
        self.wake.notify_one();
    }

    fn push(&self, id: u64, push: PushInfo) {
        let mut h = self.heard();
        if h.conn != id {
            return;
        }
        match push.kind {
            PushKind::Message => {
                // [channel, handle]
                let key = match push.data.get(1) {
                    Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => return,
                };
                h.seq += 1;
                let seq = h.seq;
                h.last.insert(key.clone(), seq);
                h.order.push_back((seq, key));
                if h.order.len() > NOTICES_KEPT
                    && let Some((old, key)) = h.order.pop_front()
                {
                    if h.last.get(&key) == Some(&old) {
                        h.last.remove(&key);
                    }
                    h.floor = old;
                }
            }
            PushKind::Subscribe => h.listening = true,
            PushKind::Disconnection => {
                h.epoch += 1;
                h.listening = false;
                drop(h);
                self.wake.notify_one();
            }
            _ => {}
        }
    }

    fn listening(&self) -> bool {
        self.heard().listening
    }
}

/// Keeps the link's current connection subscribed to the notice channel: at start, after a
/// disconnection and after the link starts over. Ends when the store is dropped.
async fn listen(link: Weak<Link>, notices: Arc<Notices>, within: Duration) {
    let mut failing = false;
    loop {
        let Some(strong) = link.upgrade() else {
            return;
        };
        if !notices.listening() {
            let mut conn = strong.get();
            let subscribed = match &mut conn {
                Conn::Single(c) => {
                    tokio::time::timeout(within, c.subscribe(&notices.channel)).await
                }
                Conn::Cluster(c) => {
                    tokio::time::timeout(within, c.subscribe(&notices.channel)).await
                }
            };
            match subscribed {
                Ok(Ok(())) => failing = false,
                Ok(Err(e)) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, channel = %notices.channel, "redis: cannot subscribe to the end notices; read-only requests check liveness with a read");
                }
                Err(_) if !failing => {
                    failing = true;
                    tracing::warn!(channel = %notices.channel, "redis: no answer to the end-notice subscription; read-only requests check liveness with a read");
                }
                _ => {}
            }
        }
        drop(strong);
        // Woken by a disconnection or a new connection; a second's nap otherwise, so a failed
        // subscription is tried again and a dropped store ends the task.
        let nap = if notices.listening() {
            Duration::from_secs(1)
        } else {
            RESTART_PAUSE
        };
        let _ = tokio::time::timeout(nap, notices.wake.notified()).await;
    }
}

/// Where the link's connections go.
enum Source {
    /// One server, by its URL.
    Fixed(redis::Client),
    /// Whichever server the sentinels name as the master now.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    /// The nodes of a Redis Cluster, each key on the node that serves its slot (the cluster
    /// connection follows `MOVED`/`ASK` and slot changes itself).
    Cluster(ClusterClient, ClusterConfig),
}

/// A connection of either kind, used through the same commands.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Source {
    /// A fresh connection: lazy for one server (it connects on its first command), connected
    /// for a cluster (whose client learns the slot map first).
    async fn connect(
        &self,
        config: &ConnectionManagerConfig,
        within: Duration,
        push: impl redis::aio::AsyncPushSender + Clone,
    ) -> Result<Conn, String> {
        let client = match self {
            Source::Fixed(client) => client.clone(),
            Source::Sentinel(sentinel) => {
                let mut sentinel = sentinel.lock().await;
                match tokio::time::timeout(within, sentinel.async_get_client()).await {
                    Ok(Ok(client)) => client,
                    Ok(Err(e)) => return Err(format!("no master from the sentinels: {e}")),
                    Err(_) => {
                        return Err(format!("no master from the sentinels within {within:?}"));
                    }
                }
            }
            Source::Cluster(cluster, config) => {
                let config = config.clone().set_push_sender(push);
                let connect = cluster.get_async_connection_with_config(config);
                return match tokio::time::timeout(within, connect).await {
                    Ok(Ok(conn)) => Ok(Conn::Cluster(conn)),
                    Ok(Err(e)) => Err(format!("cluster: {e}")),
                    Err(_) => Err(format!("cluster: no connection within {within:?}")),
                };
            }
        };
        ConnectionManager::new_lazy_with_config(client, config.clone().set_push_sender(push))
            .map(Conn::Single)
            .map_err(|e| e.to_string())
    }
}

/// Whether an error says the connection no longer reaches a usable master.
fn lost_master(e: &redis::RedisError) -> bool {
    e.is_timeout()
        || e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown
            )
        )
}

impl Link {
    fn get(&self) -> Conn {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs one command (or script) within the command timeout: redis' own response timeout
    /// does not cover connecting, which a fresh connection may be doing. A timeout, either
    /// one, makes the link start over; behind Sentinel, so does any sign that the master moved.
    async fn run<T>(
        self: &Arc<Self>,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.pause, command).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let sentinel = matches!(self.source, Source::Sentinel(_));
                if e.is_timeout() || (sentinel && lost_master(&e)) {
                    self.start_over();
                }
                Err(backend(e))
            }
            Err(_) => {
                self.start_over();
                Err(StoreError::Backend(format!(
                    "redis: no answer within {:?}",
                    self.pause
                )))
            }
        }
    }

    /// Replaces the connection in the background: the request that found it broken gets its
    /// 503 within the command timeout, not after a connection attempt (a cluster connects to
    /// its nodes first, Sentinel asks the sentinels, each up to `connect_timeout`).
    fn start_over(self: &Arc<Self>) {
        {
            let mut last = self
                .replaced
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.elapsed() < self.pause.min(RESTART_PAUSE) {
                return;
            }
            *last = std::time::Instant::now();
        }
        tokio::spawn(self.clone().reconnect());
    }

    async fn reconnect(self: Arc<Self>) {
        let (id, push) = self.notices.sender();
        match self
            .source
            .connect(&self.config, self.connect_timeout, push)
            .await
        {
            Ok(fresh) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
                self.notices.adopt(id);
                tracing::warn!("redis: the connection is lost; connecting afresh");
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis: the connection is lost; cannot connect afresh")
            }
        }
    }
}

/// The shortest time between two fresh starts of the link (shorter than the command timeout
/// when that is long: a failover should be followed within a second of its end).
const RESTART_PAUSE: Duration = Duration::from_millis(500);

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
                    redis::from_redis_value(value).map_err(|e| backend(e.into()))?
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
            .and_then(|v| redis::from_redis_value(v).map_err(|e| backend(e.into())))?;
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
                Err(e) if first && e.to_string().contains("NoScript") => {
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
        Ok(Engine {
            cells: RedisCells {
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
            policy: ArcSwap::new(policy),
            max_bytes,
        })
    }
}

/// The client of a single server named by `url`.
fn fixed_client(cfg: &RedisSettings) -> Result<redis::Client, String> {
    let info = resp3(&cfg.url)?;
    match &cfg.tls_ca_file {
        Some(ca) => {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("store.tls_ca_file {}: {e}", ca.display()))?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            redis::Client::build_with_tls(info, certs)
        }
        None => redis::Client::open(info),
    }
    .map_err(|e| e.to_string())
}

/// `url`'s connection settings, speaking RESP3 (replies and end notices on one connection).
fn resp3(url: &str) -> Result<redis::ConnectionInfo, String> {
    let info = url
        .into_connection_info()
        .map_err(|e| format!("store.url: {e}"))?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Ok(info.set_redis_settings(settings))
}

/// The client that asks the sentinels for the master named `name`; the data nodes are reached
/// with `url`'s user, password and database (and TLS when it is `rediss://`).
fn sentinel_client(cfg: &RedisSettings, name: &str) -> Result<SentinelClient, String> {
    let data = resp3(&cfg.url)?;
    let mut nodes = SentinelNodeConnectionInfo::default()
        .set_redis_connection_info(data.redis_settings().clone());
    if cfg.url.starts_with("rediss://") {
        nodes = nodes.set_tls_mode(redis::TlsMode::Secure);
    }
    SentinelClient::build(
        cfg.sentinels.clone(),
        name,
        Some(nodes),
        SentinelServerType::Master,
    )
    .map_err(|e| format!("store.sentinels: {e}"))
}

impl RedisStore {
    /// Records written from now on are sealed with `codec` (unsealed ones still read): whoever
    /// reads the Redis keys sees no session data.
    pub fn sealed(mut self, codec: Codec) -> RedisStore {
        self.cells.codec = ArcSwap::from_pointee(codec);
        self
    }
}

/// Several URLs, each without its user and password, for messages.
fn redact_all(urls: &[String]) -> String {
    urls.iter()
        .map(|u| redact(u))
        .collect::<Vec<_>>()
        .join(", ")
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
    use super::*;

    /// A notice about the session under `key` (it carries the key's handle).
    fn handle(key: &str) -> String {
        crate::session::id::handle(key)
    }

    fn message(key: &str) -> PushInfo {
        PushInfo {
            kind: PushKind::Message,
            data: vec![
                Value::BulkString(b"p:ended".to_vec()),
                Value::BulkString(crate::session::id::handle(key).into_bytes()),
            ],
        }
    }

    fn kind(kind: PushKind) -> PushInfo {
        PushInfo { kind, data: vec![] }
    }

    #[test]
    fn a_notice_or_anything_that_may_have_lost_one_sends_the_check_to_redis() {
        let n = Arc::new(Notices::new("p:ended".into()));
        let (first, _) = n.sender();
        n.adopt(first);
        assert_eq!(n.mark(), None, "not subscribed yet: nothing to trust");
        n.push(first, kind(PushKind::Subscribe));
        let m1 = n.mark().expect("listening");
        assert!(n.unchanged_since(&handle("k"), m1) && n.unchanged_since(&handle("j"), m1));
        // A notice about `k`: only `k`'s check reads, and a mark taken after it trusts it again.
        n.push(first, message("k"));
        assert!(!n.unchanged_since(&handle("k"), m1));
        assert!(n.unchanged_since(&handle("j"), m1));
        let m2 = n.mark().unwrap();
        assert!(n.unchanged_since(&handle("k"), m2));
        // The connection dropped: every earlier mark is void, and nothing is trusted until the
        // subscription is confirmed again.
        n.push(first, kind(PushKind::Disconnection));
        assert!(!n.unchanged_since(&handle("j"), m2));
        assert_eq!(n.mark(), None);
        n.push(first, kind(PushKind::Subscribe));
        let m3 = n.mark().unwrap();
        assert!(n.unchanged_since(&handle("j"), m3) && !n.unchanged_since(&handle("j"), m2));
        // The link started over: the old connection's late pushes count for nothing.
        let (second, _) = n.sender();
        n.adopt(second);
        assert!(!n.unchanged_since(&handle("j"), m3));
        n.push(first, kind(PushKind::Subscribe));
        assert_eq!(n.mark(), None, "a replaced connection's confirmation");
        n.push(second, kind(PushKind::Subscribe));
        let m4 = n.mark().unwrap();
        n.push(first, message("j"));
        assert!(
            n.unchanged_since(&handle("j"), m4),
            "a replaced connection's notice is ignored"
        );
        // More notices since a mark than are kept: that mark can no longer be trusted.
        for i in 0..NOTICES_KEPT {
            n.push(second, message(&format!("other{i}")));
        }
        assert!(n.unchanged_since(&handle("j"), m4), "all kept");
        n.push(second, message("one-more"));
        assert!(!n.unchanged_since(&handle("j"), m4), "the oldest forgotten");
        assert!(n.unchanged_since(&handle("j"), n.mark().unwrap()));
        assert_eq!(n.heard().last.len(), NOTICES_KEPT);
    }

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
    #[test]
    fn redact_hides_a_password_holding_at_signs() {
        let r = super::redact("redis://user:p@ss@w0rd@redis.internal:6379/0");
        assert_eq!(r, "redis://********@redis.internal:6379/0");
        assert_eq!(super::redact("redis://h:1/0?x=a@b"), "redis://h:1/0?x=a@b");
        assert_eq!(super::redact("not a url"), "not a url");
    }
}
