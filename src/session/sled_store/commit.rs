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
use std::time::{Duration, SystemTime};

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
    /// The blob directory's modification time when it was last listed, and when that was.
    listed: Option<(SystemTime, SystemTime)>,
}

/// A directory's modification time has the kernel's coarse clock behind it (a few
/// milliseconds): an entry added in the same tick as the last listing leaves it unchanged. So a
/// listing made within this long of the modification it saw is not trusted to be the last.
const MTIME_SLACK: Duration = Duration::from_secs(1);

impl Disk {
    fn open(dir: &Path) -> std::io::Result<Disk> {
        let disk = Disk {
            dir: dir.to_path_buf(),
            log: File::open(dir.join("db"))?,
            blobs: HashSet::new(),
            listed: None,
        };
        // The files sled created at open must be reachable after a crash too.
        File::open(dir)?.sync_all()?;
        Ok(disk)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.log.sync_data()?;
        let blobs = self.dir.join("blobs");
        // sled writes a blob only for a value far larger than a session record usually is: one
        // `stat` per commit tells whether the directory must be listed (it used to be listed on
        // every commit, a few percent of a durable write's CPU).
        let modified = std::fs::metadata(&blobs).and_then(|m| m.modified()).ok();
        if let (Some(modified), Some((seen, at))) = (modified, self.listed)
            && modified == seen
            && at > seen + MTIME_SLACK
        {
            return Ok(());
        }
        let listed_at = SystemTime::now();
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
        self.listed = modified.map(|m| (m, listed_at));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn store_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        dir
    }

    #[test]
    fn a_blob_written_in_the_same_clock_tick_as_the_last_listing_is_still_synced() {
        let dir = store_dir();
        let mut disk = Disk::open(dir.path()).unwrap();
        disk.sync().unwrap();
        assert!(disk.blobs.is_empty());
        // Within the slack of the modification it saw, every commit lists again.
        std::fs::write(dir.path().join("blobs/7"), b"x").unwrap();
        disk.sync().unwrap();
        assert!(disk.blobs.contains(&OsString::from("7")));
        std::fs::write(dir.path().join("blobs/8"), b"x").unwrap();
        disk.sync().unwrap();
        assert!(disk.blobs.contains(&OsString::from("8")));
    }

    #[test]
    fn an_unchanged_blob_directory_is_not_listed_again_and_a_changed_one_is() {
        let dir = store_dir();
        let mut disk = Disk::open(dir.path()).unwrap();
        disk.sync().unwrap();
        let (seen, _) = disk.listed.expect("listed");
        // As if the last listing were long after the modification it saw.
        let long_after = seen + MTIME_SLACK * 2;
        disk.listed = Some((seen, long_after));
        disk.sync().unwrap();
        assert_eq!(disk.listed, Some((seen, long_after)), "listed again");
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.path().join("blobs/9"), b"x").unwrap();
        disk.sync().unwrap();
        assert!(disk.blobs.contains(&OsString::from("9")));
        assert_ne!(disk.listed, Some((seen, long_after)));
    }
}
