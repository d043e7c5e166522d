//! The write-ahead log of the durable store: one device flush per group commit.
//!
//! sled makes its own log durable with `sync_file_range`, which flushes neither the drive's cache
//! nor the file's metadata (see `commit`): on its own it survives a process kill, not a power
//! cut, and a commit that waited for sled's flush and then an `fdatasync` of sled's files paid
//! for two trips to the device. Instead, every change made to sled's trees is also appended, as
//! it lands, to an in-memory list of operations ([`Log`]); a group commit writes that list to a
//! log file of the sidecar's own and `fdatasync`s it — one flush — before any of the group is
//! acknowledged. sled's files are made durable only at checkpoints (sled's flush, then the
//! `fdatasync` of its files), after which the log they cover is no longer needed.
//!
//! **Order.** Operations are post-images: insert this key with this value, remove this key, clear
//! this tree. Each is appended *before* sled applies it, under the key's lock stripe
//! (`SledCells::stripe`), so the log holds one key's operations in the order sled applied them,
//! and whoever sees an operation's effect (and acts on it: drops an index entry of a session it
//! found ended) logs after it. Replaying the log over sled's files gives every key the last
//! operation logged for it: every acknowledged change.
//!
//! sled's files may hold more than the log: sled writes its own buffers out whenever it likes,
//! so a change that was applied (and logged only in memory) before a crash may be in sled's
//! files while an earlier change of the same record is the last one in the log file. Replay
//! then puts that earlier record back — a change nobody was told was kept is undone — but the
//! later change's index updates (a subject's entry dropped at a re-tag) may stay. So a record's
//! insert carries what its indexes say of it (deadline, tag), and recovery writes those index
//! entries again for every record the replay leaves in place: an index entry may be extra (the
//! sweeper and the subject lookup drop those), never missing.
//!
//! **Files.** Two, `wal-a` and `wal-b`, used in turn. Each starts with a header: a magic number
//! and the generation it holds (0: nothing). Records follow: `generation (u64) | length (u32) |
//! CRC-32 (u32) of those and of the payload | payload`, the payload one group's operations. A
//! file is grown in zeroed 1 MiB steps ahead of the records, so an `fdatasync` after a record
//! usually has no metadata to write. Reading stops at the first record that is torn (too short,
//! wrong CRC) or from an earlier use of the file (another generation): a power cut in the
//! middle of a group loses that group, which nobody was told was kept.
//!
//! **Checkpoint** (every 16 MiB of log or 60 s, at a readiness probe, at shutdown): the next
//! records go to the other file under a new generation; then sled's flush and the `fdatasync`
//! of its files; then the older file's header is cleared. A crash before the clearing replays
//! both files, the older first, which is harmless: sled already holds the older file's changes.
//!
//! **Recovery** (at open, before anything reads the trees): the files' records are applied to
//! the trees in generation order, then a checkpoint; a store that never had a log (a release
//! before the log, or `durable = false`) has nothing to replay.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

/// The first eight bytes of a log file.
const MAGIC: &[u8; 8] = b"sswal\0\0\x01";
const HEADER: u64 = 16;
/// generation (8), length (4), CRC-32 (4).
const RECORD_HEAD: usize = 16;
/// A file grows by this much, zeroed, ahead of its records.
const GROW: u64 = 1 << 20;
/// A checkpoint once the current file holds this much.
pub(super) const CHECKPOINT_BYTES: u64 = 16 << 20;
/// A record longer than this is not one (a payload is one group's operations).
const MAX_RECORD: u32 = 1 << 30;

const FILES: [&str; 2] = ["wal-a", "wal-b"];

/// The trees an operation names, by a number that stays the same across releases.
pub(super) const TREES: [&str; 7] = [
    "__sled__default",
    "sessions",
    "deadlines",
    "tagged",
    "records",
    "expiry",
    "subjects",
];

const INSERT: u8 = 0;
const REMOVE: u8 = 1;
const CLEAR: u8 = 2;
/// A record's insert with what its indexes say of it (deadline, tag): recovery writes those
/// index entries again, whatever later, unlogged changes sled's files hold.
const INSERT_RECORD: u8 = 3;

/// The operations applied to sled since the last group commit took them.
#[derive(Default)]
pub(super) struct Log {
    pending: Mutex<Vec<u8>>,
}

impl Log {
    fn push(&self, tree: u8, kind: u8, key: &[u8], value: Option<&[u8]>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.extend_from_slice(&[tree, kind]);
        field(&mut p, key);
        if let Some(v) = value {
            field(&mut p, v);
        }
    }

    pub(super) fn insert(&self, tree: u8, key: &[u8], value: &[u8]) {
        self.push(tree, INSERT, key, Some(value));
    }

    pub(super) fn remove(&self, tree: u8, key: &[u8]) {
        self.push(tree, REMOVE, key, None);
    }

    pub(super) fn clear(&self, tree: u8) {
        self.push(tree, CLEAR, &[], None);
    }

    /// A record's insert, with its expiry deadline and its tag (the subject digest), if any.
    pub(super) fn insert_record(
        &self,
        tree: u8,
        key: &[u8],
        value: &[u8],
        deadline: i64,
        tag: Option<&str>,
    ) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.extend_from_slice(&[tree, INSERT_RECORD]);
        field(&mut p, key);
        field(&mut p, value);
        p.extend_from_slice(&deadline.to_le_bytes());
        match tag {
            Some(t) => {
                p.push(1);
                field(&mut p, t.as_bytes());
            }
            None => p.push(0),
        }
    }

    /// Bytes pending.
    pub(super) fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Everything pending, in the order it was pushed; the log is empty afterwards.
    pub(super) fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A length-prefixed field of an operation: its length (u32), then its bytes.
fn field(p: &mut Vec<u8>, bytes: &[u8]) {
    p.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    p.extend_from_slice(bytes);
}

/// One operation read back from a payload.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Op<'a> {
    Insert(u8, &'a [u8], &'a [u8]),
    /// tree, key, value, deadline, tag
    InsertRecord(u8, &'a [u8], &'a [u8], i64, Option<&'a str>),
    Remove(u8, &'a [u8]),
    Clear(u8),
}

/// The operations of one payload; `None` where it does not parse (it passed its CRC, so that
/// is a bug or a file of another program: recovery refuses it rather than guess).
pub(super) fn ops(mut payload: &[u8]) -> Option<Vec<Op<'_>>> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (p.get(..n)?, p.get(n..)?);
        *p = rest;
        Some(head)
    }
    fn len(p: &mut &[u8]) -> Option<usize> {
        Some(u32::from_le_bytes(take(p, 4)?.try_into().ok()?) as usize)
    }
    let mut out = Vec::new();
    while !payload.is_empty() {
        let head = take(&mut payload, 2)?;
        let (tree, kind) = (head[0], head[1]);
        if tree as usize >= TREES.len() {
            return None;
        }
        let n = len(&mut payload)?;
        let key = take(&mut payload, n)?;
        out.push(match kind {
            INSERT => {
                let n = len(&mut payload)?;
                Op::Insert(tree, key, take(&mut payload, n)?)
            }
            INSERT_RECORD => {
                let n = len(&mut payload)?;
                let value = take(&mut payload, n)?;
                let deadline = i64::from_le_bytes(take(&mut payload, 8)?.try_into().ok()?);
                let tag = match take(&mut payload, 1)?[0] {
                    0 => None,
                    1 => {
                        let n = len(&mut payload)?;
                        Some(std::str::from_utf8(take(&mut payload, n)?).ok()?)
                    }
                    _ => return None,
                };
                Op::InsertRecord(tree, key, value, deadline, tag)
            }
            REMOVE => Op::Remove(tree, key),
            CLEAR => Op::Clear(tree),
            _ => return None,
        });
    }
    Some(out)
}

fn crc(generation: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// One record as it goes to the file.
fn record(generation: u64, payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_HEAD + payload.len());
    r.extend_from_slice(&generation.to_le_bytes());
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    r.extend_from_slice(&crc(generation, payload).to_le_bytes());
    r.extend_from_slice(payload);
    r
}

/// The generation a file's header names (0: none, or not a log file).
fn generation_of(bytes: &[u8]) -> u64 {
    match bytes.get(..HEADER as usize) {
        Some(h) if &h[..8] == MAGIC => u64::from_le_bytes(h[8..16].try_into().unwrap()),
        _ => 0,
    }
}

/// The payloads of a file's whole records of its own generation, in order, up to the first
/// that is torn, damaged or left from an earlier generation.
pub(super) fn payloads(bytes: &[u8]) -> Vec<&[u8]> {
    let generation = generation_of(bytes);
    let mut out = Vec::new();
    if generation == 0 {
        return out;
    }
    let mut at = HEADER as usize;
    while let Some(head) = bytes.get(at..at + RECORD_HEAD) {
        let g = u64::from_le_bytes(head[..8].try_into().unwrap());
        let n = u32::from_le_bytes(head[8..12].try_into().unwrap());
        let sum = u32::from_le_bytes(head[12..16].try_into().unwrap());
        if g != generation || n > MAX_RECORD {
            break;
        }
        let Some(payload) = bytes.get(at + RECORD_HEAD..at + RECORD_HEAD + n as usize) else {
            break;
        };
        if crc(g, payload) != sum {
            break;
        }
        out.push(payload);
        at += RECORD_HEAD + n as usize;
    }
    out
}

/// The log files of a store directory, older generation first, with their contents.
pub(super) fn read_all(dir: &Path) -> io::Result<Vec<(u64, Vec<u8>)>> {
    let mut files = Vec::new();
    for name in FILES {
        match std::fs::read(dir.join(name)) {
            Ok(bytes) => {
                let g = generation_of(&bytes);
                if g > 0 {
                    files.push((g, bytes));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    files.sort_by_key(|(g, _)| *g);
    Ok(files)
}

/// Removes the log files (a store opened with `durable = false` after a durable run, once the
/// log is replayed and checkpointed).
pub(super) fn remove_files(dir: &Path) -> io::Result<()> {
    let mut removed = false;
    for name in FILES {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if removed {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The committer's end: the two files, which one records go to, and where.
pub(super) struct Writer {
    files: [File; 2],
    sizes: [u64; 2],
    current: usize,
    generation: u64,
    offset: u64,
    /// A group whose write failed: written again, first, with the next (a change may not be
    /// missing from the log while a later one is in it).
    carry: Vec<u8>,
}

impl Writer {
    /// Opens (creating them if needed) both files, after recovery: records go to the first
    /// under `after + 1`; the second is cleared.
    pub(super) fn open(dir: &Path, after: u64) -> io::Result<Writer> {
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(name))
        };
        let files = [open(FILES[0])?, open(FILES[1])?];
        let sizes = [files[0].metadata()?.len(), files[1].metadata()?.len()];
        let mut w = Writer {
            files,
            sizes,
            current: 1,
            generation: after,
            offset: 0,
            carry: Vec::new(),
        };
        w.switch()?;
        w.clear(1)?;
        File::open(dir)?.sync_all()?;
        Ok(w)
    }

    /// Bytes of records in the current file.
    pub(super) fn used(&self) -> u64 {
        self.offset - HEADER
    }

    /// Writes `payload` (and any group whose write failed before it) as one record and
    /// `fdatasync`s the file. Nothing to write: nothing done.
    pub(super) fn commit(&mut self, payload: Vec<u8>) -> io::Result<()> {
        let payload = if self.carry.is_empty() {
            payload
        } else {
            let mut all = std::mem::take(&mut self.carry);
            all.extend_from_slice(&payload);
            all
        };
        if payload.is_empty() {
            return Ok(());
        }
        let rec = record(self.generation, &payload);
        let written = self.write(&rec);
        if written.is_err() {
            self.carry = payload;
        }
        written
    }

    fn write(&mut self, rec: &[u8]) -> io::Result<()> {
        let end = self.offset + rec.len() as u64;
        self.grow(end)?;
        let file = &self.files[self.current];
        file.write_all_at(rec, self.offset)?;
        file.sync_data()?;
        self.offset = end;
        Ok(())
    }

    /// Zero-fills the current file up to past `end`, so that records land in allocated blocks.
    fn grow(&mut self, end: u64) -> io::Result<()> {
        self.fill(self.current, end.div_ceil(GROW) * GROW)
    }

    /// Zero-fills file `which` up to `target` bytes, if it is shorter.
    fn fill(&mut self, which: usize, target: u64) -> io::Result<()> {
        let size = &mut self.sizes[which];
        if target <= *size {
            return Ok(());
        }
        let zeros = vec![0u8; GROW as usize];
        let file = &self.files[which];
        while *size < target {
            let n = (target - *size).min(GROW);
            file.write_all_at(&zeros[..n as usize], *size)?;
            *size += n;
        }
        Ok(())
    }

    /// Records go to the other file from now on, under a new generation. Its header is written
    /// and synced before the first record goes there.
    pub(super) fn switch(&mut self) -> io::Result<()> {
        let next = 1 - self.current;
        let generation = self.generation + 1;
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&generation.to_le_bytes());
        self.fill(next, GROW)?;
        let file = &self.files[next];
        // The header and the first record slot: a record of the generation before that was
        // there must not read as the first record of this one (its generation differs, so it
        // would not, but a zeroed slot makes the end plain).
        let mut first = header.to_vec();
        first.extend_from_slice(&[0u8; RECORD_HEAD]);
        file.write_all_at(&first, 0)?;
        file.sync_data()?;
        self.current = next;
        self.generation = generation;
        self.offset = HEADER;
        Ok(())
    }

    /// Clears the header of the file not in use: its records are all in sled's durable files.
    pub(super) fn clear_other(&mut self) -> io::Result<()> {
        self.clear(1 - self.current)
    }

    fn clear(&mut self, which: usize) -> io::Result<()> {
        let file = &self.files[which];
        if self.sizes[which] >= HEADER {
            file.write_all_at(&[0u8; HEADER as usize], 0)?;
            file.sync_data()?;
        }
        Ok(())
    }

    /// The file records go to now.
    #[cfg(test)]
    fn current_file(&self) -> &'static str {
        FILES[self.current]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: u8) -> Vec<u8> {
        let log = Log::default();
        log.insert(1, &[n; 3], &[n; 40]);
        log.remove(2, &[n]);
        if n.is_multiple_of(3) {
            log.clear(6);
        }
        log.take()
    }

    #[test]
    fn operations_read_back_as_they_were_pushed() {
        let log = Log::default();
        log.insert(1, b"key", b"value");
        log.remove(3, b"tag/key");
        log.clear(5);
        log.insert(0, b"", b"");
        log.insert_record(1, b"cell", b"record", -7, Some("tag"));
        log.insert_record(4, b"old", b"", i64::MAX, None);
        let bytes = log.take();
        assert_eq!(
            ops(&bytes).unwrap(),
            vec![
                Op::Insert(1, b"key", b"value"),
                Op::Remove(3, b"tag/key"),
                Op::Clear(5),
                Op::Insert(0, b"", b""),
                Op::InsertRecord(1, b"cell", b"record", -7, Some("tag")),
                Op::InsertRecord(4, b"old", b"", i64::MAX, None),
            ]
        );
        assert!(log.take().is_empty());
        assert!(ops(&bytes[..bytes.len() - 1]).is_none());
        assert!(ops(&[9, 0, 0, 0, 0, 0]).is_none(), "an unknown tree");
    }

    /// A power cut in the middle of a group leaves a torn last record: whatever the cut left of
    /// it (every length, and bytes the drive never wrote read as old contents or zeros), the
    /// records before it read back whole and the torn one not at all.
    #[test]
    fn a_torn_last_record_is_dropped_and_every_record_before_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path(), 0).unwrap();
        let groups: Vec<Vec<u8>> = (1..=5).map(payload).collect();
        for g in &groups[..4] {
            w.commit(g.clone()).unwrap();
        }
        let whole = std::fs::read(dir.path().join(w.current_file())).unwrap();
        let before = HEADER as usize
            + groups[..4]
                .iter()
                .map(|g| RECORD_HEAD + g.len())
                .sum::<usize>();
        w.commit(groups[4].clone()).unwrap();
        let after = std::fs::read(dir.path().join(w.current_file())).unwrap();
        let last = &after[before..before + RECORD_HEAD + groups[4].len()];
        assert_eq!(payloads(&after).len(), 5);
        for cut in 0..last.len() {
            for filler in [0u8, 0xff] {
                let mut torn = whole.clone();
                torn[before..before + cut].copy_from_slice(&last[..cut]);
                for b in &mut torn[before + cut..before + last.len()] {
                    *b = filler;
                }
                let read = payloads(&torn);
                assert_eq!(
                    read,
                    groups[..4].iter().map(Vec::as_slice).collect::<Vec<_>>(),
                    "cut at {cut}"
                );
            }
        }
        // One flipped bit anywhere in a record ends the log there.
        for bit in [0, 9 * 8 + 3, 13 * 8, (RECORD_HEAD + 5) * 8 + 1] {
            let mut bad = after.clone();
            let second = HEADER as usize + RECORD_HEAD + groups[0].len();
            bad[second + bit / 8] ^= 1 << (bit % 8);
            assert_eq!(payloads(&bad).len(), 1, "bit {bit}");
        }
    }

    #[test]
    fn a_reused_file_does_not_replay_the_records_of_its_earlier_use() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path(), 0).unwrap();
        for n in 1..=3 {
            w.commit(payload(n)).unwrap();
        }
        w.switch().unwrap();
        w.commit(payload(7)).unwrap();
        w.clear_other().unwrap();
        // The first file again, under a newer generation, over its old records.
        w.switch().unwrap();
        w.commit(payload(9)).unwrap();
        let files = read_all(dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        let read: Vec<Vec<Vec<u8>>> = files
            .iter()
            .map(|(_, b)| payloads(b).into_iter().map(<[u8]>::to_vec).collect())
            .collect();
        assert_eq!(read, vec![vec![payload(7)], vec![payload(9)]]);
        assert!(files[0].0 < files[1].0);
    }

    #[test]
    fn a_group_whose_write_failed_goes_first_into_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path(), 0).unwrap();
        w.commit(payload(1)).unwrap();
        w.carry = payload(2);
        w.commit(payload(3)).unwrap();
        let bytes = std::fs::read(dir.path().join(w.current_file())).unwrap();
        let mut joined = payload(2);
        joined.extend(payload(3));
        assert_eq!(
            payloads(&bytes),
            vec![payload(1).as_slice(), joined.as_slice()]
        );
    }
}
