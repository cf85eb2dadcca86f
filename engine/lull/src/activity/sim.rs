//! [`SimulatedSource`]: the activity table's layout in ordinary memory.

use std::{
    os::fd::BorrowedFd,
    sync::atomic::{AtomicU64, Ordering},
};

use super::{Activity, ActivityError, ActivitySource, Slot, SourceKind, rows::Rows};

/// A stand-in for [`ActivityTable`](super::ActivityTable) with the same rows and the same read
/// path, written by a workload generator instead of the kernel. Benchmarks use it to run the
/// whole engine at millions of connections on a machine that cannot hold that many sockets.
pub struct SimulatedSource {
    rows: Rows,
    /// One bit per slot: set when the simulated peer is dead and answers nothing.
    dead: Box<[AtomicU64]>,
}

impl SimulatedSource {
    /// A table of `capacity` empty rows; every simulated peer answers probes until killed.
    pub fn new(capacity: u32) -> Self {
        Self {
            rows: Rows::heap(capacity as usize),
            dead: (0..(capacity as usize).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Makes the peer of `index` dead: it no longer answers probes.
    pub fn kill(&self, index: u32) {
        if let Some(word) = self.dead.get(index as usize / 64) {
            word.fetch_or(1 << (index % 64), Ordering::Relaxed);
        }
    }

    /// Whether the peer of `index` still answers probes.
    pub fn alive(&self, index: u32) -> bool {
        self.dead
            .get(index as usize / 64)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (index % 64)) == 0)
    }

    /// Records payload received on `slot` at `now_ns` (what the ingress program does).
    pub fn stamp_rx(&self, index: u32, now_ns: u64) {
        if let Some(row) = self.rows.get(index) {
            row.stamp_rx(now_ns);
        }
    }

    /// Records payload sent on `slot` at `now_ns` (what the egress program does).
    pub fn stamp_tx(&self, index: u32, now_ns: u64) {
        if let Some(row) = self.rows.get(index) {
            row.stamp_tx(now_ns);
        }
    }

    /// Sets [`flags`](super::flags) bits on `slot`, e.g. a peer reset.
    pub fn set_flags(&self, index: u32, bits: u32) {
        if let Some(row) = self.rows.get(index) {
            row.set_flags(bits);
        }
    }

    /// The number of rows.
    pub fn capacity(&self) -> u32 {
        self.rows.capacity() as u32
    }
}

impl ActivitySource for SimulatedSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Simulated
    }

    fn attach(
        &self,
        _fd: Option<BorrowedFd<'_>>,
        slot: Slot,
        baseline_ns: u64,
    ) -> Result<(), ActivityError> {
        self.rows.open(slot, baseline_ns)?;
        Ok(())
    }

    fn detach(&self, slot: Slot, _fd: Option<BorrowedFd<'_>>) {
        self.rows.retire(slot);
    }

    /// A live simulated peer answers at once: its answer is payload received now.
    fn probe_sent(&self, slot: Slot, now_ns: u64) {
        if self.alive(slot.index) {
            self.stamp_rx(slot.index, now_ns);
        }
    }

    fn registered_rows(&self) -> Option<u64> {
        Some(self.rows.registered())
    }

    #[inline]
    fn prefetch(&self, slot_index: u32) {
        self.rows.prefetch(slot_index);
    }

    #[inline]
    fn read(&self, slot: Slot, _fd: Option<BorrowedFd<'_>>) -> Result<Activity, ActivityError> {
        Ok(self.rows.read(slot))
    }
}
