//! End notices: what this sidecar heard of sessions other sidecars ended, so that a read-only
//! request's liveness check needs no read of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::{PushInfo, PushKind, Value};

use crate::session::store::Mark;

use super::link::{Conn, Link, RESTART_PAUSE};

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
pub(super) struct Notices {
    pub(super) channel: String,
    pub(super) heard: std::sync::Mutex<Heard>,
    /// Wakes the task that subscribes (again).
    pub(super) wake: tokio::sync::Notify,
}

#[derive(Default)]
pub(super) struct Heard {
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
pub(super) const NOTICES_KEPT: usize = 16_384;

impl Notices {
    pub(super) fn new(channel: String) -> Notices {
        Notices {
            channel,
            heard: std::sync::Mutex::new(Heard::default()),
            wake: tokio::sync::Notify::new(),
        }
    }

    pub(super) fn heard(&self) -> std::sync::MutexGuard<'_, Heard> {
        self.heard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn mark(&self) -> Option<Mark> {
        let h = self.heard();
        h.listening.then_some(Mark {
            epoch: h.epoch,
            seq: h.seq,
        })
    }

    /// Notices name sessions by their handle (one-way).
    pub(super) fn unchanged_since(&self, handle: &str, mark: Mark) -> bool {
        let h = self.heard();
        h.listening
            && h.epoch == mark.epoch
            && mark.seq >= h.floor
            && h.last.get(handle).is_none_or(|&seq| seq <= mark.seq)
    }

    /// A push sender for a new connection; its pushes count once [`Notices::adopt`] makes it
    /// the current one.
    pub(super) fn sender(self: &Arc<Self>) -> (u64, impl redis::aio::AsyncPushSender + Clone) {
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
    pub(super) fn adopt(&self, id: u64) {
        {
            let mut h = self.heard();
            h.conn = id;
            h.epoch += 1;
            h.listening = false;
        }
        self.wake.notify_one();
    }

    pub(super) fn push(&self, id: u64, push: PushInfo) {
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

    pub(super) fn listening(&self) -> bool {
        self.heard().listening
    }
}

/// Keeps the link's current connection subscribed to the notice channel: at start, after a
/// disconnection and after the link starts over. Ends when the store is dropped.
pub(super) async fn listen(link: Weak<Link>, notices: Arc<Notices>, within: Duration) {
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
}
