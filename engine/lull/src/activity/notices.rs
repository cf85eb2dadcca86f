//! [`Notices`]: close notices the kernel posts for the rows of the activity table.
//!
//! A connection's close (the peer's FIN or RST, ours, a kernel timeout) changes its row's
//! flags, which the engine would only see at the connection's next timer. To see it at once
//! without a system call and without scanning rows, the programs also set the row's bit in a
//! leaf word, and the leaf word's bit in its extent's summary word (layout in
//! [`lull_common::notice_words`]). An engine then reads one summary word per extent it leased,
//! and only the leaf words it points to.

use std::{
    os::fd::BorrowedFd,
    sync::atomic::{AtomicU64, Ordering},
};

use lull_common::{EXTENT_ROWS, NOTICE_WORDS_PER_EXTENT};

use super::mapping::SharedMapping;

/// The notice words of every extent of the host's table, mapped into this process.
pub(crate) struct Notices {
    mapping: SharedMapping,
    words: usize,
}

impl Notices {
    /// How many words the notices of a table of `rows` rows take.
    pub(crate) fn words_for(rows: u32) -> u32 {
        rows.div_ceil(EXTENT_ROWS) * NOTICE_WORDS_PER_EXTENT
    }

    /// Maps the notices map of a table of `rows` rows.
    pub(crate) fn map(map_fd: BorrowedFd<'_>, rows: u32) -> std::io::Result<Self> {
        let words = Self::words_for(rows) as usize;
        Ok(Self {
            mapping: SharedMapping::map(map_fd, words * size_of::<u64>())?,
            words,
        })
    }

    fn word(&self, index: u32) -> Option<&AtomicU64> {
        let index = index as usize;
        // SAFETY: in bounds of the mapping, which holds `words` u64s for as long as `self`
        // lives and is only ever accessed atomically (here and by the kernel).
        (index < self.words).then(|| unsafe {
            &*self
                .mapping
                .as_ptr()
                .cast::<AtomicU64>()
                .as_ptr()
                .add(index)
        })
    }

    /// Takes the notices of `extent`, calling `closed` with each row's offset in the extent.
    /// A notice is taken once: the words are cleared as they are read.
    #[inline]
    pub(crate) fn take(&self, extent: u32, mut closed: impl FnMut(u32)) {
        let base = extent * NOTICE_WORDS_PER_EXTENT;
        let Some(summary) = self.word(base) else {
            return;
        };
        // One plain load per extent per turn: the common case is that nothing closed.
        if summary.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut leaves = summary.swap(0, Ordering::Acquire);
        while leaves != 0 {
            let leaf = leaves.trailing_zeros();
            leaves &= leaves - 1;
            let Some(word) = self.word(base + 1 + leaf) else {
                continue;
            };
            let mut rows = word.swap(0, Ordering::Acquire);
            while rows != 0 {
                let bit = rows.trailing_zeros();
                rows &= rows - 1;
                closed(leaf * 64 + bit);
            }
        }
    }

    /// Forgets every notice of `extent` (a previous lessee's, when it is leased anew).
    pub(crate) fn clear(&self, extent: u32) {
        let base = extent * NOTICE_WORDS_PER_EXTENT;
        for i in 0..NOTICE_WORDS_PER_EXTENT {
            if let Some(word) = self.word(base + i) {
                word.store(0, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

    use lull_common::notice_words;

    use super::*;

    /// Notices over ordinary shared memory (a memfd), posted the way the programs post them.
    fn notices(rows: u32) -> (Notices, OwnedFd) {
        // SAFETY: a NUL-terminated name and no flags; the fd returned is ours.
        let fd = unsafe { libc::memfd_create(c"lull-notices-test".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let bytes = Notices::words_for(rows) as i64 * 8;
        // SAFETY: resizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), bytes) }, 0);
        (Notices::map(fd.as_fd(), rows).unwrap(), fd)
    }

    fn post(n: &Notices, row: u32) {
        let (summary, leaf, leaf_bit, row_bit) = notice_words(row);
        n.word(leaf)
            .unwrap()
            .fetch_or(1 << row_bit, Ordering::Relaxed);
        n.word(summary)
            .unwrap()
            .fetch_or(1 << leaf_bit, Ordering::Relaxed);
    }

    fn taken(n: &Notices, extent: u32) -> Vec<u32> {
        let mut rows = Vec::new();
        n.take(extent, |row| rows.push(row));
        rows
    }

    #[test]
    fn each_notice_is_taken_once_and_only_by_its_extent() {
        let (n, _fd) = notices(3 * EXTENT_ROWS);
        for row in [0, 63, 64, 4095, EXTENT_ROWS + 7, 2 * EXTENT_ROWS + 4000] {
            post(&n, row);
        }
        assert_eq!(taken(&n, 0), vec![0, 63, 64, 4095]);
        assert_eq!(taken(&n, 0), Vec::<u32>::new(), "taken once");
        assert_eq!(taken(&n, 1), vec![7]);
        post(&n, 2 * EXTENT_ROWS + 5);
        n.clear(2);
        assert_eq!(taken(&n, 2), Vec::<u32>::new(), "cleared for a new lessee");
        assert_eq!(
            taken(&n, 99),
            Vec::<u32>::new(),
            "past the end: nothing, no panic"
        );
    }
}
