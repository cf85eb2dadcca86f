//! Where the engine learns when a connection last carried traffic.
//!
//! Three sources stand behind one trait, [`ActivitySource`]:
//! - [`ActivityTable`]: the eBPF program's table, mapped into this process. Reading a
//!   connection's activity is three memory loads.
//! - [`TcpInfoSource`]: one `getsockopt(TCP_INFO)` per read. The fallback when the process may
//!   not load BPF programs or the build has no BPF object.
//! - [`SimulatedSource`]: the table's exact memory layout in ordinary memory, written by a
//!   workload generator. It lets benchmarks run the real engine at millions of connections.

mod cgroup;
mod error;
mod extents;
mod host_users;
pub mod kernel_btf;
mod link_health;
pub(crate) mod lock_file;
mod mapping;
mod notices;
mod pinned;
mod rows;
mod sim;
mod slots;
mod table;
mod tcp_info;

use std::os::fd::BorrowedFd;

pub use cgroup::{
    CgroupScope, OwnCgroup, cgroup_id, cgroup2_root, check_cgroup_dir, current_cgroup, move_self_to,
};
pub use error::ActivityError;
pub(crate) use error::chain;
pub use extents::EXTENT_ROWS;
pub use host_users::{HostUser, PIN_ROOT, PinnedBuild, pinned_builds};
pub use lull_common::flags;
pub(crate) use pinned::ensure_bpffs;
pub(crate) use rows::Rows;
pub use sim::SimulatedSource;
pub use slots::Slot;
pub(crate) use slots::{Grace, SlotAllocator, SlotState};
pub use table::{
    ActivityTable, DEFAULT_HOST_ROWS, RESOLUTION_NS as EBPF_RESOLUTION_NS, TableOptions,
    bpf_object, bpf_object_embedded,
};
pub use tcp_info::{TcpInfoSource, TcpState, tcp_info};

/// What a source knows about one connection.
///
/// Stamps are `CLOCK_MONOTONIC` nanoseconds, 0 when nothing was seen since registration. Only
/// segments carrying payload count: a pure ACK proves the peer's kernel is alive, not its
/// application.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// Last time payload was received.
    pub last_rx_ns: u64,
    /// Last time new payload was sent.
    pub last_tx_ns: u64,
    /// [`flags`] bits.
    pub flags: u32,
}

impl Activity {
    /// Whether the connection has closed, or half closed, in either direction.
    pub fn closed(&self) -> bool {
        self.flags & flags::CLOSED_MASK != 0
    }
}

/// Which source an engine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// The eBPF activity table.
    Ebpf,
    /// `getsockopt(TCP_INFO)` per read.
    TcpInfo,
    /// The simulated table used by benchmarks.
    Simulated,
}

impl SourceKind {
    /// A short lowercase name, as used in reports and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::TcpInfo => "tcp_info",
            Self::Simulated => "simulated",
        }
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A place the engine reads connection activity from.
///
/// The engine calls `attach` when a connection is watched, `read` each time its timer fires,
/// and `detach` when it is no longer watched. `fd` is the connection's live socket (the engine
/// guarantees the handle has not been dropped while a call that takes it runs), or `None` for
/// a simulated connection that has no socket.
pub trait ActivitySource: Send + Sync + 'static {
    /// Which kind of source this is.
    fn kind(&self) -> SourceKind;

    /// Starts tracking `fd` in `slot`. Sources that keep stamps start them at `baseline_ns`
    /// (the registration time), so that a connection's silence is counted from when it was
    /// watched, not from the epoch.
    fn attach(
        &self,
        fd: Option<BorrowedFd<'_>>,
        slot: Slot,
        baseline_ns: u64,
    ) -> Result<(), ActivityError>;

    /// Whether this source can observe connected UDP sockets, getting ready to if it can
    /// (the eBPF table attaches its egress program to its cgroup at the first call). `false`
    /// (the default) for a source that cannot see datagrams: `TCP_INFO` has nothing for UDP.
    fn observe_datagrams(&self) -> bool {
        false
    }

    /// Starts tracking the connected UDP socket `fd` in `slot`, stamps starting at
    /// `baseline_ns`, if [`observe_datagrams`](ActivitySource::observe_datagrams) says this
    /// source can; `Ok(false)` (the default) when it cannot, and nothing was registered. The
    /// engine then relies on the watched handle's own send and receive calls.
    fn attach_datagram(
        &self,
        _fd: BorrowedFd<'_>,
        _slot: Slot,
        _baseline_ns: u64,
    ) -> Result<bool, ActivityError> {
        Ok(false)
    }

    /// Stops tracking `slot`. `fd` is the socket if it is still open, which lets a source drop
    /// per-socket state at once rather than when the socket dies.
    fn detach(&self, slot: Slot, fd: Option<BorrowedFd<'_>>);

    /// Reads what is known of the connection in `slot`.
    fn read(&self, slot: Slot, fd: Option<BorrowedFd<'_>>) -> Result<Activity, ActivityError>;

    /// The activity this source would read from a `TCP_INFO` snapshot taken at `now_ns`, for
    /// a source whose reads *are* such snapshots; `None` (the default) for one that keeps its
    /// own stamps. The engine takes a snapshot anyway for kernel-probed connections, and reuses
    /// it through this instead of making the source take a second one.
    fn activity_from_tcp_info(&self, _info: &libc::tcp_info, _now_ns: u64) -> Option<Activity> {
        None
    }

    /// Whether the source reports the kernel's timeouts itself (the [`flags::TIMED_OUT`] bit),
    /// with a prompt [notice](ActivitySource::take_notices) of the close. When it does not,
    /// the engine asks the kernel (`TCP_INFO`) at the moments its keepalive could have given up.
    fn reports_timeouts(&self) -> bool {
        false
    }

    /// Adds to `closed` the slot indices in `indices` whose connections closed since the last
    /// call (each once), for sources that can tell without a system call. The engine calls it
    /// every turn and looks at those connections at once, rather than at their next timer.
    fn take_notices(&self, _indices: std::ops::Range<u32>, _closed: &mut Vec<u32>) {}

    /// Starts loading what `read` will need for `slot` into the cache. The engine calls it for
    /// a batch of expired timers before reading any of them, so the cache misses overlap.
    fn prefetch(&self, _slot_index: u32) {}

    /// Called when a probe to a simulated connection (one with no socket) completed, so that a
    /// simulated peer can answer it. Real sources ignore it: their peers answer on the wire.
    fn probe_sent(&self, _slot: Slot, _now_ns: u64) {}

    /// How far a stamp may be off. A probe counts as answered by payload stamped no earlier
    /// than this before the probe was sent.
    fn resolution_ns(&self) -> u64 {
        0
    }

    /// Whether a kernel program may still write a slot shortly after `detach`, so that slots
    /// must wait one RCU grace period before reuse.
    fn detach_needs_grace(&self) -> bool {
        false
    }

    /// The kernel ids of the BPF links that attach this source (for `bpftool link`), if any.
    fn link_ids(&self) -> Vec<u32> {
        Vec::new()
    }

    /// How many rows are registered now, for leak checks (it scans the table). `None` for
    /// sources without rows. Once every watch has ended, this must be 0.
    fn registered_rows(&self) -> Option<u64> {
        None
    }

    /// Takes now whatever later registrations will need and only a privileged process may
    /// take (the eBPF table leases rows of the host's table through lock files in `/run`), for
    /// a process about to give up its privileges. The default has nothing to take.
    fn reserve(&self) -> Result<(), ActivityError> {
        Ok(())
    }

    /// Housekeeping the engine runs about once a second: forward kernel log records, and
    /// report an error if the source stopped working (for example, its programs were detached
    /// by another process). After an error the engine falls back to [`TcpInfoSource`].
    fn check(&self) -> Result<(), ActivityError> {
        Ok(())
    }
}
