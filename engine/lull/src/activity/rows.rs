//! The activity rows as userspace sees them: a slice of atomics over memory the kernel writes.

use std::{
    io,
    os::fd::BorrowedFd,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use lull_common::ActivityEntry;

use super::{Activity, ActivityError, Slot, mapping::SharedMapping};

/// One row, laid out exactly like [`ActivityEntry`] but made of atomics, because the kernel
/// (or the simulator thread) writes it while the engine reads it.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct RowCell {
    last_rx_ns: AtomicU64,
    last_tx_ns: AtomicU64,
    state: AtomicU64,
}

const _: () = assert!(size_of::<RowCell>() == size_of::<ActivityEntry>());
const _: () = assert!(size_of::<RowCell>() == size_of::<[u64; 3]>());
const _: () = assert!(align_of::<RowCell>() == align_of::<[u64; 3]>());
const _: () = assert!(align_of::<RowCell>() == align_of::<ActivityEntry>());

impl RowCell {
    /// Reads the row: three loads, no system call.
    #[inline]
    pub(crate) fn read(&self) -> (u32, Activity) {
        let state = self.state.load(Ordering::Acquire);
        let activity = Activity {
            last_rx_ns: self.last_rx_ns.load(Ordering::Relaxed),
            last_tx_ns: self.last_tx_ns.load(Ordering::Relaxed),
            flags: ActivityEntry::flags_of(state),
        };
        (ActivityEntry::generation_of(state), activity)
    }

    /// Sets both stamps to `baseline_ns` and publishes `generation`. The stamps are written
    /// *before* the generation is published, so a writer that passes the generation check only
    /// ever moves a clean row forward.
    #[inline]
    pub(crate) fn reset(&self, generation: u32, baseline_ns: u64) {
        self.state.store(0, Ordering::Release);
        self.last_rx_ns.store(baseline_ns, Ordering::Relaxed);
        self.last_tx_ns.store(baseline_ns, Ordering::Relaxed);
        self.state
            .store(ActivityEntry::pack_state(generation, 0), Ordering::Release);
    }

    /// Marks the row free: writers holding an old generation stop at the check.
    #[inline]
    pub(crate) fn retire(&self) {
        self.state.store(0, Ordering::Release);
    }

    /// Retires the row if it still belongs to `generation` (a stale unregister must not
    /// retire the next owner's row).
    #[inline]
    pub(crate) fn retire_if(&self, generation: u32) {
        if self.read().0 == generation {
            self.retire();
        }
    }

    /// Simulator side: stamps rx.
    #[inline]
    pub(crate) fn stamp_rx(&self, now_ns: u64) {
        self.last_rx_ns.store(now_ns, Ordering::Relaxed);
    }

    /// Simulator side: stamps tx.
    #[inline]
    pub(crate) fn stamp_tx(&self, now_ns: u64) {
        self.last_tx_ns.store(now_ns, Ordering::Relaxed);
    }

    /// Simulator side: sets flag bits.
    #[inline]
    pub(crate) fn set_flags(&self, bits: u32) {
        self.state.fetch_or(u64::from(bits), Ordering::Relaxed);
    }
}

/// Where the rows live.
enum Backing {
    /// The BPF array map, mapped with `mmap(MAP_SHARED)`; unmapped on drop.
    Mapped { _mapping: SharedMapping },
    /// Ordinary memory, for the simulated source; `Rows` points into this box.
    Heap { _owner: Box<[RowCell]> },
}

/// A fixed-size table of [`RowCell`]s.
pub(crate) struct Rows {
    ptr: NonNull<RowCell>,
    capacity: usize,
    _backing: Backing,
}

// SAFETY: every access to the rows goes through atomics, and the mapping (or box) lives until
// `Rows` is dropped, so sharing and sending `Rows` between threads is sound.
unsafe impl Send for Rows {}
// SAFETY: `&Rows` only hands out `&RowCell`, whose fields are atomics, so threads may use one
// `Rows` at once; the mapping (or box) is not freed until `Rows` is dropped.
unsafe impl Sync for Rows {}

impl Rows {
    /// Maps the value area of a `BPF_F_MMAPABLE` array map of `capacity` [`ActivityEntry`]s.
    pub(crate) fn map(map_fd: BorrowedFd<'_>, capacity: usize) -> io::Result<Self> {
        let mapping = SharedMapping::map(map_fd, capacity * size_of::<RowCell>())?;
        Ok(Self {
            ptr: mapping.as_ptr().cast::<RowCell>(),
            capacity,
            _backing: Backing::Mapped { _mapping: mapping },
        })
    }

    /// A zeroed table in ordinary memory.
    pub(crate) fn heap(capacity: usize) -> Self {
        // Zeroed by `alloc_zeroed` and not touched yet, so the huge-page hint applies before
        // the first fault.
        let zeroed = vec![[0u64; 3]; capacity].into_boxed_slice();
        crate::memory::advise_huge_pages(zeroed.as_ptr(), capacity * size_of::<RowCell>());
        // SAFETY: `RowCell` is #[repr(C)] over three `AtomicU64`, which have the size, alignment
        // and bit validity of `u64` (its size and alignment are asserted to be those of
        // `[u64; 3]` at the top of this module), so the boxed slices have the same layout, and
        // all zeroes is a valid `RowCell` (its default).
        let mut rows: Box<[RowCell]> =
            unsafe { Box::from_raw(Box::into_raw(zeroed) as *mut [RowCell]) };
        let ptr = NonNull::new(rows.as_mut_ptr()).unwrap_or(NonNull::dangling());
        Self {
            ptr,
            capacity,
            _backing: Backing::Heap { _owner: rows },
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Rows whose generation is not 0 (registered), scanning the whole table.
    pub(crate) fn registered(&self) -> u64 {
        (0..self.capacity as u32)
            .filter_map(|i| self.get(i))
            .filter(|row| row.read().0 != 0)
            .count() as u64
    }

    /// Starts loading row `index` into the cache (see `memory::prefetch`).
    #[inline]
    pub(crate) fn prefetch(&self, index: u32) {
        if (index as usize) < self.capacity {
            // SAFETY: in bounds, as checked; the pointer is only used as a prefetch hint.
            crate::memory::prefetch(unsafe { self.ptr.as_ptr().add(index as usize) });
        }
    }

    /// What `slot`'s registration sees in its row: a slot unregistered (or reused) since reads
    /// as empty, and so does an index past the end.
    #[inline]
    pub(crate) fn read(&self, slot: Slot) -> Activity {
        match self.get(slot.index).map(RowCell::read) {
            Some((generation, activity)) if generation == slot.generation => activity,
            _ => Activity::default(),
        }
    }

    /// Gives `slot`'s row to its registration, both stamps starting at `baseline_ns`.
    pub(crate) fn open(&self, slot: Slot, baseline_ns: u64) -> Result<&RowCell, ActivityError> {
        let row = self.get(slot.index).ok_or(ActivityError::Full {
            capacity: self.capacity as u32,
        })?;
        row.reset(slot.generation, baseline_ns);
        Ok(row)
    }

    /// Retires `slot`'s row, unless it has moved on to a newer registration.
    pub(crate) fn retire(&self, slot: Slot) {
        if let Some(row) = self.get(slot.index) {
            row.retire_if(slot.generation);
        }
    }

    /// The row at `index`, or `None` past the end.
    #[inline]
    pub(crate) fn get(&self, index: u32) -> Option<&RowCell> {
        let index = index as usize;
        if index >= self.capacity {
            return None;
        }
        // SAFETY: `index` is in bounds, the memory is valid for `capacity` rows for as long as
        // `self` lives, and rows are only accessed through atomics.
        Some(unsafe { &*self.ptr.as_ptr().add(index) })
    }
}
