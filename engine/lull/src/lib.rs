//! lull: a kernel-assisted keepalive engine for millions of mostly idle TCP connections, and
//! for UDP flows (NAT keep-warm and liveness of datagram peers).
//!
//! An eBPF program records, per watched socket, when payload last went in and out, in a table
//! this process maps into memory. Each connection has one lazy timer in a hierarchical timing
//! wheel that traffic never touches: when it fires, the engine reads the table (no system
//! call) and re-arms at `last_activity + idle` if there was traffic, or probes if there was
//! not. Probes due in one tick go out as one io_uring submission. A peer that answers none of
//! `count` probes is reported [`Event::Dead`].
//!
//! Without privileges or a built BPF object, the engine reads `TCP_INFO` instead (one system
//! call per due connection) and says so in its log.
#![warn(missing_docs)]

pub mod activity;
mod bpf_syscall;
pub mod clock;
pub mod host;
mod memory;
pub mod policy;
pub mod probe;
mod runtime;
mod socket;
pub mod wheel;

pub use policy::{ActivityMode, DatagramPolicyError, Mode, OnDead, Policy, PolicyError, Probe};
pub use probe::{Payload, PayloadError};
pub use runtime::{
    CloseReason, ConnId, ConnStats, DeadTier, Engine, EngineBuilder, EngineError, EngineGroup,
    EngineStats, Event, GroupBuilder, Observer, PeerSocket, SourceChoice, VirtualConn, WatchError,
    Watched, WatchedPeer,
};
