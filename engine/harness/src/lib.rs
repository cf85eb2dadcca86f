//! What lull's binary, benchmarks and tests share, so that each exists once:
//!
//! - [`process`]: readings of this process (resident memory, open fds) and its fd limit;
//! - [`socket`]: the socket shortcuts every loopback harness needs (a deep-backlog listener,
//!   an abortive close);
//! - [`alloc`]: a global allocator that counts live heap bytes;
//! - [`peer`]: how a loopback peer with a known behaviour treats one connection, and
//!   [`PeerServer`], such a peer on its own thread;
//! - [`udp`]: [`UdpPeer`], a UDP peer with a known behaviour that logs every datagram.
//!
//! The library (`lull`) does not depend on this crate: nothing here is for embedding.
#![warn(missing_docs)]

pub mod alloc;
pub mod peer;
pub mod process;
pub mod socket;
pub mod udp;

pub use peer::{Behaviour, ConnLog, HangTrigger, PeerServer};
pub use udp::{UdpBehaviour, UdpPeer};
