//! Handing out slots (rows of the activity table, and connection indices of an engine).
//!
//! # Ground rules
//! - A slot is owned by exactly one registration between [`SlotAllocator::alloc`] and
//!   [`SlotAllocator::free`]. Its generation changes on every `alloc`, and is never 0.
//! - Each slot has one shared word: generation in the high 30 bits, a [`SlotState`] in the low
//!   2. Any thread may read it; the allocator writes it under its lock, and the engine and the
//!   connection's handle move it between `Live`, `Busy` and `Dropped` with compare-and-swap.
//! - A freed slot is not reused until every kernel program that might still hold its old
//!   [`SlotRef`](lull_common::SlotRef) has finished. BPF programs run inside RCU read-side
//!   sections, so one RCU grace period (`membarrier(MEMBARRIER_CMD_GLOBAL)`, which is
//!   `synchronize_rcu()`) is enough. Freed slots wait in `pending` until a grace period has
//!   passed; fresh slots are preferred, so the barrier only runs when the table is full of
//!   freed slots, and it is run without holding the lock.

use std::{
    io,
    sync::{
        Condvar, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
};

/// A slot and the generation of the registration that owns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slot {
    /// Row index in the activity table.
    pub index: u32,
    /// Registration generation; never 0.
    pub generation: u32,
}

/// What the owner of a live slot is doing with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum SlotState {
    /// Not allocated.
    Free = 0,
    /// Allocated; the engine may use the socket.
    Live = 1,
    /// The engine is using the socket's fd right now; a dropping handle must wait.
    Busy = 2,
    /// The handle was dropped; nobody may touch the fd any more.
    Dropped = 3,
}

const STATE_BITS: u32 = 2;
const STATE_MASK: u32 = (1 << STATE_BITS) - 1;
const GENERATION_MAX: u32 = u32::MAX >> STATE_BITS;

const fn word(generation: u32, state: SlotState) -> u32 {
    (generation << STATE_BITS) | state as u32
}

/// How freed slots wait before they are reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grace {
    /// Nothing outside this process can still write the slot's row.
    None,
    /// A kernel program may still hold the old registration: wait one RCU grace period.
    Rcu,
}

struct Lists {
    next_fresh: u32,
    free: Vec<u32>,
    pending: Vec<u32>,
    /// Slots taken out of `pending` by a thread that is waiting out their grace period.
    in_grace: u32,
}

/// Allocates slot indices in `base..base + capacity`.
pub(crate) struct SlotAllocator {
    base: u32,
    capacity: u32,
    grace: Grace,
    lists: Mutex<Lists>,
    /// Signalled when a grace period ends and its slots become free.
    graced: Condvar,
    words: Box<[AtomicU32]>,
}

impl SlotAllocator {
    pub(crate) fn new(base: u32, capacity: u32, grace: Grace) -> Self {
        Self {
            base,
            capacity,
            grace,
            lists: Mutex::new(Lists {
                next_fresh: 0,
                free: Vec::new(),
                pending: Vec::new(),
                in_grace: 0,
            }),
            graced: Condvar::new(),
            words: zeroed_words(capacity as usize),
        }
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Takes a slot, or `None` when every slot is in use.
    pub(crate) fn alloc(&self) -> io::Result<Option<Slot>> {
        let mut lists = self.lock();
        loop {
            let local = if let Some(local) = lists.free.pop() {
                Some(local)
            } else if lists.next_fresh < self.capacity {
                lists.next_fresh += 1;
                Some(lists.next_fresh - 1)
            } else {
                None
            };
            if let Some(local) = local {
                return Ok(Some(self.claim(local)));
            }
            if lists.pending.is_empty() {
                if lists.in_grace == 0 {
                    return Ok(None);
                }
                // Another thread is waiting out a grace period for slots that will be free in
                // a moment: wait for it rather than report the table full.
                lists = self
                    .graced
                    .wait(lists)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let pending = std::mem::take(&mut lists.pending);
            lists.in_grace += pending.len() as u32;
            drop(lists);
            let barrier = match self.grace {
                Grace::Rcu => rcu_barrier(),
                Grace::None => Ok(()),
            };
            lists = self.lock();
            lists.in_grace -= pending.len() as u32;
            lists.free.extend(pending);
            self.graced.notify_all();
            barrier?;
        }
    }

    fn claim(&self, local: u32) -> Slot {
        let cell = &self.words[local as usize];
        let previous = cell.load(Ordering::Relaxed) >> STATE_BITS;
        let generation = if previous >= GENERATION_MAX {
            1
        } else {
            previous + 1
        };
        cell.store(word(generation, SlotState::Live), Ordering::Release);
        Slot {
            index: self.base + local,
            generation,
        }
    }

    /// Returns a slot. It becomes reusable after the allocator's grace period.
    pub(crate) fn free(&self, slot: Slot) {
        let Some(local) = self.local(slot) else {
            return;
        };
        let cell = &self.words[local as usize];
        if cell.load(Ordering::Acquire) >> STATE_BITS != slot.generation {
            return;
        }
        cell.store(word(slot.generation, SlotState::Free), Ordering::Release);
        let mut lists = self.lock();
        match self.grace {
            Grace::None => lists.free.push(local),
            Grace::Rcu => lists.pending.push(local),
        }
    }

    /// Starts loading the word of local index `local` into the cache.
    #[inline]
    pub(crate) fn prefetch(&self, local: u32) {
        if let Some(word) = self.words.get(local as usize) {
            crate::memory::prefetch(word);
        }
    }

    /// The slot at local index `local` as it is now, or `None` while it is free.
    pub(crate) fn slot_at(&self, local: u32) -> Option<Slot> {
        let w = self.words.get(local as usize)?.load(Ordering::Acquire);
        (state_of(w) != SlotState::Free).then(|| Slot {
            index: self.base + local,
            generation: w >> STATE_BITS,
        })
    }

    /// The current state of `slot`, or `None` if the slot has moved on to a newer generation.
    pub(crate) fn state(&self, slot: Slot) -> Option<SlotState> {
        let cell = &self.words[self.local(slot)? as usize];
        let w = cell.load(Ordering::Acquire);
        (w >> STATE_BITS == slot.generation).then(|| state_of(w))
    }

    /// Moves `slot` from `from` to `to` if it is in `from` and still of its generation.
    pub(crate) fn transition(&self, slot: Slot, from: SlotState, to: SlotState) -> bool {
        let Some(local) = self.local(slot) else {
            return false;
        };
        self.words[local as usize]
            .compare_exchange(
                word(slot.generation, from),
                word(slot.generation, to),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Slots handed out and not yet freed (pending ones count as freed).
    pub(crate) fn in_use(&self) -> u32 {
        let lists = self.lock();
        lists.next_fresh - lists.free.len() as u32 - lists.pending.len() as u32 - lists.in_grace
    }

    fn local(&self, slot: Slot) -> Option<u32> {
        let local = slot.index.checked_sub(self.base)?;
        (local < self.capacity).then_some(local)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lists> {
        // The lists are plain vectors; a panic elsewhere cannot leave them half-updated.
        self.lists.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `capacity` zeroed words from `calloc`, so that a large capacity costs no resident memory
/// until slots are used.
fn zeroed_words(capacity: usize) -> Box<[AtomicU32]> {
    let words = vec![0u32; capacity].into_boxed_slice();
    crate::memory::advise_huge_pages(words.as_ptr(), capacity * size_of::<u32>());
    // SAFETY: `AtomicU32` has the same size, alignment and bit validity as `u32`, so a boxed
    // slice of one is a boxed slice of the other, allocated with the same layout.
    unsafe { Box::from_raw(Box::into_raw(words) as *mut [AtomicU32]) }
}

fn state_of(w: u32) -> SlotState {
    match w & STATE_MASK {
        0 => SlotState::Free,
        1 => SlotState::Live,
        2 => SlotState::Busy,
        _ => SlotState::Dropped,
    }
}

/// Waits for an RCU grace period: every BPF program running when this starts has finished when
/// it returns.
fn rcu_barrier() -> io::Result<()> {
    // SAFETY: membarrier takes no pointers. MEMBARRIER_CMD_GLOBAL is `synchronize_rcu()` on
    // kernels without nohz_full, which is what we need.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            libc::MEMBARRIER_CMD_GLOBAL as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_advance_and_skip_zero() {
        let slots = SlotAllocator::new(10, 1, Grace::None);
        let a = slots.alloc().unwrap().unwrap();
        assert_eq!((a.index, a.generation), (10, 1));
        assert_eq!(slots.alloc().unwrap(), None, "capacity is 1");
        slots.free(a);
        let b = slots.alloc().unwrap().unwrap();
        assert_eq!((b.index, b.generation), (10, 2));
        slots.words[0].store(word(GENERATION_MAX, SlotState::Live), Ordering::Relaxed);
        slots.free(Slot {
            index: 10,
            generation: GENERATION_MAX,
        });
        assert_eq!(slots.alloc().unwrap().unwrap().generation, 1);
    }

    #[test]
    fn stale_free_is_ignored() {
        let slots = SlotAllocator::new(0, 2, Grace::None);
        let a = slots.alloc().unwrap().unwrap();
        slots.free(a);
        let b = slots.alloc().unwrap().unwrap();
        assert_eq!(a.index, b.index);
        slots.free(a);
        assert_eq!(slots.state(b), Some(SlotState::Live));
        assert_eq!(slots.in_use(), 1);
    }

    #[test]
    fn fresh_slots_come_before_pending_ones() {
        let slots = SlotAllocator::new(0, 2, Grace::Rcu);
        let a = slots.alloc().unwrap().unwrap();
        slots.free(a);
        let b = slots.alloc().unwrap().unwrap();
        assert_ne!(
            a.index, b.index,
            "a pending slot must wait while fresh ones remain"
        );
        let c = slots.alloc().unwrap().unwrap();
        assert_eq!(
            c.index, a.index,
            "after the barrier the pending slot is reused"
        );
        assert_eq!(c.generation, a.generation + 1);
    }

    #[test]
    fn transitions_check_state_and_generation() {
        let slots = SlotAllocator::new(0, 1, Grace::None);
        let a = slots.alloc().unwrap().unwrap();
        assert!(slots.transition(a, SlotState::Live, SlotState::Busy));
        assert!(!slots.transition(a, SlotState::Live, SlotState::Dropped));
        assert!(slots.transition(a, SlotState::Busy, SlotState::Live));
        let stale = Slot {
            generation: a.generation + 1,
            ..a
        };
        assert!(!slots.transition(stale, SlotState::Live, SlotState::Busy));
        assert_eq!(slots.state(stale), None);
    }
}
