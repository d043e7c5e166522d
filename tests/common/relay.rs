//! A TCP relay on 127.0.0.1 that delays every chunk it passes on, in each direction: the latency
//! of a real network between a browser and the sidecar. On loopback an answer reaches the browser
//! within a fraction of a millisecond, and the races of a page whose requests overlap (a polling
//! request sent before the login's answer arrived, answered after it) hardly ever happen; with a
//! few milliseconds each way they happen on every login.
//!
//! The delay is latency, not a throughput limit: chunks are stamped when they are read and each
//! is written once its stamp plus the delay has passed, in the order they were read, so a chunk
//! never waits for the delay of the one before it. A half-close is passed on after the delay too.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A running relay; dropping it stops it and cuts the connections it carries.
pub struct Relay {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay on a free loopback port to `target`, adding `delay` each way to every chunk.
    pub async fn start(target: SocketAddr, delay: Duration) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Owned here: aborting the accept loop drops the set, which aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { return };
                        connections.spawn(carry(client, target, delay));
                    }
                    // Reap finished connections so the set does not grow.
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Relay { addr, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One client connection, relayed to a fresh connection to `target`.
async fn carry(client: TcpStream, target: SocketAddr, delay: Duration) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pipe(client_read, server_write, delay),
        pipe(server_read, client_write, delay)
    );
}

/// Copies `from` to `to`, each chunk `delay` after it was read; `None` is the end of the stream.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let read = async move {
        loop {
            let mut buf = vec![0u8; 16 * 1024];
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send((Instant::now() + delay, None));
                    return;
                }
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send((Instant::now() + delay, Some(buf))).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            match chunk {
                Some(bytes) => {
                    if to.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = to.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(read, write);
}
