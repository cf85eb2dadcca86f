//! [`Verdict`]: how a watched connection ended, as the kernel classified it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, SystemTime},
};

use lull_common::host::{VerdictEvent, sock_flags, verdict};

/// The kinds of close, as named in events and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VerdictKind {
    /// The kernel's keepalive probes went unanswered.
    KeepaliveTimeout,
    /// Data stayed unacknowledged too long (`TCP_USER_TIMEOUT` or the retransmission limit).
    UserTimeout,
    /// The peer sent a RST.
    ResetByPeer,
    /// An orderly close (FINs both ways).
    Closed,
    /// This side aborted the connection (sent a RST).
    LocalAbort,
}

impl VerdictKind {
    /// Every kind, in the order of the kernel's codes.
    pub const ALL: [Self; 5] = [
        Self::KeepaliveTimeout,
        Self::UserTimeout,
        Self::ResetByPeer,
        Self::Closed,
        Self::LocalAbort,
    ];

    /// The kind for a kernel code (`lull_common::host::verdict`).
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            verdict::KEEPALIVE_TIMEOUT => Self::KeepaliveTimeout,
            verdict::USER_TIMEOUT => Self::UserTimeout,
            verdict::RESET_BY_PEER => Self::ResetByPeer,
            verdict::CLOSED => Self::Closed,
            verdict::LOCAL_ABORT => Self::LocalAbort,
            _ => return None,
        })
    }

    /// The kernel's code for this kind.
    pub fn code(self) -> u8 {
        match self {
            Self::KeepaliveTimeout => verdict::KEEPALIVE_TIMEOUT,
            Self::UserTimeout => verdict::USER_TIMEOUT,
            Self::ResetByPeer => verdict::RESET_BY_PEER,
            Self::Closed => verdict::CLOSED,
            Self::LocalAbort => verdict::LOCAL_ABORT,
        }
    }

    /// `keepalive_timeout`, `user_timeout`, `reset_by_peer`, `closed` or `local_abort`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::UserTimeout => "user_timeout",
            Self::ResetByPeer => "reset_by_peer",
            Self::Closed => "closed",
            Self::LocalAbort => "local_abort",
        }
    }
}

impl std::fmt::Display for VerdictKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One watched connection that ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// How it ended.
    pub kind: VerdictKind,
    /// The rule that watched it.
    pub rule: String,
    /// Its socket cookie (`ss -e` shows it in hex, as `sk:`).
    pub cookie: u64,
    /// Its local address.
    pub local: SocketAddr,
    /// Its peer's address.
    pub peer: SocketAddr,
    /// How long the rule watched it: from establishment, or from when it was picked up.
    pub age: Duration,
    /// Whether it was picked up after it was established, so `age` is shorter than its life.
    pub picked_up: bool,
    /// When it closed.
    pub at: SystemTime,
    /// `sk_err` at the close (0, or an errno such as 110 ETIMEDOUT or 104 ECONNRESET).
    pub sk_err: i32,
    /// The TCP state it left for CLOSE (e.g. `ESTABLISHED`, `LAST_ACK`).
    pub old_state: &'static str,
    /// Keepalive probes that were unanswered at the close.
    pub probes_out: u8,
    /// Retransmissions outstanding at the close.
    pub retransmits: u8,
    /// Bytes received over its life.
    pub bytes_received: u64,
    /// Bytes sent and acknowledged over its life.
    pub bytes_acked: u64,
}

impl Verdict {
    /// Decodes a kernel record; `rule` names its slot, `now` pairs the monotonic clock with
    /// the wall clock. `None` for a record with an unknown verdict code.
    pub(crate) fn from_event(
        e: &VerdictEvent,
        rule: String,
        now: (u64, SystemTime),
    ) -> Option<Self> {
        let ago = Duration::from_nanos(now.0.saturating_sub(e.closed_ns));
        Some(Self {
            kind: VerdictKind::from_code(e.verdict)?,
            rule,
            cookie: e.cookie,
            local: socket_addr(e.family, &e.local_addr, e.local_port),
            peer: socket_addr(e.family, &e.remote_addr, e.remote_port),
            age: Duration::from_nanos(e.closed_ns.saturating_sub(e.since_ns)),
            picked_up: e.flags & sock_flags::PICKED_UP != 0,
            at: now.1.checked_sub(ago).unwrap_or(now.1),
            sk_err: e.sk_err,
            old_state: tcp_state_name(e.old_state),
            probes_out: e.probes_out,
            retransmits: e.retransmits,
            bytes_received: e.bytes_received,
            bytes_acked: e.bytes_acked,
        })
    }
}

/// A socket address from a family, 16 address bytes (IPv4 in the first four) and a port.
pub(crate) fn socket_addr(family: u16, addr: &[u8; 16], port: u16) -> SocketAddr {
    let ip = if family == libc::AF_INET as u16 {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    };
    SocketAddr::new(ip, port)
}

/// The kernel's name of a TCP state (`include/net/tcp_states.h`), as `ss` prints it.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}
