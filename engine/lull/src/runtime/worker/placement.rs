//! [`Placement`]: where on the wheel's ticks an arm lands.
//!
//! The wheel counts ticks from the engine's start; connections count `CLOCK_MONOTONIC`
//! nanoseconds. Placement converts between the two, and picks for each [`Arm`] the moment in
//! its window it fires at.
//!
//! # Ground rules
//!
//! - Nothing fires late: a deadline becomes the first tick at or after it, and a placed arm
//!   never lands after its `at`.
//! - Only arms with slack (`early > 0`) move, and only inside `[at - early, at]`.

use super::super::conn::Arm;

/// The tick grid and the coalescing grid of one engine, and the random draws that spread arms.
pub(super) struct Placement {
    /// `CLOCK_MONOTONIC` ns of tick 0.
    start_ns: u64,
    tick_ns: u64,
    /// The coalescing grid (a whole number of ticks): arms with slack land on its points.
    grid_ns: u64,
    /// xorshift64* state; never 0.
    rng: u64,
}

impl Placement {
    pub(super) fn new(start_ns: u64, tick_ns: u64, grid_ns: u64) -> Self {
        Self {
            start_ns,
            tick_ns,
            grid_ns,
            rng: start_ns | 1,
        }
    }

    pub(super) fn tick_ns(&self) -> u64 {
        self.tick_ns
    }

    /// The tick `ns` falls in.
    pub(super) fn tick_of(&self, ns: u64) -> u64 {
        ns.saturating_sub(self.start_ns) / self.tick_ns
    }

    /// The first tick at or after `ns`: a timer never fires before its deadline.
    pub(super) fn deadline_tick(&self, ns: u64) -> u64 {
        ns.saturating_sub(self.start_ns).div_ceil(self.tick_ns)
    }

    /// When `tick` starts, in ns.
    pub(super) fn tick_start(&self, tick: u64) -> u64 {
        self.start_ns
            .saturating_add(tick.saturating_mul(self.tick_ns))
    }

    /// Picks the moment an arm fires, in ns, inside its window `[at - early, at]`.
    ///
    /// A random point spreads connections that went idle together (a burst of registrations
    /// does not probe in one tick, and stays spread). That point is then moved to the nearest
    /// point of a grid inside the window, so connections due around the same time share a
    /// wake-up of the engine: on a VM each wake-up costs tens of microseconds, and at a million
    /// connections they would otherwise come every tick. The grid is the coalescing grid, or,
    /// when the window is wide enough, the width of a level-1 or level-2 slot of the wheel:
    /// a deadline on a slot boundary is due the moment its slot comes up, so it skips the
    /// finer levels' cascades (each a move between two lists of timers scattered over memory,
    /// most of the engine's cost at a million connections). Nearest, not down: the mean
    /// firing time stays where the random point put it. Nothing fires later than `at`, so no
    /// bound moves.
    pub(super) fn place(&mut self, arm: Arm) -> u64 {
        if arm.early == 0 {
            return arm.at;
        }
        let lo = arm.at.saturating_sub(arm.early);
        // xorshift64*: a different draw per arm.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
        let point = lo + ((u128::from(r) * u128::from(arm.early)) >> 32) as u64;
        let grid = [WHEEL_SLOT_TICKS[1], WHEEL_SLOT_TICKS[0]]
            .into_iter()
            .map(|ticks| ticks * self.tick_ns)
            .find(|&grid| grid > self.grid_ns && arm.early >= 2 * grid)
            .unwrap_or(self.grid_ns);
        if grid > self.tick_ns {
            snap(point, lo, arm.at, self.start_ns, grid)
        } else {
            point
        }
    }
}

/// The widths, in ticks, of a slot of the wheel's levels 1 and 2 (see `wheel`).
const WHEEL_SLOT_TICKS: [u64; 2] = [64, 4_096];

/// `point` (a moment in `[lo, hi]`) moved onto the grid of `grid` ns counted from `origin`:
/// the nearer of the grid points around it that is in the window, else `point` itself (a
/// window narrower than the grid may hold no point).
fn snap(point: u64, lo: u64, hi: u64, origin: u64, grid: u64) -> u64 {
    if grid == 0 || point < origin {
        return point;
    }
    let down = point - (point - origin) % grid;
    let up = down + grid;
    let (near, far) = if point - down <= up - point {
        (down, up)
    } else {
        (up, down)
    };
    [near, far]
        .into_iter()
        .find(|p| (lo..=hi).contains(p))
        .unwrap_or(point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapping_stays_inside_the_window() {
        // (point, lo, hi, origin, grid) -> where it fires
        let cases = [
            (1_003, 1_000, 1_010, 0, 8, 1_000), // nearer down: 1000, inside
            (1_005, 1_000, 1_010, 0, 8, 1_008), // nearer up: 1008, inside
            (1_012, 1_010, 1_030, 0, 8, 1_016), // 1008 is below lo: up to 1016
            (1_011, 1_009, 1_015, 0, 8, 1_011), // no grid point in [1009, 1015]
            (1_011, 1_009, 1_016, 0, 8, 1_016), // the upper edge is still inside
            (1_013, 1_000, 1_014, 0, 8, 1_008), // nearer up is past hi: down
            (1_005, 1_000, 1_010, 3, 8, 1_003), // the grid starts at the origin
            (1_005, 1_000, 1_010, 0, 0, 1_005), // no grid
            (2, 0, 10, 5, 8, 2),                // before the origin
        ];
        for (point, lo, hi, origin, grid, want) in cases {
            let got = snap(point, lo, hi, origin, grid);
            assert_eq!(
                got, want,
                "snap({point}, [{lo}, {hi}], origin {origin}, grid {grid})"
            );
            assert!((lo..=hi).contains(&got));
        }
    }

    #[test]
    fn placed_arms_stay_in_their_window_and_deadlines_round_up() {
        const MS: u64 = 1_000_000;
        let start = 5 * MS;
        let mut placement = Placement::new(start, MS, 8 * MS);
        for k in 0..1_000 {
            let arm = Arm {
                at: start + 30_000 * MS + k * 7,
                early: 3_000 * MS,
            };
            let at = placement.place(arm);
            assert!(
                (arm.at - arm.early..=arm.at).contains(&at),
                "{arm:?} -> {at}"
            );
        }
        let exact = Arm::exact(start + 12 * MS + 1);
        assert_eq!(placement.place(exact), exact.at, "no slack, no move");
        assert_eq!(placement.deadline_tick(start + 12 * MS + 1), 13);
        assert_eq!(placement.deadline_tick(start + 12 * MS), 12);
        assert_eq!(placement.tick_of(start + 12 * MS + 1), 12);
        assert_eq!(placement.tick_start(12), start + 12 * MS);
    }
}
