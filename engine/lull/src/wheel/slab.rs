//! Entry storage: one `Vec` of fixed-size entries, a free list threaded through it, and
//! intrusive doubly linked lists for the wheel's slots and its pending list.
//!
//! Every list is circular around a head that lives outside the `Vec`, addressed by link values
//! at or above [`HEAD_BASE`]. Because a list always contains its head, unlinking an entry never
//! needs to know which list it is on, so an entry does not store its location: all 64 bits of
//! its deadline stay free. A list is empty after an unlink exactly when the entry's two
//! neighbours are the same node, which can then only be the head; that head tells the wheel
//! which occupancy bit to clear.

use super::level::{LEVELS, SLOTS};

/// "No node": the links of an entry that is on no list, and the end of the free list.
const NIL: u32 = u32::MAX;

/// Link values from here up name list heads. Entry indices stay below it.
const HEAD_BASE: u32 = u32::MAX - 1024;

/// The most entries one wheel can hold.
pub(crate) const MAX_ENTRIES: usize = HEAD_BASE as usize;

/// The list of entries that are due and wait for `poll` to hand them out.
pub(crate) const PENDING: usize = LEVELS * SLOTS;

/// The list of entries of a slot being cascaded, waiting to be re-filed. Kept as a real list
/// (not a detached chain) so that cascading can stop part-way and entries still waiting can
/// be disarmed, reset or removed in O(1) meanwhile.
pub(crate) const CASCADE: usize = PENDING + 1;

const LISTS: usize = CASCADE + 1;

/// The list that holds `slot` of `level`.
pub(crate) const fn slot_list(level: usize, slot: usize) -> usize {
    level * SLOTS + slot
}

const fn head_id(list: usize) -> u32 {
    HEAD_BASE + list as u32
}

/// One timer.
///
/// `generation` is odd while the entry is allocated and even while it is free, so a key (which
/// always carries an odd generation) can only match the allocation that made it. It wraps after
/// 2^31 reuses of one index; a key kept that long could then alias, which the engine's keys,
/// dropped when their connection closes, never do.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// The caller's deadline in ticks, kept whole even when the entry sits clamped in the top
    /// level.
    pub(crate) deadline: u64,
    /// `NIL` when on no list; `next` doubles as the free-list link while free.
    prev: u32,
    next: u32,
    generation: u32,
    pub(crate) token: u32,
}

const _: () = assert!(size_of::<Entry>() <= 24);

#[derive(Clone, Copy, Debug)]
struct Head {
    prev: u32,
    next: u32,
}

/// The entries and the lists threaded through them.
pub(crate) struct Slab {
    entries: Vec<Entry>,
    heads: [Head; LISTS],
    free: u32,
    allocated: usize,
    linked: usize,
}

impl Slab {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        let mut heads = [Head {
            prev: NIL,
            next: NIL,
        }; LISTS];
        for (list, head) in heads.iter_mut().enumerate() {
            *head = Head {
                prev: head_id(list),
                next: head_id(list),
            };
        }
        let entries = Vec::with_capacity(capacity.min(MAX_ENTRIES));
        crate::memory::advise_huge_pages(entries.as_ptr(), entries.capacity() * size_of::<Entry>());
        Self {
            entries,
            heads,
            free: NIL,
            allocated: 0,
            linked: 0,
        }
    }

    pub(crate) fn allocated(&self) -> usize {
        self.allocated
    }

    pub(crate) fn linked(&self) -> usize {
        self.linked
    }

    /// Takes an entry off the free list, or grows the `Vec`, and returns its index and
    /// generation. The entry starts on no list.
    pub(crate) fn alloc(&mut self, token: u32) -> (u32, u32) {
        let index = if self.free != NIL {
            let index = self.free;
            self.free = self.entries[index as usize].next;
            index
        } else {
            let index = self.entries.len();
            assert!(
                index < MAX_ENTRIES,
                "timing wheel full ({MAX_ENTRIES} entries)"
            );
            self.entries.push(Entry {
                deadline: 0,
                prev: NIL,
                next: NIL,
                generation: 0,
                token,
            });
            index as u32
        };
        let entry = &mut self.entries[index as usize];
        entry.generation = entry.generation.wrapping_add(1);
        entry.token = token;
        entry.prev = NIL;
        entry.next = NIL;
        self.allocated += 1;
        (index, entry.generation)
    }

    /// Returns an allocated entry that is on no list to the free list.
    pub(crate) fn free(&mut self, index: u32) {
        let free = self.free;
        let entry = &mut self.entries[index as usize];
        debug_assert!(entry.prev == NIL && entry.generation % 2 == 1);
        entry.generation = entry.generation.wrapping_add(1);
        entry.next = free;
        self.free = index;
        self.allocated -= 1;
    }

    /// The allocated entry at `index`, if `generation` is the one it was allocated with.
    pub(crate) fn get(&self, index: u32, generation: u32) -> Option<&Entry> {
        self.entries
            .get(index as usize)
            .filter(|entry| entry.generation == generation)
    }

    pub(crate) fn entry(&self, index: u32) -> &Entry {
        &self.entries[index as usize]
    }

    pub(crate) fn entry_mut(&mut self, index: u32) -> &mut Entry {
        &mut self.entries[index as usize]
    }

    pub(crate) fn generation(&self, index: u32) -> u32 {
        self.entries[index as usize].generation
    }

    pub(crate) fn is_linked(&self, index: u32) -> bool {
        self.entries[index as usize].prev != NIL
    }

    pub(crate) fn is_list_empty(&self, list: usize) -> bool {
        self.heads[list].next == head_id(list)
    }

    fn set_next(&mut self, node: u32, next: u32) {
        if node >= HEAD_BASE {
            self.heads[(node - HEAD_BASE) as usize].next = next;
        } else {
            self.entries[node as usize].next = next;
        }
    }

    fn set_prev(&mut self, node: u32, prev: u32) {
        if node >= HEAD_BASE {
            self.heads[(node - HEAD_BASE) as usize].prev = prev;
        } else {
            self.entries[node as usize].prev = prev;
        }
    }

    /// Appends an entry that is on no list to `list`.
    pub(crate) fn push_back(&mut self, list: usize, index: u32) {
        let head = head_id(list);
        let last = self.heads[list].prev;
        let entry = &mut self.entries[index as usize];
        debug_assert_eq!(entry.prev, NIL, "entry {index} is already linked");
        entry.prev = last;
        entry.next = head;
        self.set_next(last, index);
        self.heads[list].prev = index;
        self.linked += 1;
    }

    /// Takes an entry off whatever list it is on; does nothing if it is on none. Returns the
    /// list if this left it empty.
    pub(crate) fn unlink(&mut self, index: u32) -> Option<usize> {
        let entry = &mut self.entries[index as usize];
        let (prev, next) = (entry.prev, entry.next);
        if prev == NIL {
            return None;
        }
        entry.prev = NIL;
        entry.next = NIL;
        self.set_next(prev, next);
        self.set_prev(next, prev);
        self.linked -= 1;
        (prev == next).then(|| {
            debug_assert!(prev >= HEAD_BASE);
            (prev - HEAD_BASE) as usize
        })
    }

    /// Unlinks and returns the first entry of `list`.
    pub(crate) fn pop_front(&mut self, list: usize) -> Option<u32> {
        let first = self.heads[list].next;
        if first == head_id(list) {
            return None;
        }
        self.unlink(first);
        Some(first)
    }

    /// Moves every entry of `from` to the end of `to`, in order, in O(1): only the two end
    /// entries' links and the two heads change.
    pub(crate) fn splice(&mut self, from: usize, to: usize) {
        let Head {
            prev: last,
            next: first,
        } = self.heads[from];
        if first == head_id(from) {
            return;
        }
        self.heads[from] = Head {
            prev: head_id(from),
            next: head_id(from),
        };
        let to_last = self.heads[to].prev;
        self.set_next(to_last, first);
        self.set_prev(first, to_last);
        self.set_next(last, head_id(to));
        self.heads[to].prev = last;
    }
}
