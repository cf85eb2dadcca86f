//! What kind of flow a watch is: a TCP connection, or a UDP flow and who sees its datagrams.
//!
//! The kind travels with the compiled policy (a policy is interned once per kind), so the
//! engine thread learns it from the record it loads anyway, and a TCP connection's record
//! stays 24 bytes.
//!
//! # UDP flows and their two observers
//!
//! A UDP flow is one peer of one socket: a connected socket (watched with
//! [`Engine::watch`](super::Engine::watch)), or one peer of an unconnected socket (watched with
//! [`Engine::watch_peer`](super::Engine::watch_peer)). Its activity is the datagrams it sends
//! (which postpone keep-warm datagrams) and receives (which answer liveness probes). Two
//! things can see them:
//!
//! - [`Observer::Ebpf`]: the kernel programs, for a connected socket registered in the table:
//!   ingress stamps every datagram received, the egress program every datagram sent. Whatever
//!   the application uses to send and receive, it is seen. Stamps live in socket storage,
//!   keyed by the socket, so they only fit a socket with one peer.
//! - [`Observer::Wrapper`]: the handle's own `send`/`recv` (`send_to`/`recv_from` on a
//!   [`PeerSocket`](super::PeerSocket)) stamp the flow's row in this process's memory: for
//!   the peers of an unconnected socket, and wherever eBPF is unavailable (`TCP_INFO` has
//!   nothing for UDP). Datagrams the application moves through the bare socket are not seen.
//!
//! Every datagram flow has a row in the engine's own memory (opened by
//! [`Shared::attach_flow`](super::shared::Shared::attach_flow)), which the wrapper stamps
//! whichever observer the engine reads: if the eBPF source fails at run time, the engine
//! reads those rows instead and the flows keep their stamps.

use std::net::SocketAddr;

/// What sees a UDP flow's datagrams (see the [`Engine::watch`](crate::Engine::watch) docs and
/// the README's UDP section).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Observer {
    /// lull's eBPF programs, for a connected socket: every datagram in or out is seen, however
    /// the application sends and receives it.
    Ebpf,
    /// The handle's own send and receive calls: the peers of an unconnected socket, and any
    /// UDP flow when eBPF is unavailable.
    Wrapper,
}

impl Observer {
    /// A short lowercase name, as used in reports and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Wrapper => "wrapper",
        }
    }
}

impl std::fmt::Display for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The kind of a watched flow, as the engine thread needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum FlowKind {
    /// A TCP connection (or a simulated one).
    Stream,
    /// A UDP flow.
    Datagram {
        /// Who stamps its activity.
        observer: Observer,
        /// One peer of an unconnected socket: probes go out with `sendmsg` to its address.
        addressed: bool,
    },
}

impl FlowKind {
    pub(crate) fn is_datagram(self) -> bool {
        matches!(self, Self::Datagram { .. })
    }

    pub(crate) fn is_addressed(self) -> bool {
        matches!(
            self,
            Self::Datagram {
                addressed: true,
                ..
            }
        )
    }

    /// The observer of a datagram flow; `None` for a stream.
    pub(crate) fn observer(self) -> Option<Observer> {
        match self {
            Self::Stream => None,
            Self::Datagram { observer, .. } => Some(observer),
        }
    }
}

/// What a watch asks the engine to register.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FlowRequest {
    /// A TCP connection, or a simulated one (no fd).
    Stream,
    /// A connected UDP socket: eBPF observes it if the source can.
    Connected,
    /// One peer of an unconnected UDP socket.
    Addressed(SocketAddr),
}

/// `addr` as flows are keyed: an IPv4-mapped IPv6 address (what a dual-stack socket reports
/// for an IPv4 peer) is its IPv4 address, so a peer is the same flow however it is written.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_are_their_ipv4_selves() {
        let v4: SocketAddr = "10.1.2.3:4500".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:4500".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:4500".parse().unwrap();
        assert_eq!(canonical(mapped), v4);
        assert_eq!(canonical(v4), v4);
        assert_eq!(canonical(v6), v6);
    }
}
