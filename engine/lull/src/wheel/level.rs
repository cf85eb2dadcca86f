//! Level and slot arithmetic, and the occupied-slot bitmaps that let the wheel find the next
//! slot to process without walking empty ones.

/// Number of levels. Six levels of 64 slots cover 2^36 ticks, about 795 days at 1 ms.
pub(crate) const LEVELS: usize = 6;

/// Slots per level; a power of two so a level's occupancy fits one `u64`.
pub(crate) const SLOTS: usize = 64;

/// log2 of [`SLOTS`].
const SLOT_BITS: u32 = 6;

const SLOT_MASK: u64 = SLOTS as u64 - 1;

/// The top level, where deadlines beyond the wheel's range are clamped.
pub(crate) const TOP: usize = LEVELS - 1;

/// Ticks covered by one slot of `level`: 64^level.
pub(crate) const fn slot_width(level: usize) -> u64 {
    1 << (SLOT_BITS as usize * level)
}

/// Ticks covered by all slots of `level`: 64^(level + 1).
pub(crate) const fn level_range(level: usize) -> u64 {
    1 << (SLOT_BITS as usize * (level + 1))
}

/// The level an entry due at `when` belongs to while the wheel stands at `elapsed`.
///
/// The level is chosen by the highest 6-bit group in which `when` and `elapsed` differ rather
/// than by `when - elapsed`: that way every entry of a level sits in a slot that starts after
/// `elapsed` within the current rotation of the level above, which is what makes "lowest
/// occupied level first" the right processing order. Differences above the top level clamp to
/// it; such entries are re-cascaded until they are really due.
pub(crate) fn level_for(elapsed: u64, when: u64) -> usize {
    // The mask makes equal times land on level 0 and keeps `leading_zeros` below 64.
    let masked = (elapsed ^ when) | SLOT_MASK;
    let significant = 63 - masked.leading_zeros();
    ((significant / SLOT_BITS) as usize).min(TOP)
}

/// The slot of `level` that holds an entry due at `when`.
pub(crate) fn slot_for(when: u64, level: usize) -> usize {
    ((when >> (SLOT_BITS as usize * level)) & SLOT_MASK) as usize
}

/// The next slot the wheel must process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expiration {
    pub(crate) level: usize,
    pub(crate) slot: usize,
    /// The tick at which the slot is processed: its start, so nothing in it is due earlier.
    pub(crate) deadline: u64,
}

/// Occupancy of every slot, plus the earliest deadline in each top-level slot.
///
/// The top level needs the minimum because its slots are shared by every rotation: a slot can
/// hold entries due in this rotation and entries due thousands of rotations later. Processing a
/// top slot only when its earliest entry's rotation comes round keeps far deadlines from being
/// re-cascaded once per rotation (2^27 times for a deadline near 2^63). A minimum left stale by
/// a removal is only ever too early, which costs one harmless re-cascade.
#[derive(Debug)]
pub(crate) struct Levels {
    occupied: [u64; LEVELS],
    top_min: [u64; SLOTS],
}

impl Levels {
    pub(crate) const fn new() -> Self {
        Self {
            occupied: [0; LEVELS],
            top_min: [u64::MAX; SLOTS],
        }
    }

    /// Records that `slot` of `level` now holds an entry due at `when`.
    pub(crate) fn occupy(&mut self, level: usize, slot: usize, when: u64) {
        self.occupied[level] |= 1 << slot;
        if level == TOP {
            self.top_min[slot] = self.top_min[slot].min(when);
        }
    }

    /// Records that `slot` of `level` is empty.
    pub(crate) fn vacate(&mut self, level: usize, slot: usize) {
        self.occupied[level] &= !(1 << slot);
        if level == TOP {
            self.top_min[slot] = u64::MAX;
        }
    }

    /// The slot to process next with the wheel at `elapsed`, or `None` when every slot is empty.
    ///
    /// Lower levels never hold anything due later than a higher level's next slot, so the first
    /// occupied level answers.
    pub(crate) fn next_expiration(&self, elapsed: u64) -> Option<Expiration> {
        (0..LEVELS).find_map(|level| self.next_in_level(level, elapsed))
    }

    fn next_in_level(&self, level: usize, elapsed: u64) -> Option<Expiration> {
        let occupied = self.occupied[level];
        if occupied == 0 {
            return None;
        }
        let width = slot_width(level);
        let range = level_range(level);
        let level_start = elapsed & !(range - 1);
        // A slot at or before `elapsed` is one the wheel already stands in or has passed, so its
        // next start is in the next rotation. Only the top level can hold such slots.
        let ring_deadline = |slot: usize| {
            let start = level_start + slot as u64 * width;
            if start <= elapsed {
                start.saturating_add(range)
            } else {
                start
            }
        };
        // Rotating so the slot after the current one is bit 0 lists slots in time order.
        let first = (slot_for(elapsed, level) + 1) % SLOTS;
        let mut rotated = occupied.rotate_right(first as u32);
        let slot_at = |rotated: u64| (rotated.trailing_zeros() as usize + first) % SLOTS;

        if level != TOP {
            let slot = slot_at(rotated);
            return Some(Expiration {
                level,
                slot,
                deadline: ring_deadline(slot),
            });
        }

        let mut best: Option<Expiration> = None;
        while rotated != 0 {
            let slot = slot_at(rotated);
            rotated &= rotated - 1;
            let ring = ring_deadline(slot);
            // Later slots start no earlier than `ring`, so none can beat what was found.
            if best.is_some_and(|b| b.deadline <= ring) {
                break;
            }
            let deadline = ring.max(self.top_min[slot] & !(width - 1));
            if best.is_none_or(|b| deadline < b.deadline) {
                best = Some(Expiration {
                    level,
                    slot,
                    deadline,
                });
            }
        }
        best
    }
}
