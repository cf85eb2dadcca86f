//! The baseline: one timer per connection, reset on every activity event, the way a
//! per-connection `tokio::time::sleep` or Netty's `IdleStateHandler` is used.
//!
//! It gets every advantage lull has except laziness: the same timing wheel, the same 1 ms
//! tick, the same batched io_uring no-op probes, the same simulated peers. Only the strategy
//! differs: it must touch a connection's timer every time that connection carries traffic.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use io_uring::{IoUring, opcode};
use lull::{activity::SimulatedSource, wheel::TimingWheel};

/// One connection's state in the baseline.
#[derive(Clone, Copy)]
struct Conn {
    key: lull::wheel::TimerKey,
    unanswered: u8,
    dead: bool,
}

/// Totals the baseline thread reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct NaiveStats {
    pub resets: u64,
    pub fires: u64,
    pub probes: u64,
    pub dead: u64,
    pub cpu: Duration,
    /// Timers that fired more than [`LATE_MS`] after their deadline: the thread fell behind.
    pub late_fires: u64,
    /// The latest any timer fired after its deadline, in ms (since the last reset).
    pub max_late_ms: u64,
}

/// How late a firing must be to count as falling behind: well past the 1 ms tick and the
/// 10 ms activity batches, so scheduling noise alone does not trip it.
pub const LATE_MS: u64 = 100;

pub struct NaiveEngine {
    wheel: TimingWheel,
    conns: Vec<Conn>,
    sim: Arc<SimulatedSource>,
    ring: IoUring,
    start: Instant,
    idle_ticks: u64,
    interval_ticks: u64,
    count: u8,
    pub stats: NaiveStats,
}

impl NaiveEngine {
    /// Connection `i` was last active `ago[i]` before `start`.
    pub fn new(
        sim: Arc<SimulatedSource>,
        ago: &[Duration],
        idle: Duration,
        interval: Duration,
        count: u32,
        start: Instant,
    ) -> Self {
        let idle_ticks = idle.as_millis() as u64;
        let mut wheel = TimingWheel::with_capacity(ago.len());
        let conns = ago
            .iter()
            .enumerate()
            .map(|(i, a)| Conn {
                key: wheel.insert(idle_ticks.saturating_sub(a.as_millis() as u64), i as u32),
                unanswered: 0,
                dead: false,
            })
            .collect();
        Self {
            wheel,
            conns,
            sim,
            ring: IoUring::builder()
                .setup_cqsize(8192)
                .build(4096)
                .expect("io_uring"),
            start,
            idle_ticks,
            interval_ticks: interval.as_millis() as u64,
            count: count as u8,
            stats: NaiveStats::default(),
        }
    }

    fn tick(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Traffic on these connections: what the application's read path does per message.
    pub fn on_activity(&mut self, batch: &[u32]) {
        let at = self.tick() + self.idle_ticks;
        for &i in batch {
            let c = &mut self.conns[i as usize];
            c.unanswered = 0;
            self.wheel.reset(c.key, at);
        }
        self.stats.resets += batch.len() as u64;
    }

    /// Fires due timers and sends their probes as one batch; returns the next wake-up tick.
    pub fn turn(&mut self) -> Option<u64> {
        let now = self.tick();
        let mut probed: Vec<u32> = Vec::new();
        while let Some(e) = self.wheel.poll(now) {
            self.stats.fires += 1;
            let late = now.saturating_sub(e.deadline);
            self.stats.max_late_ms = self.stats.max_late_ms.max(late);
            if late > LATE_MS {
                self.stats.late_fires += 1;
            }
            let c = &mut self.conns[e.token as usize];
            if c.dead {
                continue;
            }
            if c.unanswered >= self.count {
                c.dead = true;
                self.stats.dead += 1;
                continue;
            }
            c.unanswered += 1;
            self.wheel.reset(e.key, now + self.interval_ticks);
            probed.push(e.token);
            if probed.len() == 4096 {
                self.send(&probed, now);
                probed.clear();
            }
        }
        self.send(&probed, now);
        self.wheel.next_expiration()
    }

    fn send(&mut self, probed: &[u32], now: u64) {
        if probed.is_empty() {
            return;
        }
        for &i in probed {
            let sqe = opcode::Nop::new().build().user_data(u64::from(i));
            // SAFETY: a no-op refers to no memory.
            unsafe { self.ring.submission().push(&sqe) }.expect("room for the batch");
        }
        self.ring
            .submit_and_wait(probed.len())
            .expect("io_uring_enter");
        let done: Vec<u32> = self
            .ring
            .completion()
            .map(|c| c.user_data() as u32)
            .collect();
        self.stats.probes += done.len() as u64;
        // A live peer answers at once; reading its answer is traffic, so the timer is reset,
        // exactly as for any other message.
        for i in done {
            if self.sim.alive(i) {
                let c = &mut self.conns[i as usize];
                c.unanswered = 0;
                self.wheel.reset(c.key, now + self.idle_ticks);
                self.stats.resets += 1;
            }
        }
    }
}
