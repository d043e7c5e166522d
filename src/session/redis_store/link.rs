//! The connection to Redis: one server, the master behind Sentinel, or a cluster's nodes, and
//! starting over when a command times out or the master moves.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{IntoConnectionInfo, ProtocolVersion};

use crate::session::store::StoreError;

use super::notices::Notices;
use super::{RedisSettings, backend};

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
pub(super) struct Link {
    pub(super) source: Source,
    pub(super) config: ConnectionManagerConfig,
    pub(super) current: std::sync::RwLock<Conn>,
    /// When the link last started over, and the shortest time between two starts.
    pub(super) replaced: std::sync::Mutex<std::time::Instant>,
    pub(super) pause: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) notices: Arc<Notices>,
}

/// Where the link's connections go.
pub(super) enum Source {
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
pub(super) enum Conn {
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
    pub(super) async fn connect(
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
pub(super) fn lost_master(e: &redis::RedisError) -> bool {
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
    pub(super) fn get(&self) -> Conn {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs one command (or script) within the command timeout: redis' own response timeout
    /// does not cover connecting, which a fresh connection may be doing. A timeout, either
    /// one, makes the link start over; behind Sentinel, so does any sign that the master moved.
    pub(super) async fn run<T>(
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
                Err(backend(format!("no answer within {:?}", self.pause)))
            }
        }
    }

    /// Replaces the connection in the background: the request that found it broken gets its
    /// 503 within the command timeout, not after a connection attempt (a cluster connects to
    /// its nodes first, Sentinel asks the sentinels, each up to `connect_timeout`).
    pub(super) fn start_over(self: &Arc<Self>) {
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

    pub(super) async fn reconnect(self: Arc<Self>) {
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
pub(super) const RESTART_PAUSE: Duration = Duration::from_millis(500);

/// The client of a single server named by `url`.
pub(super) fn fixed_client(cfg: &RedisSettings) -> Result<redis::Client, String> {
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
pub(super) fn resp3(url: &str) -> Result<redis::ConnectionInfo, String> {
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
pub(super) fn sentinel_client(cfg: &RedisSettings, name: &str) -> Result<SentinelClient, String> {
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

/// Several URLs, each without its user and password, for messages.
pub(super) fn redact_all(urls: &[String]) -> String {
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
    #[test]
    fn redact_hides_a_password_holding_at_signs() {
        let r = super::redact("redis://user:p@ss@w0rd@redis.internal:6379/0");
        assert_eq!(r, "redis://********@redis.internal:6379/0");
        assert_eq!(super::redact("redis://h:1/0?x=a@b"), "redis://h:1/0?x=a@b");
        assert_eq!(super::redact("not a url"), "not a url");
    }
}
