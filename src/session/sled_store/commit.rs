//! Group commit: one log write and one `fdatasync` for every caller queued since the last one
//! began; checkpoints; recovery.
//!
//! sled's own flush makes its log "durable" with `sync_file_range` on Linux, which flushes
//! neither the drive's write cache nor the file's metadata (sled issues 1452 and 1351): it
//! survives a process kill, not a power cut. A change is acknowledged once the write-ahead log
//! (`wal`) holding it is `fdatasync`ed. At a checkpoint, sled's flush is followed by an
//! `fdatasync` of sled's log file, an `fsync` of blob files sled wrote since (sled writes those
//! without any sync) and of the directories that gained entries; only then is the log that
//! sled's files now hold given up.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};

use super::index::{index_key, subject_key};
use super::wal::{self, Log, Op, Writer};

pub(super) type Reply = oneshot::Sender<Result<(), String>>;

/// What a caller asks of the commit thread.
pub(super) enum Ask {
    /// Make what this caller changed durable (the log).
    Commit,
    /// That, and a checkpoint: sled's own files durable too (the readiness probe).
    Checkpoint,
}

/// The group-commit thread and the way to reach it; dropping the sender ends the thread.
pub(super) struct Committer {
    pub(super) sender: mpsc::UnboundedSender<(Ask, Reply)>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

/// A checkpoint at least this often while changes come.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

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

/// sled's files durable: its flush, then what that flush does not do.
fn make_durable(db: &sled::Db, disk: &mut Disk) -> Result<(), String> {
    db.flush().map_err(|e| e.to_string())?;
    disk.sync().map_err(|e| format!("fdatasync: {e}"))
}

/// The records trees and their two index trees, by their numbers in the log (`wal::TREES`):
/// the current ones, then the release before's.
const RECORD_TREES: [(u8, u8, u8); 2] = [(1, 2, 3), (4, 5, 6)];

/// What a record's index entries say of it: its deadline and its tag.
type Indexes = (i64, Option<String>);

/// Applies the write-ahead log a crash left to sled's trees, in order; writes again the index
/// entries of every record the log leaves in place (see `wal`: sled's files may hold a later,
/// unlogged change's index updates); makes the result durable. The newest generation found
/// (0: no log).
pub(super) fn recover(db: &sled::Db, dir: &Path) -> Result<u64, String> {
    let files = wal::read_all(dir).map_err(|e| e.to_string())?;
    let Some(&(last, _)) = files.last() else {
        return Ok(0);
    };
    let mut trees = Vec::new();
    for name in wal::TREES {
        trees.push(db.open_tree(name).map_err(|e| e.to_string())?);
    }
    // The last logged state of every record the log touches: (deadline, tag) while it is there.
    let mut records: HashMap<(u8, Vec<u8>), Option<Indexes>> = HashMap::new();
    let mut applied = 0usize;
    for (generation, bytes) in &files {
        for payload in wal::payloads(bytes) {
            let ops = wal::ops(payload)
                .ok_or_else(|| format!("a record of generation {generation} does not parse"))?;
            for op in ops {
                let done = match op {
                    Op::Insert(t, k, v) => trees[t as usize].insert(k, v).map(|_| ()),
                    Op::InsertRecord(t, k, v, deadline, tag) => {
                        records.insert((t, k.to_vec()), Some((deadline, tag.map(str::to_string))));
                        trees[t as usize].insert(k, v).map(|_| ())
                    }
                    Op::Remove(t, k) => {
                        records.insert((t, k.to_vec()), None);
                        trees[t as usize].remove(k).map(|_| ())
                    }
                    Op::Clear(t) => {
                        records.retain(|(tree, _), _| *tree != t);
                        trees[t as usize].clear()
                    }
                };
                done.map_err(|e| e.to_string())?;
                applied += 1;
            }
        }
    }
    let mut reindexed = 0usize;
    for ((tree, key), state) in &records {
        let (Some((deadline, tag)), Some(&(_, index, subjects))) =
            (state, RECORD_TREES.iter().find(|(r, _, _)| r == tree))
        else {
            continue;
        };
        let key = String::from_utf8_lossy(key);
        let insert = |t: u8, k: Vec<u8>| trees[t as usize].insert(k, &[]).map(|_| ());
        insert(index, index_key(*deadline, &key)).map_err(|e| e.to_string())?;
        if let Some(tag) = tag {
            insert(subjects, subject_key(tag, &key)).map_err(|e| e.to_string())?;
        }
        reindexed += 1;
    }
    let mut disk = Disk::open(dir).map_err(|e| e.to_string())?;
    make_durable(db, &mut disk)?;
    tracing::info!(
        operations = applied,
        records = reindexed,
        "replayed the write-ahead log"
    );
    Ok(last)
}

/// The commit thread's state: the log's writer, sled's files, and when the last checkpoint was.
struct Thread {
    db: sled::Db,
    disk: Disk,
    log: Arc<Log>,
    writer: Writer,
    checkpointed: Instant,
    /// A checkpoint switched files and has not yet finished: the next one must not switch
    /// again (the older file's records are not yet in sled's durable files).
    unfinished: bool,
}

impl Thread {
    /// One group: what the callers logged goes to the log, synced; a checkpoint when asked or
    /// due. The log's result answers `Commit`, the checkpoint's `Checkpoint`.
    fn group(&mut self, checkpoint_asked: bool) -> (Result<(), String>, Result<(), String>) {
        let committed = self
            .writer
            .commit(self.log.take())
            .map_err(|e| format!("writing the write-ahead log: {e}"));
        let due = self.writer.used() > wal::CHECKPOINT_BYTES
            || (self.writer.used() > 0 && self.checkpointed.elapsed() > CHECKPOINT_EVERY);
        let checkpoint = if checkpoint_asked || due || self.unfinished {
            committed.clone().and_then(|()| self.checkpoint())
        } else {
            Ok(())
        };
        (committed, checkpoint)
    }

    fn checkpoint(&mut self) -> Result<(), String> {
        if !self.unfinished {
            self.writer
                .switch()
                .map_err(|e| format!("starting a write-ahead log file: {e}"))?;
            self.unfinished = true;
        }
        make_durable(&self.db, &mut self.disk)?;
        self.writer
            .clear_other()
            .map_err(|e| format!("clearing a write-ahead log file: {e}"))?;
        self.unfinished = false;
        self.checkpointed = Instant::now();
        Ok(())
    }
}

/// The group-commit thread: one log write and sync for everyone who asked since the last one
/// began; records go to a log whose generations follow `last` (what recovery found).
pub(super) fn spawn_committer(
    db: sled::Db,
    dir: &Path,
    log: Arc<Log>,
    last: u64,
) -> std::io::Result<Committer> {
    let mut state = Thread {
        db,
        disk: Disk::open(dir)?,
        log,
        writer: Writer::open(dir, last)?,
        checkpointed: Instant::now(),
        unfinished: false,
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<(Ask, Reply)>();
    let thread = std::thread::Builder::new()
        .name("sled-commit".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let asked = batch.iter().any(|(a, _)| matches!(a, Ask::Checkpoint));
                let (committed, checkpointed) = state.group(asked);
                for (ask, reply) in batch {
                    let _ = reply.send(match ask {
                        Ask::Commit => committed.clone(),
                        Ask::Checkpoint => checkpointed.clone(),
                    });
                }
            }
            // The store is closing: what is logged, then a checkpoint, so that the next start
            // has nothing to replay.
            if let (Err(e), _) | (_, Err(e)) = state.group(true) {
                tracing::error!(error = %e, "the last checkpoint failed: the next start replays the write-ahead log");
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
