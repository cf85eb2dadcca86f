//! The demo's script: which peers do what, and when.
//!
//! The engine side and the peer processes must agree on when each hung peer hangs and each
//! closing peer closes, without talking about it over the connection (that would be traffic).
//! Both derive it from the connection's client port, with the same [`Script`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The line a peer process prints once it listens: `PORTS <answering> <busy> <hung> <closing>`
/// (TCP), then the UDP ports of [`Role::UDP`].
pub const READY_PREFIX: &str = "PORTS";

/// What a demo peer does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Answers every probe.
    Answering,
    /// Sends a byte more often than `idle`, so it must never be probed.
    Busy,
    /// Answers until its hang time, then neither reads nor writes, socket open.
    Hung,
    /// Answers until its close time, then closes (FIN) or resets (RST).
    Closing,
}

impl Role {
    /// Every role, in report order.
    pub const ALL: [Role; 4] = [Role::Answering, Role::Busy, Role::Hung, Role::Closing];
    /// The roles of UDP flows, which have nothing to close.
    pub const UDP: [Role; 3] = [Role::Answering, Role::Busy, Role::Hung];

    /// Lowercase name for reports and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Role::Answering => "answering",
            Role::Busy => "busy",
            Role::Hung => "hung",
            Role::Closing => "closing",
        }
    }
}

/// Timings shared by the engine side and every peer process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Script {
    /// How often a busy peer sends.
    pub busy_every_ms: u64,
    /// Hung peers hang between these offsets after the connection opens.
    pub hang_ms: (u64, u64),
    /// Closing peers close between these offsets after the connection opens.
    pub close_ms: (u64, u64),
}

impl Script {
    /// When the peer on client port `port` hangs, after the connection opened.
    pub fn hang_after(&self, port: u16) -> Duration {
        between(self.hang_ms, port)
    }

    /// When the peer on client port `port` closes, after the connection opened.
    pub fn close_after(&self, port: u16) -> Duration {
        between(self.close_ms, port ^ 0x5a5a)
    }

    /// Whether the closing peer on `port` resets instead of closing cleanly (half of them).
    pub fn resets(port: u16) -> bool {
        port % 2 == 1
    }
}

fn between((from, to): (u64, u64), port: u16) -> Duration {
    // splitmix64: ports are consecutive, their times should not be.
    let mut z = u64::from(port).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let span = to.saturating_sub(from);
    Duration::from_millis(from + if span == 0 { 0 } else { z % (span + 1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_stay_in_their_windows_and_spread_out() {
        let script = Script {
            busy_every_ms: 1_000,
            hang_ms: (3_000, 15_000),
            close_ms: (2_000, 20_000),
        };
        let hangs: Vec<_> = (40_000..41_000).map(|p| script.hang_after(p)).collect();
        assert!(
            hangs
                .iter()
                .all(|d| (3_000..=15_000).contains(&(d.as_millis() as u64)))
        );
        let distinct: std::collections::HashSet<_> = hangs.iter().collect();
        assert!(
            distinct.len() > 900,
            "consecutive ports get different times"
        );
        let closes: Vec<_> = (40_000..41_000).map(|p| script.close_after(p)).collect();
        assert!(
            closes
                .iter()
                .all(|d| (2_000..=20_000).contains(&(d.as_millis() as u64)))
        );
        assert_eq!(
            script.hang_after(40_123),
            script.hang_after(40_123),
            "deterministic"
        );
        let empty = Script {
            hang_ms: (5, 5),
            ..script
        };
        assert_eq!(empty.hang_after(1), Duration::from_millis(5));
    }
}
