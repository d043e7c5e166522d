//! Group commit: one `flush` (write + fsync) for every caller queued since the last one began.

use tokio::sync::{mpsc, oneshot};

pub(super) type Reply = oneshot::Sender<Result<(), String>>;

/// The group-commit thread and the way to reach it; dropping the sender ends the thread.
pub(super) struct Committer {
    pub(super) sender: mpsc::UnboundedSender<Reply>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

/// The group-commit thread: one `flush` for everyone who asked since the last one began.
pub(super) fn spawn_committer(db: sled::Db) -> Committer {
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let thread = std::thread::Builder::new()
        .name("sled-commit".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                for reply in batch {
                    let _ = reply.send(result.clone());
                }
            }
        })
        .expect("spawning the commit thread");
    Committer {
        sender: tx,
        thread: Some(thread),
    }
}
