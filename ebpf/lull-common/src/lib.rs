//! The types that lull's eBPF program and its userspace engine agree on.
//!
//! Everything here is `#[repr(C)]` and has no pointers: the kernel writes these bytes and
//! userspace reads them through a shared mapping, so the layout *is* the interface. Any change
//! here is a change to both sides at once.
#![no_std]

pub mod host;

/// Name of the `BPF_MAP_TYPE_SK_STORAGE` map that links a socket to its [`SlotRef`].
pub const SLOTS_MAP: &str = "LULL_SLOTS";
/// Name of the `BPF_F_MMAPABLE` array of [`ActivityEntry`], indexed by slot.
pub const ACTIVITY_MAP: &str = "LULL_ACTIVITY";
/// Name of the `cgroup_skb/ingress` program.
pub const INGRESS_PROG: &str = "lull_ingress";
/// Name of the `cgroup_skb/egress` program.
pub const EGRESS_PROG: &str = "lull_egress";
/// Name of the `sock_ops` program.
pub const SOCK_OPS_PROG: &str = "lull_sock_ops";

/// `max_entries` of [`ACTIVITY_MAP`] in the object file. Userspace overrides it at load time
/// with the engine's capacity, so this only has to be a valid placeholder.
pub const DEFAULT_TABLE_ENTRIES: u32 = 1024;

/// The value userspace stores in [`SLOTS_MAP`] for a registered socket.
///
/// `generation` must equal the generation in [`ActivityEntry::state`] of the slot for the kernel to write there. That is
/// what keeps a socket that was unregistered (or whose storage outlived its slot) from
/// stamping a slot that has since been handed to another socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotRef {
    /// Index into [`ACTIVITY_MAP`].
    pub slot: u32,
    /// Generation of the registration. Never 0 for a live registration.
    pub generation: u32,
}

/// One row of the activity table: what the kernel saw of one registered socket.
///
/// Stamps are `bpf_ktime_get_ns()`, which is `CLOCK_MONOTONIC`. Only segments that carry
/// payload move a stamp: a pure ACK is not a sign of life from the peer's *application*, and a
/// retransmission is not new activity from ours.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActivityEntry {
    /// Last time a segment with payload was received.
    pub last_rx_ns: u64,
    /// Last time a segment with new payload was sent (retransmissions excluded).
    pub last_tx_ns: u64,
    /// The registration's generation in the high 32 bits (0 while the slot is free), and
    /// [`flags`] in the low 32 bits. One word, because the BPF target only has 64-bit atomics
    /// and the kernel sets flags with an atomic OR while userspace may reset the row.
    pub state: u64,
}

impl ActivityEntry {
    /// Packs a generation and flags into a [`ActivityEntry::state`] word.
    #[inline(always)]
    pub const fn pack_state(generation: u32, flags: u32) -> u64 {
        ((generation as u64) << 32) | flags as u64
    }

    /// The generation part of a state word.
    #[inline(always)]
    pub const fn generation_of(state: u64) -> u32 {
        (state >> 32) as u32
    }

    /// The [`flags`] part of a state word.
    #[inline(always)]
    pub const fn flags_of(state: u64) -> u32 {
        state as u32
    }
}

/// Bits of the flags half of [`ActivityEntry::state`].
pub mod flags {
    /// The peer sent a FIN.
    pub const PEER_FIN: u32 = 1 << 0;
    /// The peer sent a RST.
    pub const PEER_RST: u32 = 1 << 1;
    /// This side sent a FIN.
    pub const LOCAL_FIN: u32 = 1 << 2;
    /// This side sent a RST.
    pub const LOCAL_RST: u32 = 1 << 3;
    /// The socket moved to `TCP_CLOSE` (seen by `sock_ops`, which covers timeouts that send
    /// nothing on the wire).
    pub const STATE_CLOSE: u32 = 1 << 4;
    /// This side retransmitted since the peer last sent payload: the path may be black-holed.
    pub const RETRANSMITTING: u32 = 1 << 5;

    /// Any of the bits that mean the connection is over, or half over.
    pub const CLOSED_MASK: u32 = PEER_FIN | PEER_RST | LOCAL_FIN | LOCAL_RST | STATE_CLOSE;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both types are #[repr(C)], made of plain integers with no padding, so every bit
    // pattern is valid and they can be copied to and from the kernel byte for byte.
    unsafe impl aya::Pod for super::SlotRef {}
    // SAFETY: as above; three u64 fields, no padding.
    unsafe impl aya::Pod for super::ActivityEntry {}
}

const _: () = assert!(core::mem::size_of::<ActivityEntry>() == 24);
const _: () = assert!(core::mem::size_of::<SlotRef>() == 8);
