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
    ConnId, ConnStats,
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
    /// The socket is not TCP (e.g. UDP or a Unix socket); lull keeps TCP connections alive.
    #[error("fd {fd} is a {kind} socket; lull watches TCP connections only")]
    NotTcp {
        /// The fd.
        fd: i32,
        /// What it is instead.
        kind: &'static str,
    },
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
        self.shared.source().detach(self.slot, fd);
        if let Some(inode) = self.inode {
            watched_sockets().remove(&inode);
        }
        let _ = self
            .shared
            .commands
            .send(Command::Unwatch { slot: self.slot });
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
        policy.validate()?;
        let id = self
            .shared
            .policy_id(policy)
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
