//! What one strategy's run yields: its outcome, and for a strategy that ran, every figure
//! measured and the per-connection and per-probe figures the tables and notes derive from them.

use std::time::Duration;

use crate::{
    attachment::Attachment,
    env::Background,
    plan::{Bounds, VERDICT_SLACK},
    proto::{LullCounters, Mix, Role, Strategy},
};

/// One strategy at one connection count: measured, or why not.
pub struct Outcome {
    pub strategy: Strategy,
    pub status: Status,
}

impl Outcome {
    /// What was measured, if the strategy ran.
    pub fn measured(&self) -> Option<&Measured> {
        match &self.status {
            Status::Ran(m) => Some(m),
            _ => None,
        }
    }
}

/// Every strategy in one mix at one connection count.
pub struct Pass {
    pub conns: u64,
    pub mix: Mix,
    pub outcomes: Vec<Outcome>,
}

impl Pass {
    /// What `strategy` measured in this pass, if it ran.
    pub fn measured(&self, strategy: Strategy) -> Option<&Measured> {
        self.outcomes
            .iter()
            .find(|o| o.strategy == strategy)
            .and_then(Outcome::measured)
    }
}

/// How a strategy's run ended.
pub enum Status {
    Ran(Box<Measured>),
    Unavailable(String),
    Failed(String),
}

/// Everything measured for one strategy.
pub struct Measured {
    pub processes: usize,
    pub conns: u64,
    pub failed: u64,
    pub roles: [u64; 4],
    pub detail: String,
    pub setup: Duration,
    pub window: Duration,
    pub cpu: Cpu,
    /// Probes the strategy sent: its own count; `TCPKeepAlive` for kernel keepalive; both for
    /// lull-tiered, whose transport tier is the kernel's keepalive.
    pub probes: u64,
    /// lull's and tokio's own count of their probes.
    pub own_probes: Option<u64>,
    /// `TCPKeepAlive` over the window (kernel probes; 0 for lull and tokio, except
    /// lull-tiered, as a check).
    pub keepalives: u64,
    pub segments: u64,
    /// Packets dropped at a full loopback backlog during the window.
    pub drops: u64,
    /// Wakeups of the workers' and the peers' threads over the window.
    pub wakeups: (u64, u64),
    pub hung_ms: Vec<f64>,
    pub vanished_ms: Vec<f64>,
    /// lull's first verdicts on hung and on vanished peers, by tier ([`crate::proto::Tier`]
    /// order).
    pub hung_tiers: [u64; 2],
    pub vanished_tiers: [u64; 2],
    /// Verdicts on connections already reported dead (only the first counts above), by the
    /// tier that made them for lull, in `[transport, application, untiered]` order.
    pub repeated: [u64; 3],
    /// How long the strategy may take to report each kind of dead peer.
    pub bounds: Bounds,
    /// lull's engine counters over the window, summed over workers (lull only).
    pub lull: Option<LullCounters>,
    /// lull's policy's nominal probe period for an answering connection (lull only).
    pub nominal_period: Option<Duration>,
    /// Where lull's programs ran (lull's eBPF strategies, when the run has its cgroup).
    pub attachment: Option<Result<Attachment, String>>,
    /// Programs found attached to the run's cgroup before the strategy started: left behind
    /// by the one before, and run by this one's sockets too.
    pub stale: Option<String>,
    /// Answering or busy connections reported dead.
    pub wrongly_dead: u64,
    pub closed: u64,
    pub revived: u64,
    pub memory: Memory,
    /// How long the firewall rule took to go in.
    pub blackhole_ms: Option<f64>,
}

impl Measured {
    /// Connection-hours over the window.
    pub fn hours(&self) -> f64 {
        self.conns as f64 * self.window.as_secs_f64() / 3600.0
    }

    /// CPU per connection-hour, ms.
    pub fn per_conn_hour(&self) -> f64 {
        self.cpu.ours() / self.hours()
    }

    /// CPU over the window, in percent of one core.
    pub fn core_pct(&self) -> f64 {
        self.cpu.ours() / (self.window.as_secs_f64() * 1e3) * 100.0
    }

    /// CPU per probe sent, µs.
    pub fn per_probe_us(&self) -> Option<f64> {
        (self.probes > 0).then(|| self.cpu.ours() * 1e3 / self.probes as f64)
    }

    /// The workers' own CPU (user + system) per probe sent, µs: the part of a probe that
    /// stays on the keepalive side's host on a real network.
    pub fn worker_us_per_probe(&self) -> Option<f64> {
        (self.probes > 0)
            .then(|| (self.cpu.workers_user + self.cpu.workers_sys) * 1e3 / self.probes as f64)
    }

    /// Peers of `role` in the population.
    pub fn of(&self, role: Role) -> u64 {
        self.roles[role.index()]
    }

    /// Hung peers caught within the bound, [`VERDICT_SLACK`] allowed (`None` if the strategy
    /// cannot see them).
    pub fn hung_within(&self) -> Option<usize> {
        let bound = (self.bounds.hung? + VERDICT_SLACK).as_secs_f64() * 1e3;
        Some(self.hung_ms.iter().filter(|&&ms| ms <= bound).count())
    }

    /// Vanished peers caught within the bound, [`VERDICT_SLACK`] allowed.
    pub fn vanished_within(&self) -> usize {
        let bound = (self.bounds.vanished + VERDICT_SLACK).as_secs_f64() * 1e3;
        self.vanished_ms.iter().filter(|&&ms| ms <= bound).count()
    }

    /// Every dead peer the strategy can see caught within its bound; for one that cannot see
    /// hung peers, none of them reported.
    pub fn caught_all_in_bounds(&self) -> bool {
        let hung = match self.hung_within() {
            Some(within) => within as u64 == self.of(Role::Hung),
            None => self.hung_ms.is_empty(),
        };
        hung && self.vanished_within() as u64 == self.of(Role::Vanishing)
    }

    /// lull's probes to answering connections per connection-hour, and the policy's nominal
    /// rate.
    pub fn probe_rate(&self) -> Option<(f64, f64)> {
        let (lull, period) = (self.lull?, self.nominal_period?);
        let hours = self.of(Role::Answering) as f64 * self.window.as_secs_f64() / 3600.0;
        (hours > 0.0).then(|| {
            (
                lull.probes_answering as f64 / hours,
                3600.0 / period.as_secs_f64(),
            )
        })
    }

    /// Kernel memory per connection: the slab caches that grew with the connections (less
    /// `/proc` fd entries) if slabinfo could be read, the `Slab` line of /proc/meminfo
    /// otherwise.
    pub fn slab_per_conn(&self) -> f64 {
        let bytes = self
            .memory
            .objects
            .map_or(self.memory.slab, |(_, sockets)| sockets);
        bytes as f64 / self.conns as f64
    }
}

/// CPU over the window, in ms.
pub struct Cpu {
    /// Every CPU's time less its idle time.
    pub whole: f64,
    /// User-space processes outside the run.
    pub others: f64,
    pub workers_user: f64,
    pub workers_sys: f64,
    pub peers_user: f64,
    pub peers_sys: f64,
    pub orchestrator: f64,
    /// Softirq on idle CPUs, in the run's processes, and in anything else (`None` without
    /// the BPF measurement).
    pub softirq: Option<[f64; 3]>,
    /// The window's length, and the machine's background around it.
    pub window_s: f64,
    pub background: Background,
}

impl Cpu {
    /// The run's processes.
    pub fn processes(&self) -> f64 {
        self.workers_user + self.workers_sys + self.peers_user + self.peers_sys + self.orchestrator
    }

    /// Whole-system CPU less the processes that are not part of the run.
    pub fn whole_less_others(&self) -> f64 {
        self.whole - self.others
    }

    /// Softirq in `bucket` (0 idle, 1 ours, 2 other) over the window, and the background's
    /// share of it.
    pub fn softirq(&self, bucket: usize) -> Option<(f64, f64)> {
        let measured = self.softirq?[bucket];
        let background = self.background.softirq.map_or(0.0, |b| b[bucket]) * self.window_s;
        Some((measured, background))
    }

    /// Softirq charged to anything but the run's processes (idle CPUs, other tasks), and the
    /// background's share of it.
    pub fn softirq_elsewhere(&self) -> Option<(f64, f64)> {
        let (idle, idle_background) = self.softirq(0)?;
        let (other, other_background) = self.softirq(2)?;
        Some((idle + other, idle_background + other_background))
    }

    /// The run's CPU: its processes, plus the softirq charged to anything else, net of the
    /// background; without the softirq measurement, whole-system less other processes, net of
    /// the background.
    pub fn ours(&self) -> f64 {
        match self.softirq_elsewhere().map(|(m, b)| (m - b).max(0.0)) {
            Some(softirq) => self.processes() + softirq,
            None => (self.whole_less_others() - self.background.whole_less_others * self.window_s)
                .max(0.0),
        }
    }
}

/// Kernel memory growth from before the workers started to after every connection was up.
pub struct Memory {
    pub slab: i64,
    pub unreclaimable: i64,
    /// From `/proc/slabinfo`, if readable: every cache, and only the caches that grew with
    /// the connections (less `/proc` fd entries).
    pub objects: Option<(i64, i64)>,
    pub top: Vec<(String, i64)>,
    /// The workers' resident memory growth while they opened their connections.
    pub rss: i64,
    /// Resident memory a worker took on average to start its strategy, before its first
    /// connection, and of it the shared part (lull's mapping of its host-wide table).
    pub start_rss: (f64, f64),
}

/// `values` at quantile `q` (nearest rank), or `None` if empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied()
}
