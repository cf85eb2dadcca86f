//! [`SimulatedSource`]: the activity table's layout in ordinary memory.

use std::os::fd::BorrowedFd;

use super::{Activity, ActivityError, ActivitySource, Slot, SourceKind, rows::Rows};

/// A stand-in for [`ActivityTable`](super::ActivityTable) with the same rows and the same read
/// path, written by a workload generator instead of the kernel. Benchmarks use it to run the
/// whole engine at millions of connections on a machine that cannot hold that many sockets.
pub struct SimulatedSource {
    rows: Rows,
}

impl SimulatedSource {
    /// A table of `capacity` empty rows.
    pub fn new(capacity: u32) -> Self {
        Self {
            rows: Rows::heap(capacity as usize),
        }
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
        let row = self.rows.get(slot.index).ok_or(ActivityError::Full {
            capacity: self.capacity(),
        })?;
        row.reset(slot.generation, baseline_ns);
        Ok(())
    }

    fn detach(&self, slot: Slot, _fd: Option<BorrowedFd<'_>>) {
        if let Some(row) = self.rows.get(slot.index) {
            row.retire_if(slot.generation);
        }
    }

    #[inline]
    fn read(&self, slot: Slot, _fd: Option<BorrowedFd<'_>>) -> Result<Activity, ActivityError> {
        Ok(match self.rows.get(slot.index).map(|row| row.read()) {
            Some((generation, activity)) if generation == slot.generation => activity,
            _ => Activity::default(),
        })
    }
}
