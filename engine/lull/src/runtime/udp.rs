//! The UDP handles: datagram calls on a watched connected socket that stamp its flow, and
//! [`PeerSocket`] and [`WatchedPeer`] for the peers of an unconnected socket.
//!
//! See `flow` for the two observers. Everything here is the wrapper's side: a send or receive
//! through these calls stamps the flow's row in this process's memory (one clock read and one
//! store). With the eBPF observer the kernel sees the same datagrams anyway; the stamps keep
//! the flow's activity known if the eBPF source fails at run time.

use std::{
    collections::HashMap,
    io,
    net::{SocketAddr, UdpSocket},
    ops::Deref,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::{Arc, PoisonError, RwLock},
};

use crate::{
    activity::Slot,
    clock::monotonic_ns,
    policy::Policy,
    socket::{SocketKind, check_socket},
};

use super::{
    ConnId, ConnStats, Engine, Observer, WatchError, Watched,
    flow::{FlowRequest, canonical},
    shared::{Shared, watched_sockets},
    watched::Registration,
};

impl Engine {
    /// Starts watching `peer` on `socket`, an unconnected UDP socket shared by several peers:
    /// a flow with its own timer and activity. Keep-warm datagrams and liveness probes go to
    /// `peer` with `sendmsg`. Its activity is what goes through the socket's own
    /// [`send_to`](PeerSocket::send_to) and [`recv_from`](PeerSocket::recv_from), or the
    /// flow's [`send`](WatchedPeer::send) ([`Observer::Wrapper`]): the kernel programs keep
    /// their stamps per socket, not per peer.
    ///
    /// The handle keeps the socket open; drop it to stop watching the peer.
    pub fn watch_peer(
        &self,
        socket: &PeerSocket,
        peer: SocketAddr,
        policy: &Policy,
    ) -> Result<WatchedPeer, WatchError> {
        policy.validate_datagram(true)?;
        socket.watch(peer, |fd, peer| {
            self.register(
                Some(fd),
                policy,
                None,
                monotonic_ns(),
                FlowRequest::Addressed(peer),
            )
        })
    }

    /// Who will see the datagrams of a connected UDP socket watched from now on, getting the
    /// source ready for them first: with the eBPF source, this attaches the egress program to
    /// the engine's cgroup, which otherwise happens at the first UDP flow. Call it before
    /// dropping privileges if UDP flows will be watched after.
    pub fn observe_datagrams(&self) -> Observer {
        if self.shared.source().observe_datagrams() {
            Observer::Ebpf
        } else {
            Observer::Wrapper
        }
    }
}

/// Datagram calls that stamp the flow: use these rather than the socket's own (which `Deref`
/// also reaches) where eBPF may be unavailable, so that [`Observer::Wrapper`] sees the
/// traffic. With [`Observer::Ebpf`] either way is seen.
impl Watched<UdpSocket> {
    /// `send(2)` to the connected peer; the datagram postpones keep-warm datagrams.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        let sent = self.deref().send(buf)?;
        self.registration().stamp(true);
        Ok(sent)
    }

    /// `recv(2)` from the connected peer; the datagram answers liveness probes.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let got = self.deref().recv(buf)?;
        self.registration().stamp(false);
        Ok(got)
    }
}

/// For a UDP flow whose application sends and receives through a socket type of its own (an
/// async runtime's, say), rather than the `Watched<UdpSocket>` calls: tell the engine, so that
/// [`Observer::Wrapper`] sees the traffic. Nothing happens for a TCP connection.
impl<T: AsFd> Watched<T> {
    /// A datagram went out on this flow: it postpones keep-warm datagrams.
    pub fn note_datagram_sent(&self) {
        self.registration().stamp(true);
    }

    /// A datagram came in on this flow: it answers liveness probes.
    pub fn note_datagram_received(&self) {
        self.registration().stamp(false);
    }
}

/// A watched flow's row, as its socket's calls stamp it.
struct FlowStamp {
    shared: Arc<Shared>,
    slot: Slot,
}

struct PeerInner {
    socket: UdpSocket,
    inode: u64,
    /// The watched peers, by canonical address.
    flows: RwLock<HashMap<SocketAddr, FlowStamp>>,
}

impl Drop for PeerInner {
    fn drop(&mut self) {
        watched_sockets().remove(&self.inode);
    }
}

/// An unconnected UDP socket whose peers are watched one by one, each a flow of its own (with
/// [`Engine::watch_peer`]). Cheap to clone: clones share the socket.
///
/// Its [`send_to`](PeerSocket::send_to) and [`recv_from`](PeerSocket::recv_from) stamp the
/// flow of the address they send to or receive from, if it is watched; the socket's own calls
/// (reached through `Deref`) are not seen. A [`WatchedPeer`] keeps the socket open.
#[derive(Clone)]
pub struct PeerSocket {
    inner: Arc<PeerInner>,
}

impl PeerSocket {
    /// Takes `socket`, which must be a UDP socket that is not connected (and not watched by
    /// any engine in this process).
    pub fn new(socket: UdpSocket) -> Result<Self, WatchError> {
        let fd = socket.as_raw_fd();
        let identity = match check_socket(socket.as_fd()) {
            Ok(identity) => identity,
            Err(WatchError::Listening(_) | WatchError::NotConnected { .. }) => {
                return Err(WatchError::NotPeerSocket {
                    fd,
                    what: "a TCP socket",
                });
            }
            Err(err) => return Err(err),
        };
        let what = match identity.kind {
            SocketKind::UnconnectedDatagram => None,
            SocketKind::ConnectedDatagram => Some("a connected UDP socket"),
            SocketKind::Stream => Some("a TCP socket"),
        };
        if let Some(what) = what {
            return Err(WatchError::NotPeerSocket { fd, what });
        }
        if !watched_sockets().insert(identity.inode) {
            return Err(WatchError::AlreadyWatched(fd));
        }
        Ok(Self {
            inner: Arc::new(PeerInner {
                socket,
                inode: identity.inode,
                flows: RwLock::new(HashMap::new()),
            }),
        })
    }

    /// The socket.
    pub fn socket(&self) -> &UdpSocket {
        &self.inner.socket
    }

    /// `sendto(2)`; a datagram to a watched peer postpones that flow's keep-warm datagrams.
    pub fn send_to(&self, buf: &[u8], peer: SocketAddr) -> io::Result<usize> {
        let sent = self.inner.socket.send_to(buf, peer)?;
        self.stamp(peer, true);
        Ok(sent)
    }

    /// `recvfrom(2)`; a datagram from a watched peer answers that flow's liveness probes.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (got, from) = self.inner.socket.recv_from(buf)?;
        self.stamp(from, false);
        Ok((got, from))
    }

    /// How many of its peers are watched now.
    pub fn watched_peers(&self) -> usize {
        self.flows().len()
    }

    fn flows(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SocketAddr, FlowStamp>> {
        self.inner
            .flows
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn stamp(&self, peer: SocketAddr, tx: bool) {
        if let Some(flow) = self.flows().get(&canonical(peer)) {
            flow.shared.stamp_datagram(flow.slot, tx);
        }
    }

    /// Registers `peer` with `register` (under the lock, so that one peer is one flow) and
    /// returns its handle.
    fn watch(
        &self,
        peer: SocketAddr,
        register: impl FnOnce(BorrowedFd<'_>, SocketAddr) -> Result<Registration, WatchError>,
    ) -> Result<WatchedPeer, WatchError> {
        let peer = canonical(peer);
        let mut flows = self
            .inner
            .flows
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if flows.contains_key(&peer) {
            return Err(WatchError::PeerAlreadyWatched(peer));
        }
        let registration = register(self.inner.socket.as_fd(), peer)?;
        flows.insert(
            peer,
            FlowStamp {
                shared: registration.shared.clone(),
                slot: registration.slot,
            },
        );
        drop(flows);
        Ok(WatchedPeer {
            socket: self.clone(),
            peer,
            registration,
        })
    }
}

impl Deref for PeerSocket {
    type Target = UdpSocket;

    fn deref(&self) -> &UdpSocket {
        &self.inner.socket
    }
}

impl AsFd for PeerSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.socket.as_fd()
    }
}

impl std::fmt::Debug for PeerSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSocket")
            .field("socket", &self.inner.socket)
            .field("watched_peers", &self.watched_peers())
            .finish()
    }
}

/// One watched peer of a [`PeerSocket`]. Dropping it stops the watch: after `drop` returns,
/// the engine sends nothing more to the peer.
pub struct WatchedPeer {
    socket: PeerSocket,
    peer: SocketAddr,
    registration: Registration,
}

impl WatchedPeer {
    /// The flow's id, as events carry it.
    pub fn id(&self) -> ConnId {
        self.registration.id()
    }

    /// Probe statistics of this flow.
    pub fn stats(&self) -> ConnStats {
        self.registration.stats()
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The socket.
    pub fn socket(&self) -> &PeerSocket {
        &self.socket
    }

    /// Who sees the flow's datagrams: always the wrapper, since the kernel's stamps are per
    /// socket and this socket has many peers.
    pub fn observer(&self) -> Observer {
        self.registration
            .flow
            .observer()
            .unwrap_or(Observer::Wrapper)
    }

    /// Switches this flow to another policy. The engine re-evaluates it at once.
    pub fn set_policy(&self, policy: &Policy) -> Result<(), WatchError> {
        self.registration.set_policy(policy)
    }

    /// Sends `buf` to the peer (`sendto(2)`); it postpones keep-warm datagrams.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        let sent = self.socket.inner.socket.send_to(buf, self.peer)?;
        self.registration.stamp(true);
        Ok(sent)
    }

    /// Tells the engine a datagram from the peer arrived, for an application that reads the
    /// socket itself (not through [`PeerSocket::recv_from`]) and dispatches by address.
    pub fn note_datagram_received(&self) {
        self.registration.stamp(false);
    }

    /// Tells the engine a datagram went to the peer, for an application that sends through
    /// the socket itself (not [`WatchedPeer::send`] or [`PeerSocket::send_to`]).
    pub fn note_datagram_sent(&self) {
        self.registration.stamp(true);
    }
}

impl Drop for WatchedPeer {
    fn drop(&mut self) {
        // First out of the table, so that no call on the socket stamps the row once it is
        // freed (and perhaps another flow's).
        self.socket
            .inner
            .flows
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.peer);
        self.registration
            .deregister(Some(self.socket.inner.socket.as_fd()));
    }
}

impl std::fmt::Debug for WatchedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedPeer")
            .field("id", &self.id())
            .field("peer", &self.peer)
            .finish()
    }
}
