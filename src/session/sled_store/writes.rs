//! The sled store's end notices: a count of its writes, and the last count each handle's
//! sessions were written at.
//!
//! A read-only request checks, once the app has answered, that its session has not ended
//! meanwhile (`Store::liveness`). Only this process writes the store, so it knows every write
//! as it happens: when no write of the session's handle has been counted since the mark taken
//! before the load, the store holds what the load read and the check needs no read of its own.
//! Every successful swap counts, not only ends: a write that did not end the session sends
//! the check to the store, which answers it as before. Handles share slots, so a write of
//! another session can do the same, never the reverse.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use super::slot;
use crate::session::store::{Cell, Mark};

/// Slots the handles are spread over.
const SLOTS: usize = 4096;

pub(super) struct Writes {
    /// Writes counted so far.
    count: AtomicU64,
    /// By a hash of the handle: the count at its sessions' latest write.
    last: Box<[AtomicU64]>,
}

impl Default for Writes {
    fn default() -> Writes {
        Writes {
            count: AtomicU64::new(0),
            last: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Writes {
    fn slot(&self, handle: &str) -> &AtomicU64 {
        &self.last[slot(handle, SLOTS)]
    }

    /// Taken before a load.
    pub(super) fn mark(&self) -> Mark {
        Mark {
            epoch: 0,
            seq: self.count.load(SeqCst),
        }
    }

    /// Counts a write of `cell`, once the store holds it.
    pub(super) fn wrote(&self, cell: &Cell) {
        let at = self.count.fetch_add(1, SeqCst) + 1;
        self.slot(&cell.handle()).fetch_max(at, SeqCst);
    }

    /// Whether no write of `handle`'s sessions was counted after `mark` was taken. A write
    /// counted before it was in the store before the load read it.
    pub(super) fn unchanged_since(&self, handle: &str, mark: Mark) -> bool {
        self.slot(handle).load(SeqCst) <= mark.seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_after_the_mark_is_seen_and_one_before_it_is_not() {
        let writes = Writes::default();
        let key = "some-session-key";
        let (current, legacy) = (Cell::of(key), Cell::legacy(key));
        assert_eq!(current.handle(), legacy.handle());
        let handle = current.handle();
        writes.wrote(&current);
        let mark = writes.mark();
        assert!(writes.unchanged_since(&handle, mark));
        // Either cell of the key: the cell of the release before is named by the key itself.
        writes.wrote(&legacy);
        assert!(!writes.unchanged_since(&handle, mark));
        let later = writes.mark();
        assert!(writes.unchanged_since(&handle, later));
        writes.wrote(&current);
        assert!(!writes.unchanged_since(&handle, later));
    }

    #[test]
    fn writes_of_other_sessions_leave_most_handles_unchanged() {
        let writes = Writes::default();
        let mark = writes.mark();
        for i in 0..100 {
            writes.wrote(&Cell::of(&format!("other-{i}")));
        }
        let untouched = (0..1000)
            .filter(|i| writes.unchanged_since(&Cell::of(&format!("mine-{i}")).handle(), mark))
            .count();
        // 100 writes fill at most 100 of 4096 slots.
        assert!(
            untouched > 900,
            "{untouched} of 1000 handles seen as unchanged"
        );
    }
}
