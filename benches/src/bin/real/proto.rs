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
    /// The kernel's own `SO_KEEPALIVE`.
    Kernel,
    /// One tokio task and one `tokio::time::sleep` per connection.
    Tokio,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::LullEbpf,
        Strategy::LullTcpinfo,
        Strategy::Kernel,
        Strategy::Tokio,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Strategy::LullEbpf => "lull-ebpf",
            Strategy::LullTcpinfo => "lull-tcpinfo",
            Strategy::Kernel => "kernel",
            Strategy::Tokio => "tokio",
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
/// vanish; answering otherwise), 5% busy, the rest answering.
pub fn role_of(global: u64, vanishing: bool) -> Role {
    match global % 100 {
        0 => Role::Hung,
        1 if vanishing => Role::Vanishing,
        2..=6 => Role::Busy,
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
}

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
    /// Resident memory before connecting and once set up.
    pub rss_before: u64,
    pub rss_after: u64,
    /// What the strategy says about itself (e.g. lull's activity source).
    pub detail: String,
}

/// What a worker saw, sent after the window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Probes sent between [`CMD_MARK`] and [`CMD_REPORT`], by the worker's own count (`None`
    /// for kernel keepalive, whose probes only the namespace's counters see).
    pub probes: Option<u64>,
    /// Connections found dead: (global number, `CLOCK_MONOTONIC` ns of the verdict).
    pub dead: Vec<(u64, u64)>,
    /// Connections that ended any other way (EOF, reset, an error other than a timeout).
    pub closed: u64,
    /// Connections reported dead that then answered again (lull's `Revived`).
    pub revived: u64,
}
