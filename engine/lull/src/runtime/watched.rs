//! [`Watched<T>`]: a stream the engine keeps alive, owned like tokio's `AsyncFd<T>`.

use std::{
    io,
    ops::{Deref, DerefMut},
    os::fd::{AsFd, BorrowedFd},
    sync::Arc,
};

use crate::{
    activity::{ActivityError, Slot, SlotState, TcpState},
    policy::{Policy, PolicyError},
};

use super::{
    ConnId, ConnStats, Observer,
    flow::FlowKind,
    shared::{Command, Shared, watched_sockets},
};

/// Why a stream could not be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The policy is invalid.
    #[error("invalid policy: {0}")]
    Policy(#[from] PolicyError),
    /// The fd is not open.
    #[error("fd {0} is not open")]
    ClosedFd(i32),
    /// The fd is not a socket.
    #[error("fd {0} is not a socket")]
    NotSocket(i32),
    /// The socket is neither TCP nor UDP (e.g. a Unix socket); lull keeps TCP connections and
    /// UDP flows alive.
    #[error("fd {fd} is a {kind} socket; lull watches TCP connections and UDP flows only")]
    NotTcp {
        /// The fd.
        fd: i32,
        /// What it is instead.
        kind: &'static str,
    },
    /// An unconnected UDP socket has no peer of its own to watch.
    #[error(
        "fd {0} is an unconnected UDP socket, which has no peer of its own: put it in a \
         PeerSocket and watch each peer with Engine::watch_peer"
    )]
    UnconnectedUdp(i32),
    /// A [`PeerSocket`](crate::PeerSocket) holds an unconnected UDP socket, and this is not one.
    #[error(
        "fd {fd} is {what}; a PeerSocket holds an unconnected UDP socket (watch a connected \
         one with Engine::watch)"
    )]
    NotPeerSocket {
        /// The fd.
        fd: i32,
        /// What it is instead.
        what: &'static str,
    },
    /// This peer of the socket is already watched.
    #[error("peer {0} of this socket is already watched")]
    PeerAlreadyWatched(std::net::SocketAddr),
    /// The socket is listening; watch the connections it accepts instead.
    #[error("fd {0} is a listening socket; watch the accepted connections instead")]
    Listening(i32),
    /// The socket is not (or no longer) connected.
    #[error("fd {fd} is not a connected TCP socket (state {state:?})")]
    NotConnected {
        /// The fd.
        fd: i32,
        /// Its TCP state.
        state: TcpState,
    },
    /// The socket is already watched, by this engine or another one in this process.
    #[error("the socket behind fd {0} is already watched by a lull engine")]
    AlreadyWatched(i32),
    /// Every slot of the engine is in use; it keeps serving the connections it has.
    #[error("the engine is full ({capacity} connections)")]
    Full {
        /// The engine's capacity.
        capacity: u32,
    },
    /// More distinct policies than an engine can index (65,536).
    #[error("too many distinct policies in one engine (the limit is 65536)")]
    TooManyPolicies,
    /// The activity source refused the socket.
    #[error("activity source: {0}")]
    Activity(#[from] ActivityError),
    /// A system call on the socket failed.
    #[error("{call} on fd {fd}: {source}")]
    Syscall {
        /// The call.
        call: &'static str,
        /// The fd.
        fd: i32,
        /// The error.
        source: io::Error,
    },
    /// The engine has shut down.
    #[error("the engine has shut down")]
    EngineStopped,
}

/// The engine-side identity of a watched connection; stopping the watch is `deregister`.
pub(crate) struct Registration {
    pub(crate) shared: Arc<Shared>,
    pub(crate) slot: Slot,
    pub(crate) inode: Option<u64>,
    pub(crate) flow: FlowKind,
}

impl Registration {
    /// Stops the engine from ever touching the socket again, then tells it to forget the slot.
    /// `fd` is the socket, still open (it is closed only after this returns).
    pub(crate) fn deregister(&self, fd: Option<BorrowedFd<'_>>) {
        let slots = &self.shared.slots;
        let mut spins = 0u32;
        while !slots.transition(self.slot, SlotState::Live, SlotState::Dropped) {
            match slots.state(self.slot) {
                // The engine is mid-submission on this fd: wait for it to finish. It holds
                // `Busy` for one batch, which completes within the `io_uring_enter` call.
                Some(SlotState::Busy) => {
                    spins += 1;
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
                // Released between the failed swap and this look: swap again. Leaving now
                // would leave the slot `Live`, and the engine free to write to a closed fd.
                Some(SlotState::Live) => {}
                Some(SlotState::Dropped | SlotState::Free) | None => break,
            }
        }
        self.forget(fd);
        let _ = self
            .shared
            .commands
            .send(Command::Unwatch { slot: self.slot });
    }

    /// Undoes a registration the engine thread was never told of, and frees its slot.
    pub(crate) fn abandon(&self, fd: Option<BorrowedFd<'_>>) {
        self.forget(fd);
        self.shared.slots.free(self.slot);
    }

    /// Stops every stamp of the flow: the source's (whose socket storage goes too, while `fd`
    /// is open), the handle's own, and the process-wide claim on the socket.
    fn forget(&self, fd: Option<BorrowedFd<'_>>) {
        match self.flow {
            FlowKind::Stream
            | FlowKind::Datagram {
                observer: Observer::Ebpf,
                ..
            } => self.shared.source().detach(self.slot, fd),
            FlowKind::Datagram {
                observer: Observer::Wrapper,
                ..
            } => {}
        }
        if self.flow.is_datagram() {
            self.shared.retire_datagram_row(self.slot);
        }
        if let Some(inode) = self.inode {
            watched_sockets().remove(&inode);
        }
    }

    /// Notes a datagram of this flow: sent (`tx`) or received. Nothing for a TCP connection.
    pub(crate) fn stamp(&self, tx: bool) {
        if self.flow.is_datagram() {
            self.shared.stamp_datagram(self.slot, tx);
        }
    }

    pub(crate) fn id(&self) -> ConnId {
        ConnId::from_slot(self.slot)
    }

    pub(crate) fn stats(&self) -> ConnStats {
        self.shared
            .stats_cell(self.slot)
            .map(|c| c.snapshot())
            .unwrap_or_default()
    }

    pub(crate) fn set_policy(&self, policy: &Policy) -> Result<(), WatchError> {
        match self.flow {
            FlowKind::Stream => policy.validate_stream()?,
            FlowKind::Datagram { addressed, .. } => policy.validate_datagram(addressed)?,
        }
        let id = self
            .shared
            .policy_id(policy, self.flow)
            .ok_or(WatchError::TooManyPolicies)?;
        self.shared
            .commands
            .send(Command::SetPolicy {
                slot: self.slot,
                policy: id,
            })
            .map_err(|_| WatchError::EngineStopped)
    }
}

/// A stream watched by an engine. It owns the stream and derefs to it; dropping it stops the
/// watch and then drops the stream.
///
/// After `drop` returns, the engine never writes to the stream's fd again, even if the fd
/// number is reused at once by another socket.
pub struct Watched<T: AsFd> {
    stream: Option<T>,
    registration: Registration,
}

impl<T: AsFd> Watched<T> {
    pub(crate) fn new(stream: T, registration: Registration) -> Self {
        Self {
            stream: Some(stream),
            registration,
        }
    }

    /// The connection's id, as events carry it.
    pub fn id(&self) -> ConnId {
        self.registration.id()
    }

    /// Probe statistics of this connection.
    pub fn stats(&self) -> ConnStats {
        self.registration.stats()
    }

    /// Switches this connection to another policy. The engine re-evaluates it at once.
    pub fn set_policy(&self, policy: &Policy) -> Result<(), WatchError> {
        self.registration.set_policy(policy)
    }

    /// For a UDP flow, who sees its datagrams (see [`Observer`]); `None` for a TCP
    /// connection, whose activity comes from the engine's source.
    pub fn observer(&self) -> Option<Observer> {
        self.registration.flow.observer()
    }

    pub(crate) fn registration(&self) -> &Registration {
        &self.registration
    }

    /// Stops watching and gives the stream back.
    pub fn into_inner(mut self) -> T {
        let stream = self
            .stream
            .take()
            .expect("the stream is present until drop");
        self.registration.deregister(Some(stream.as_fd()));
        // `Drop` sees no stream and does nothing more.
        stream
    }

    fn stream(&self) -> &T {
        self.stream
            .as_ref()
            .expect("the stream is present until drop")
    }
}

impl<T: AsFd> Deref for Watched<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.stream()
    }
}

impl<T: AsFd> DerefMut for Watched<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.stream
            .as_mut()
            .expect("the stream is present until drop")
    }
}

impl<T: AsFd> AsFd for Watched<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream().as_fd()
    }
}

impl<T: AsFd> Drop for Watched<T> {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            self.registration.deregister(Some(stream.as_fd()));
            drop(stream);
        }
    }
}

impl<T: AsFd + std::fmt::Debug> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("id", &self.id())
            .field("stream", &self.stream)
            .finish()
    }
}

/// A simulated connection: no socket, activity from a [`SimulatedSource`], probes to a
/// counting sink. For benchmarks and simulations of engines larger than a host can hold.
///
/// [`SimulatedSource`]: crate::activity::SimulatedSource
pub struct VirtualConn {
    registration: Registration,
}

impl VirtualConn {
    pub(crate) fn new(registration: Registration) -> Self {
        Self { registration }
    }

    /// The connection's id.
    pub fn id(&self) -> ConnId {
        self.registration.id()
    }

    /// Its slot in the activity source (what the simulator stamps).
    pub fn slot_index(&self) -> u32 {
        self.registration.slot.index
    }

    /// Probe statistics.
    pub fn stats(&self) -> ConnStats {
        self.registration.stats()
    }
}

impl Drop for VirtualConn {
    fn drop(&mut self) {
        self.registration.deregister(None);
    }
}
