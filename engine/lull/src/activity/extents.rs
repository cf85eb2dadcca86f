//! [`RowExtents`]: which rows of the host's shared activity table one table uses.
//!
//! Every process on the host shares one activity table (see [`pinned`](super::pinned)), so
//! rows are leased in extents of [`EXTENT_ROWS`]: an extent is this process's while it holds
//! the extent's lock file, and the kernel releases that lock when the process dies. Extents
//! are leased as connections arrive, so a process uses kernel memory in proportion to what
//! it watches, not to the capacity it asked for.
//!
//! An engine addresses its connections by slot index, a number of its own. The first time an
//! index of a new extent-sized block is registered, a free extent is leased for the block, and
//! from then on `index` lives at `extent * EXTENT_ROWS + index % EXTENT_ROWS`.
//!
//! # Generations
//! A dead lessee's sockets may outlive it (a child process can inherit them), still carrying
//! storage that names rows of its extent. Each lease of an extent therefore has its own epoch,
//! counted in the extent's lock file, and the generation written to the table (and to the
//! socket's storage) is the epoch in the high bits and the engine's slot generation in the low
//! ones: such a socket's old generation never matches a new lessee's row.

use std::{
    path::PathBuf,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use super::{ActivityError, Slot, lock_file::LockFile};

pub use lull_common::EXTENT_ROWS;
/// Bits of a slot's generation kept in the row's generation; the rest hold the lease's epoch.
const GENERATION_BITS: u32 = 20;
const EPOCHS: u32 = (1 << (32 - GENERATION_BITS)) - 1;

/// Where one slot lives in the shared table, and the generation that marks it there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    /// Row index in the shared table.
    pub(crate) row: u32,
    /// Generation written to the row and the socket's storage; never 0.
    pub(crate) generation: u32,
}

/// The extents one table leased, by block of slot indices.
pub(crate) struct RowExtents {
    dir: PathBuf,
    /// Extents in the shared table.
    extents: u32,
    /// Per block of [`EXTENT_ROWS`] slot indices: 0 while none is leased, else the extent
    /// number plus one in the low 32 bits and the lease's epoch in the high ones.
    blocks: Box<[AtomicU64]>,
    /// The lock files of the extents leased, held until drop.
    leases: Mutex<Vec<LockFile>>,
}

impl RowExtents {
    /// Leases from the table of `table_rows` rows whose leases live in `dir`, for slot indices
    /// below `index_capacity`.
    pub(crate) fn new(dir: PathBuf, table_rows: u32, index_capacity: u32) -> Self {
        Self {
            dir,
            extents: table_rows / EXTENT_ROWS,
            blocks: (0..index_capacity.div_ceil(EXTENT_ROWS))
                .map(|_| AtomicU64::new(0))
                .collect(),
            leases: Mutex::new(Vec::new()),
        }
    }

    /// Where `slot` lives, if its block has an extent.
    #[inline]
    pub(crate) fn placement(&self, slot: Slot) -> Option<Placement> {
        let word = self
            .blocks
            .get((slot.index / EXTENT_ROWS) as usize)?
            .load(Ordering::Acquire);
        let extent = (word as u32).checked_sub(1)?;
        let epoch = (word >> 32) as u32;
        Some(Placement {
            row: extent * EXTENT_ROWS + slot.index % EXTENT_ROWS,
            generation: (epoch << GENERATION_BITS)
                | (slot.generation & ((1 << GENERATION_BITS) - 1)),
        })
    }

    /// Where `slot` lives, leasing an extent for its block first if it has none (and telling
    /// `leased` which, before the block points at it).
    pub(crate) fn place(
        &self,
        slot: Slot,
        leased: impl FnOnce(u32),
    ) -> Result<Placement, ActivityError> {
        if let Some(placed) = self.placement(slot) {
            return Ok(placed);
        }
        let block =
            self.blocks
                .get((slot.index / EXTENT_ROWS) as usize)
                .ok_or(ActivityError::Full {
                    capacity: self.blocks.len() as u32 * EXTENT_ROWS,
                })?;
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        // Another engine of this table may have leased it while we waited for the lock.
        if block.load(Ordering::Acquire) == 0 {
            let (extent, epoch, lock) = self.lease()?;
            leased(extent);
            leases.push(lock);
            block.store(
                u64::from(extent + 1) | (u64::from(epoch) << 32),
                Ordering::Release,
            );
        }
        drop(leases);
        self.placement(slot).ok_or(ActivityError::Full {
            capacity: self.extents * EXTENT_ROWS,
        })
    }

    /// Takes the first free extent, and starts its next epoch.
    fn lease(&self) -> Result<(u32, u32, LockFile), ActivityError> {
        for extent in 0..self.extents {
            let mut lock = LockFile::open(&self.dir.join(extent.to_string()))?;
            if !lock.try_lock_exclusive()? {
                continue;
            }
            let last: u32 = lock.read_text()?.trim().parse().unwrap_or(0);
            let epoch = last % EPOCHS + 1;
            lock.write_text(&format!("{epoch}\n"))?;
            return Ok((extent, epoch, lock));
        }
        Err(ActivityError::TableFull {
            rows: self.extents * EXTENT_ROWS,
        })
    }

    /// Each leased extent whose block lies in `indices`, with the first slot index of the block.
    pub(crate) fn leased_in(&self, indices: std::ops::Range<u32>, mut f: impl FnMut(u32, u32)) {
        let first = (indices.start / EXTENT_ROWS) as usize;
        let end = (indices.end.div_ceil(EXTENT_ROWS) as usize).min(self.blocks.len());
        for (block, word) in self.blocks.iter().enumerate().take(end).skip(first) {
            if let Some(extent) = (word.load(Ordering::Acquire) as u32).checked_sub(1) {
                f(block as u32 * EXTENT_ROWS, extent);
            }
        }
    }

    /// The rows this table has leased, for leak checks.
    pub(crate) fn leased_rows(&self) -> Vec<std::ops::Range<u32>> {
        self.blocks
            .iter()
            .filter_map(|b| (b.load(Ordering::Acquire) as u32).checked_sub(1))
            .map(|extent| extent * EXTENT_ROWS..(extent + 1) * EXTENT_ROWS)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(index: u32, generation: u32) -> Slot {
        Slot { index, generation }
    }

    impl RowExtents {
        fn place_(&self, slot: Slot) -> Result<Placement, ActivityError> {
            self.place(slot, |_| {})
        }
    }

    #[test]
    fn blocks_lease_distinct_extents_with_new_epochs() {
        let dir = std::env::temp_dir().join(format!("lull-extents-test-{}", std::process::id()));
        let a = RowExtents::new(dir.clone(), 3 * EXTENT_ROWS, 2 * EXTENT_ROWS);
        let b = RowExtents::new(dir.clone(), 3 * EXTENT_ROWS, EXTENT_ROWS);
        assert_eq!(a.placement(slot(5, 1)), None, "nothing leased yet");
        let a0 = a.place_(slot(5, 1)).unwrap();
        let a1 = a.place_(slot(EXTENT_ROWS + 5, 1)).unwrap();
        let b0 = b.place_(slot(5, 1)).unwrap();
        let rows = [a0.row, a1.row, b0.row];
        assert_eq!(rows, [5, EXTENT_ROWS + 5, 2 * EXTENT_ROWS + 5]);
        // Same block, same extent; a generation keeps its low bits.
        assert_eq!(a.place_(slot(7, 3)).unwrap().row, 7);
        assert_eq!(a0.generation & 0xfffff, 1);
        assert!(matches!(
            RowExtents::new(dir.clone(), 3 * EXTENT_ROWS, EXTENT_ROWS).place_(slot(0, 1)),
            Err(ActivityError::TableFull { .. })
        ));
        // b's extent is free again once b is gone, and its next lease has a new epoch.
        drop(b);
        let c = RowExtents::new(dir.clone(), 3 * EXTENT_ROWS, EXTENT_ROWS);
        let c0 = c.place_(slot(5, 1)).unwrap();
        assert_eq!(c0.row, b0.row);
        assert_ne!(c0.generation, b0.generation, "a new lease, a new epoch");
        assert_eq!(a.leased_rows().len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
