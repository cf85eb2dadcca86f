//! What the orchestrator, its peer processes and its worker processes agree on: the
//! strategies, which connection plays which role, and the lines they exchange.
//!
//! Children talk to the orchestrator in lines: it writes commands on their stdin, they answer
//! on stdout, each answer starting with a fixed word. A child exits when its stdin closes, so
//! nothing outlives a run, whatever happens to the orchestrator.

use std::{net::Ipv4Addr, time::Duration};

use serde::{Deserialize, Serialize};

/// A keepalive strategy under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Strategy {
    /// lull with the eBPF activity source.
    LullEbpf,
    /// lull with the `TCP_INFO` activity source.
    LullTcpinfo,
    /// lull with the eBPF source and tiered probing: the transport left to kernel keepalive,
    /// lull's own probes only for hung applications ([`Timing::hung_after`]).
    LullTiered,
    /// The kernel's own `SO_KEEPALIVE`.
    Kernel,
    /// One tokio task and one `tokio::time::sleep` per connection.
    Tokio,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [
        Strategy::LullEbpf,
        Strategy::LullTcpinfo,
        Strategy::LullTiered,
        Strategy::Kernel,
        Strategy::Tokio,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Strategy::LullEbpf => "lull-ebpf",
            Strategy::LullTcpinfo => "lull-tcpinfo",
            Strategy::LullTiered => "lull-tiered",
            Strategy::Kernel => "kernel",
            Strategy::Tokio => "tokio",
        }
    }

    /// lull, whichever source or tiering.
    pub fn is_lull(self) -> bool {
        matches!(
            self,
            Strategy::LullEbpf | Strategy::LullTcpinfo | Strategy::LullTiered
        )
    }

    /// lull with the eBPF source: its workers share one attachment of lull's programs.
    pub fn uses_ebpf(self) -> bool {
        matches!(self, Strategy::LullEbpf | Strategy::LullTiered)
    }

    /// Whether the kernel's keepalive probes some of this strategy's connections, so that
    /// `TCPKeepAlive` counts its probes.
    pub fn kernel_probes(self) -> bool {
        matches!(self, Strategy::Kernel | Strategy::LullTiered)
    }
}

/// The population's traffic: which share of the connections is busy, and how busy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Mix {
    /// 5% busy, a byte every idle/4; 1% hung, 1% vanishing, the rest answering.
    Standard,
    /// 20% busy, each sending 10 small messages a second (a byte every 100 ms); 1% hung,
    /// 1% vanishing, the rest answering.
    #[value(name = "busy_heavy", alias = "busy-heavy")]
    BusyHeavy,
}

impl Mix {
    pub const ALL: [Mix; 2] = [Mix::Standard, Mix::BusyHeavy];

    /// The mix's name in reports and in the figures' keys.
    pub fn label(self) -> &'static str {
        match self {
            Mix::Standard => "standard",
            Mix::BusyHeavy => "busy_heavy",
        }
    }

    /// Busy connections, in percent.
    pub fn busy_percent(self) -> u64 {
        match self {
            Mix::Standard => 5,
            Mix::BusyHeavy => 20,
        }
    }

    /// How often a busy peer sends a byte.
    pub fn busy_every(self, timing: &Timing) -> Duration {
        match self {
            Mix::Standard => timing.idle() / 4,
            Mix::BusyHeavy => Duration::from_millis(100),
        }
    }

    /// The mix in words, for the notes.
    pub fn describe(self) -> &'static str {
        match self {
            Mix::Standard => "5% busy (a byte every idle/4)",
            Mix::BusyHeavy => "20% busy (10 one-byte messages a second each)",
        }
    }
}

/// What the peer end of a connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Replies `+PONG\r\n` to every read.
    Answering,
    /// Sends a byte every idle/4 and answers reads: never idle, never to be probed.
    Busy,
    /// Answers until the hang instant, then neither reads nor writes; its kernel still ACKs.
    Hung,
    /// Answers, but at the vanish instant a firewall rule drops every packet to and from it,
    /// as if its host had gone: nothing, not even an ACK, comes back.
    Vanishing,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Answering, Role::Busy, Role::Hung, Role::Vanishing];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The role of connection number `global` (numbered across all workers of a strategy, so every
/// strategy gets the same population): 1% hung, 1% vanishing (when a firewall can make them
/// vanish; answering otherwise), the mix's share busy, the rest answering.
pub fn role_of(global: u64, vanishing: bool, mix: Mix) -> Role {
    match global % 100 {
        0 => Role::Hung,
        1 if vanishing => Role::Vanishing,
        n if (2..2 + mix.busy_percent()).contains(&n) => Role::Busy,
        _ => Role::Answering,
    }
}

/// Peer `k` listens for the answering, busy and hung roles on this address: one address per
/// peer process spreads the connections over many (address, port) destinations, each with its
/// own ~28k ephemeral ports.
pub fn peer_address(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1, (k % 250) as u8 + 1)
}

/// Peer `k`'s vanishing listener: a subnet of its own, so one firewall rule per direction
/// silences every vanishing peer and nothing else.
pub fn vanish_address(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 2, (k % 250) as u8 + 1)
}

/// The subnet [`vanish_address`] draws from.
pub const VANISH_SUBNET: &str = "127.0.2.0/24";

/// The detection policy every strategy applies.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Timing {
    pub idle_ms: u64,
    pub interval_ms: u64,
    pub count: u32,
}

impl Timing {
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms)
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// The longest a dead peer can go unreported: `idle + count * interval`.
    pub fn bound(&self) -> Duration {
        self.idle() + self.interval() * self.count
    }

    /// lull-tiered's `hung_after`: [`HUNG_AFTER_BOUNDS`] dead bounds.
    pub fn hung_after(&self) -> Duration {
        self.bound() * HUNG_AFTER_BOUNDS
    }
}

/// lull-tiered's `hung_after`, in dead bounds (`idle + count * interval`).
pub const HUNG_AFTER_BOUNDS: u32 = 4;

/// Peer: `PORTS <answering> <busy> <hung> <vanishing>` (socket addresses), once listening.
pub const PORTS: &str = "PORTS";
/// Peer: `ACCEPTED <n>`, in answer to [`CMD_COUNT`].
pub const ACCEPTED: &str = "ACCEPTED";
/// Worker: `READY <json Ready>`, once every connection is open and under its strategy.
pub const READY: &str = "READY";
/// Worker: `UNAVAILABLE <reason>`: the strategy cannot run here (eBPF without privileges).
pub const UNAVAILABLE: &str = "UNAVAILABLE";
/// Worker: `MARKED`, in answer to [`CMD_MARK`].
pub const MARKED: &str = "MARKED";
/// Worker: `REPORT <json Report>`, in answer to [`CMD_REPORT`].
pub const REPORT: &str = "REPORT";

/// To a peer: `hang <CLOCK_MONOTONIC ns>`, when the hung peers stop answering.
pub const CMD_HANG: &str = "hang";
/// To a peer: how many connections it has accepted.
pub const CMD_COUNT: &str = "count";
/// To a worker: the measurement window starts; note the probe count.
pub const CMD_MARK: &str = "mark";
/// To a worker: the window is over; report.
pub const CMD_REPORT: &str = "report";

/// A worker's state once set up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    /// Connections open and watched.
    pub conns: u64,
    /// Connections that could not be opened.
    pub failed: u64,
    /// Of `conns`, how many of each [`Role`], in [`Role::ALL`] order.
    pub roles: [u64; 4],
    /// Resident memory before the strategy started, once it had started (lull's engine
    /// built, before any connection), and once every connection was up.
    pub rss_before: u64,
    pub rss_started: u64,
    pub rss_after: u64,
    /// The shared part (`RssFile` + `RssShmem`) of `rss_before` and `rss_started`: what
    /// grows there is, for lull's eBPF source, its mapping of the host-wide activity table,
    /// which every lull process maps whole.
    pub shared_before: u64,
    pub shared_started: u64,
    /// What the strategy says about itself (e.g. lull's activity source).
    pub detail: String,
}

/// Which of lull's tiers found a peer dead (lull's `DeadTier`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tier {
    /// The kernel's keepalive (or `TCP_USER_TIMEOUT`) gave up on the peer's transport.
    Transport,
    /// lull's own probes went unanswered.
    Application,
}

impl Tier {
    /// The tier's place in per-tier counts.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A connection found dead.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Verdict {
    /// The connection's global number.
    pub global: u64,
    /// `CLOCK_MONOTONIC` ns of the verdict.
    pub at: u64,
    /// The tier that found it, for lull (`None` for the others, which have one).
    pub tier: Option<Tier>,
}

/// lull's engine counters over the window (the difference between [`CMD_MARK`] and
/// [`CMD_REPORT`]), summed over workers by the orchestrator.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct LullCounters {
    /// Probes sent to answering connections (per-connection counts): the ones to compare
    /// with the policy's nominal rate.
    pub probes_answering: u64,
    pub probes_answered: u64,
    /// Timer firings, and of those the ones that only re-armed (traffic since the arm).
    pub wakeups: u64,
    pub wakeups_rearmed: u64,
    /// Reads submitted to drain, and firings that skipped the read (nothing had arrived).
    pub drains: u64,
    pub drains_skipped: u64,
    pub dead_transport: u64,
    pub dead_application: u64,
    pub events_dropped: u64,
}

impl LullCounters {
    pub fn add(&mut self, other: &Self) {
        self.probes_answering += other.probes_answering;
        self.probes_answered += other.probes_answered;
        self.wakeups += other.wakeups;
        self.wakeups_rearmed += other.wakeups_rearmed;
        self.drains += other.drains;
        self.drains_skipped += other.drains_skipped;
        self.dead_transport += other.dead_transport;
        self.dead_application += other.dead_application;
        self.events_dropped += other.events_dropped;
    }
}

/// What a worker saw, sent after the window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Probes sent between [`CMD_MARK`] and [`CMD_REPORT`], by the worker's own count (`None`
    /// for kernel keepalive, whose probes only the namespace's counters see; lull-tiered's
    /// own probes only, its kernel keepalives are counted there too).
    pub probes: Option<u64>,
    /// Connections found dead.
    pub dead: Vec<Verdict>,
    /// Connections that ended any other way (EOF, reset, an error other than a timeout).
    pub closed: u64,
    /// Connections reported dead that then answered again (lull's `Revived`).
    pub revived: u64,
    /// lull's counters over the window (lull only).
    pub lull: Option<LullCounters>,
}
