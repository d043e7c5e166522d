//! Group commit: one flush for every caller queued since the last one began.
//!
//! sled's own flush makes its log "durable" with `sync_file_range` on Linux, which flushes
//! neither the drive's write cache nor the file's metadata (sled issues 1452 and 1351): it
//! survives a process kill, not a power cut. So after sled's flush the committer `fdatasync`s
//! the log file itself, and `fsync`s blob files sled wrote since (sled writes those without
//! any sync) and the directories that gained entries. A reply goes out only after all of that.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot};

pub(super) type Reply = oneshot::Sender<Result<(), String>>;

/// The group-commit thread and the way to reach it; dropping the sender ends the thread.
pub(super) struct Committer {
    pub(super) sender: mpsc::UnboundedSender<Reply>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

/// What it takes to make sled's files durable beyond its own flush.
struct Disk {
    dir: PathBuf,
    /// sled's log (and snapshot-holding) file, `<dir>/db`.
    log: File,
    /// Blob files already synced.
    blobs: HashSet<OsString>,
}

impl Disk {
    fn open(dir: &Path) -> std::io::Result<Disk> {
        let disk = Disk {
            dir: dir.to_path_buf(),
            log: File::open(dir.join("db"))?,
            blobs: HashSet::new(),
        };
        // The files sled created at open must be reachable after a crash too.
        File::open(dir)?.sync_all()?;
        Ok(disk)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.log.sync_data()?;
        let blobs = self.dir.join("blobs");
        let mut new = false;
        if let Ok(entries) = std::fs::read_dir(&blobs) {
            let mut present = HashSet::new();
            for entry in entries.flatten() {
                let name = entry.file_name();
                if !self.blobs.contains(&name) {
                    File::open(entry.path())?.sync_all()?;
                    new = true;
                }
                present.insert(name);
            }
            self.blobs = present;
        }
        if new {
            File::open(&blobs)?.sync_all()?;
        }
        Ok(())
    }
}

/// The group-commit thread: one flush for everyone who asked since the last one began.
pub(super) fn spawn_committer(db: sled::Db, dir: &Path) -> std::io::Result<Committer> {
    let mut disk = Disk::open(dir)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let thread = std::thread::Builder::new()
        .name("sled-commit".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let result = db
                    .flush()
                    .map(|_| ())
                    .map_err(|e| e.to_string())
                    .and_then(|()| disk.sync().map_err(|e| format!("fdatasync: {e}")));
                for reply in batch {
                    let _ = reply.send(result.clone());
                }
            }
        })?;
    Ok(Committer {
        sender: tx,
        thread: Some(thread),
    })
}
