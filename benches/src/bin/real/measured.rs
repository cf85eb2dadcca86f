//! What one strategy's run yields: its outcome, and for a strategy that ran, every figure
//! measured and the per-connection and per-probe figures the tables and notes derive from them.

use std::time::Duration;

use crate::{attachment::Attachment, env::Background, proto::Strategy};

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
    pub probes: u64,
    /// `TCPKeepAlive` over the window (kernel probes; 0 for the others, as a check).
    pub keepalives: u64,
    pub segments: u64,
    /// Packets dropped at a full loopback backlog during the window.
    pub drops: u64,
    /// Wakeups of the workers' and the peers' threads over the window.
    pub wakeups: (u64, u64),
    pub hung_ms: Vec<f64>,
    pub vanished_ms: Vec<f64>,
    /// Answering or busy connections reported dead.
    pub wrongly_dead: u64,
    pub closed: u64,
    pub revived: u64,
    pub memory: Memory,
    /// How long the firewall rule took to go in.
    pub blackhole_ms: Option<f64>,
    /// Where lull's programs ran (lull-ebpf, when the run has its cgroup).
    pub attachment: Option<Result<Attachment, String>>,
    /// Programs found attached to the run's cgroup before the strategy started: left behind
    /// by the one before, and run by this one's sockets too.
    pub stale: Option<String>,
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

    /// CPU per probe sent, µs.
    pub fn per_probe_us(&self) -> Option<f64> {
        (self.probes > 0).then(|| self.cpu.ours() * 1e3 / self.probes as f64)
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
    pub rss: i64,
}
