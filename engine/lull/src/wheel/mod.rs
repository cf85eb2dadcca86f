//! A hierarchical timing wheel: the engine's one timer structure for millions of connections.
//!
//! It follows the design of tokio's `runtime/time/wheel`, with the timers kept in a slab with
//! intrusive links instead of individually allocated nodes, so arming a timer allocates nothing
//! (the slab only grows, amortized, when more timers are allocated at once than ever before).
//! Each timer costs [`ENTRY_BYTES`] (24) bytes.
//!
//! Times are **ticks** (`u64`). The wheel knows nothing of nanoseconds: the engine converts
//! `CLOCK_MONOTONIC` time to ticks with its configured tick length, 1 ms by default.
//!
//! # Levels
//!
//! Six levels of 64 slots. Read as base-64 digits, a timer's deadline and the wheel's current
//! tick first differ at some digit: that digit is the timer's level and the deadline's value
//! there its slot. When the wheel reaches the start of a higher-level slot, that slot's timers
//! cascade down into finer slots; when it reaches a level-0 slot, that slot's timers fire.
//!
//! | level | slot width (ticks) | range (ticks)         | slot width at 1 ms | range at 1 ms |
//! |------:|-------------------:|----------------------:|-------------------:|--------------:|
//! | 0     | 1                  | 64                    | 1 ms               | 64 ms         |
//! | 1     | 64                 | 4,096                 | 64 ms              | ~4.1 s        |
//! | 2     | 4,096              | 262,144               | ~4.1 s             | ~4.4 min      |
//! | 3     | 262,144            | 16,777,216            | ~4.4 min           | ~4.7 h        |
//! | 4     | 16,777,216         | 1,073,741,824         | ~4.7 h             | ~12.4 days    |
//! | 5     | 1,073,741,824      | 68,719,476,736 (2^36) | ~12.4 days         | ~795 days     |
//!
//! A deadline beyond the top level's range is clamped into the top level, in the slot its
//! deadline names, and re-cascaded when that slot comes up, until it is really due. A top slot
//! comes up in the rotation of the earliest deadline it holds, so a far timer costs a few
//! cascades rather than one per rotation. It keeps its exact deadline throughout and never fires
//! early; any `u64` deadline works.
//!
//! Cascading a slot re-files every timer in it; [`poll_within`](TimingWheel::poll_within)
//! does that in pieces of bounded size, so a herd of timers due together never makes one call
//! long.
//!
//! Insert, [`reset`](TimingWheel::reset), [`disarm`](TimingWheel::disarm) and
//! [`remove`](TimingWheel::remove) are O(1); expiry is amortized O(1) per timer, cascades
//! included. Expired timers come out in non-decreasing deadline order across ticks, each at the
//! first [`poll`](TimingWheel::poll) whose `now` reaches its deadline; one armed for a deadline
//! already past comes out on the next poll, with whatever else is due then.
//!
//! # Ground rules
//!
//! - One owner: only the engine thread touches a wheel. It is neither locked nor shared; the
//!   type is `Send` so it can be built elsewhere and moved in, and that is all.
//! - A [`TimerKey`] is only meaningful for the wheel that made it. Handing it to another wheel
//!   may act on an unrelated timer there; a key for this wheel is checked by generation, so a
//!   key kept after [`remove`](TimingWheel::remove) is rejected, even once its slot is reused.
//! - Tokens are opaque: the wheel stores the caller's `u32` and hands it back, nothing more.
//!   The engine keeps a connection index there.
//! - Time only moves forward: [`poll`](TimingWheel::poll) with an earlier tick than
//!   [`now`](TimingWheel::now) is treated as `now`.
//! - A fired timer stays allocated (disarmed) until its owner re-arms it with
//!   [`reset`](TimingWheel::reset) or frees it with [`remove`](TimingWheel::remove); the wheel
//!   never frees an entry by itself.

mod level;
mod slab;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use level::{Expiration, Levels, level_for, slot_for};
use slab::{CASCADE, PENDING, Slab, slot_list};

/// Bytes of wheel storage per timer, for benchmarks that report memory per timer.
pub const ENTRY_BYTES: usize = size_of::<slab::Entry>();

/// Handle to one timer. Stays valid until `remove`; a stale key (after remove, or a reused slot)
/// is detected by its generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    generation: u32,
}

impl TimerKey {
    /// The timer's slab index: dense from 0 and reused after `remove`, so callers can use it to
    /// index side tables sized like the wheel.
    pub fn index(self) -> u32 {
        self.index
    }
}

/// A timer that [`TimingWheel::poll`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    /// The timer, now disarmed but still allocated.
    pub key: TimerKey,
    /// The token given to [`TimingWheel::insert`].
    pub token: u32,
    /// The deadline the timer was armed with, in ticks.
    pub deadline: u64,
}

/// What [`TimingWheel::poll_within`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// A timer that is due.
    Expired(Expired),
    /// Nothing more is due at `now`.
    Idle,
    /// The work budget ran out before anything due could be returned; call again (with the
    /// same or a later `now`) to continue. Nothing is lost or reordered.
    Yield,
}

/// A hierarchical timing wheel over ticks. See the [module docs](self).
pub struct TimingWheel {
    slab: Slab,
    levels: Levels,
    /// How far slots have been processed. It trails `now` only while `poll` has due timers
    /// left to hand out, and is the reference for placing timers: anything due at or before it
    /// goes straight to the pending list.
    elapsed: u64,
    now: u64,
}

// By hand: the derived form would print every entry of a wheel holding millions.
impl std::fmt::Debug for TimingWheel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimingWheel")
            .field("now", &self.now)
            .field("elapsed", &self.elapsed)
            .field("len", &self.len())
            .field("armed", &self.armed())
            .field("next_expiration", &self.next_expiration())
            .finish()
    }
}

impl Default for TimingWheel {
    fn default() -> Self {
        Self::new()
    }
}

impl TimingWheel {
    /// An empty wheel at tick 0.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty wheel at tick 0 with room for `capacity` timers before it allocates.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            slab: Slab::with_capacity(capacity),
            levels: Levels::new(),
            elapsed: 0,
            now: 0,
        }
    }

    /// The wheel's current tick: the latest `now` given to [`poll`](Self::poll), or 0.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Allocated timers, armed or not.
    pub fn len(&self) -> usize {
        self.slab.allocated()
    }

    /// Whether no timer is allocated.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Timers waiting to fire, including those already due but not yet returned by `poll`.
    pub fn armed(&self) -> usize {
        self.slab.linked()
    }

    /// Allocates a timer and arms it for `deadline`. `token` is the caller's (the engine stores a
    /// connection index there). A deadline at or before [`now`](Self::now) fires on the next
    /// [`poll`](Self::poll).
    ///
    /// # Panics
    ///
    /// If the wheel already holds about 2^32 timers.
    pub fn insert(&mut self, deadline: u64, token: u32) -> TimerKey {
        let (index, generation) = self.slab.alloc(token);
        self.link(index, deadline);
        TimerKey { index, generation }
    }

    /// Re-arms (or arms a disarmed/fired) timer for `deadline`, earlier or later; O(1). Returns
    /// false for a stale key.
    pub fn reset(&mut self, key: TimerKey, deadline: u64) -> bool {
        if !self.is_live(key) {
            return false;
        }
        self.unlink(key.index);
        self.link(key.index, deadline);
        true
    }

    /// Unlinks the timer but keeps it allocated (the key stays valid and can be `reset` later).
    /// Returns false for a stale key.
    pub fn disarm(&mut self, key: TimerKey) -> bool {
        if !self.is_live(key) {
            return false;
        }
        self.unlink(key.index);
        true
    }

    /// Unlinks the timer if armed and frees it; the key becomes stale. Returns the token, or
    /// `None` for a stale key.
    pub fn remove(&mut self, key: TimerKey) -> Option<u32> {
        let token = self.slab.get(key.index, key.generation)?.token;
        self.unlink(key.index);
        self.slab.free(key.index);
        Some(token)
    }

    /// The timer's deadline; `None` if the key is stale or the timer is not armed.
    pub fn deadline(&self, key: TimerKey) -> Option<u64> {
        let entry = self.slab.get(key.index, key.generation)?;
        self.slab.is_linked(key.index).then_some(entry.deadline)
    }

    /// The timer's token, armed or not; `None` if the key is stale.
    pub fn token(&self, key: TimerKey) -> Option<u32> {
        self.slab.get(key.index, key.generation).map(|e| e.token)
    }

    /// The earliest tick at which [`poll`](Self::poll) could return something, or `None` when
    /// nothing is armed.
    ///
    /// Like tokio's `next_expiration` it is slot-granular: for a timer in a higher level it is
    /// the start of that timer's slot, when the slot must be cascaded, so it may be earlier than
    /// any deadline, but never later than the earliest one still ahead. It is at most `now()`
    /// when something is already due.
    pub fn next_expiration(&self) -> Option<u64> {
        if !self.slab.is_list_empty(PENDING) || !self.slab.is_list_empty(CASCADE) {
            return Some(self.elapsed);
        }
        self.levels
            .next_expiration(self.elapsed)
            .map(|expiration| expiration.deadline)
    }

    /// Advances the wheel to `now` (an earlier tick than [`now()`](Self::now) counts as
    /// `now()`) and returns one expired timer with `deadline <= now`, or `None` when nothing more
    /// is due at `now`.
    ///
    /// The returned timer is unlinked but stays allocated (disarmed): the caller either `reset`s
    /// or `remove`s it. The caller may stop calling `poll` at any point and resume later with
    /// the same or a later `now`; timers not yet returned stay armed (and can be disarmed, reset
    /// or removed in O(1) meanwhile) and come out first.
    pub fn poll(&mut self, now: u64) -> Option<Expired> {
        loop {
            match self.poll_within(now, usize::MAX) {
                Poll::Expired(expired) => return Some(expired),
                Poll::Idle => return None,
                Poll::Yield => {}
            }
        }
    }

    /// Like [`poll`](Self::poll), but re-files at most `budget` timers while cascading before
    /// it returns [`Poll::Yield`].
    ///
    /// Cascading a slot re-files every timer in it, and one slot of a wheel holding a herd of
    /// timers due together can hold hundreds of thousands: a caller with a latency budget (the
    /// engine's loop) uses this to do that work in pieces. While a slot is part-way through its
    /// cascade, [`next_expiration`](Self::next_expiration) reports the wheel's current tick.
    pub fn poll_within(&mut self, now: u64, budget: usize) -> Poll {
        self.now = self.now.max(now);
        let mut budget = budget;
        loop {
            if let Some(index) = self.slab.pop_front(PENDING) {
                let entry = self.slab.entry(index);
                return Poll::Expired(Expired {
                    key: TimerKey {
                        index,
                        generation: self.slab.generation(index),
                    },
                    token: entry.token,
                    deadline: entry.deadline,
                });
            }
            // A cascade under way is finished before any later slot is looked at: its timers
            // may be due before the timers of that slot.
            if !self.slab.is_list_empty(CASCADE) {
                while budget > 0
                    && let Some(index) = self.slab.pop_front(CASCADE)
                {
                    let deadline = self.slab.entry(index).deadline;
                    self.link(index, deadline);
                    budget -= 1;
                }
                if budget == 0 && !self.slab.is_list_empty(CASCADE) {
                    return Poll::Yield;
                }
                continue;
            }
            match self.levels.next_expiration(self.elapsed) {
                Some(expiration) if expiration.deadline <= self.now => self.process(expiration),
                _ => {
                    self.elapsed = self.now;
                    return Poll::Idle;
                }
            }
        }
    }

    fn is_live(&self, key: TimerKey) -> bool {
        self.slab.get(key.index, key.generation).is_some()
    }

    /// Files an unlinked entry under `deadline`. Placement is relative to `elapsed`, not `now`:
    /// slots between the two may not be processed yet, and a deadline among them must still
    /// come out in order.
    fn link(&mut self, index: u32, deadline: u64) {
        self.slab.entry_mut(index).deadline = deadline;
        if deadline <= self.elapsed {
            self.slab.push_back(PENDING, index);
            return;
        }
        let level = level_for(self.elapsed, deadline);
        let slot = slot_for(deadline, level);
        self.slab.push_back(slot_list(level, slot), index);
        self.levels.occupy(level, slot, deadline);
    }

    fn unlink(&mut self, index: u32) {
        if let Some(list) = self.slab.unlink(index)
            && list != PENDING
            && list != CASCADE
        {
            self.levels.vacate(list / level::SLOTS, list % level::SLOTS);
        }
    }

    /// Moves the wheel to the start of `expiration`'s slot and hands the slot's timers to the
    /// cascade list, from which [`poll_within`](Self::poll_within) re-files them: the due ones
    /// to the pending list, the rest into finer slots (or, for a far deadline, back into the top
    /// level). A level-0 slot's timers are all due: they go to the pending list at once. Moving the whole list first also matters for a top-level slot, whose far timers
    /// go straight back into the same slot.
    fn process(&mut self, expiration: Expiration) {
        debug_assert!(expiration.deadline >= self.elapsed);
        self.elapsed = expiration.deadline;
        self.levels.vacate(expiration.level, expiration.slot);
        // A level-0 slot is one tick wide: every timer in it is due now, and goes straight to
        // the pending list rather than through the cascade (an unlink and a link each).
        let to = if expiration.level == 0 {
            PENDING
        } else {
            CASCADE
        };
        self.slab
            .splice(slot_list(expiration.level, expiration.slot), to);
    }
}
