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
/// Name of the `BPF_F_MMAPABLE` array of close notices: per extent of [`EXTENT_ROWS`] rows,
/// [`NOTICE_WORDS_PER_EXTENT`] words (see [`notice_words`]).
pub const NOTICES_MAP: &str = "LULL_NOTICES";
/// Name of the `cgroup_skb/ingress` program: stamps received payload and acknowledged sends.
pub const INGRESS_PROG: &str = "lull_ingress";
/// Name of the `sock_ops` program: turns state changes into close flags.
pub const SOCK_OPS_PROG: &str = "lull_sock_ops";
/// Name of the `cgroup_skb/egress` program: stamps datagrams sent by registered UDP sockets.
/// Attached to a cgroup only once a UDP flow there is watched with the eBPF source, so that
/// cgroups with TCP connections alone run nothing on egress.
pub const EGRESS_PROG: &str = "lull_egress";
/// The cost ladder: `cgroup_skb/ingress` programs that each add one step of lull's per-packet
/// work (see the BPF crate's `ladder` module), cheapest first. lull never attaches them; the
/// `ebpf-overhead` benchmark does, to say what each step costs. The first does nothing: the
/// hook's own cost, the floor lull's program is compared against.
pub const LADDER_PROGS: [&str; 4] = [
    "lull_empty_ingress",
    "lull_step_lookup",
    "lull_step_parse",
    "lull_step_stamp",
];

/// Read-only global: the byte offset of `struct sock::sk_err` in this kernel (0: unknown, and
/// the program does not read it). Set by userspace from the kernel's BTF at load time.
pub const SK_ERR_OFFSET_GLOBAL: &str = "LULL_SK_ERR_OFFSET";
/// Read-only global: the byte offset of `struct inet_connection_sock::icsk_probes_out`
/// (0: unknown).
pub const PROBES_OUT_OFFSET_GLOBAL: &str = "LULL_PROBES_OUT_OFFSET";

/// Rows of the activity table leased together: one process's share of the table grows by this
/// many rows at a time, and close notices are summarised per extent.
pub const EXTENT_ROWS: u32 = 4096;
/// Words of [`NOTICES_MAP`] per extent: a summary word (bit `w` set: leaf word `w` has news),
/// then 64 leaf words (bit `b` of leaf `w`: row `64 w + b` of the extent closed).
pub const NOTICE_WORDS_PER_EXTENT: u32 = 1 + EXTENT_ROWS / 64;

/// Where the close notice of row `row` goes: (summary word index, leaf word index, bit in
/// both: the leaf word's number in the summary, the row's in the leaf).
#[inline(always)]
pub const fn notice_words(row: u32) -> (u32, u32, u32, u32) {
    let extent = row / EXTENT_ROWS;
    let within = row % EXTENT_ROWS;
    let base = extent * NOTICE_WORDS_PER_EXTENT;
    (base, base + 1 + within / 64, within / 64, within % 64)
}

/// `max_entries` of [`ACTIVITY_MAP`] in the object file. Userspace overrides it at load time
/// with the engine's capacity, so this only has to be a valid placeholder.
pub const DEFAULT_TABLE_ENTRIES: u32 = 1024;

/// The value userspace stores in [`SLOTS_MAP`] for a registered socket, and the program's
/// own per-socket bookkeeping.
///
/// `generation` must equal the generation in [`ActivityEntry::state`] of the slot for the
/// kernel to write there. That is what keeps a socket that was unregistered (or whose storage
/// outlived its slot) from stamping a slot that has since been handed to another socket.
///
/// The jiffies fields make the per-packet path cheap: a packet in the same jiffy as the last
/// stamp of both directions costs one storage lookup and one compare, and the shared row (a
/// cache line userspace reads) is written at most once per jiffy per direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotRef {
    /// Index into [`ACTIVITY_MAP`].
    pub slot: u32,
    /// Generation of the registration. Never 0 for a live registration.
    pub generation: u32,
    /// Kernel jiffies of the last rx stamp (0: none yet). Written by the program only.
    pub rx_jiffies: u64,
    /// Kernel jiffies of the last tx stamp (0: none yet). Written by the program only.
    pub tx_jiffies: u64,
    /// The last acknowledgement number the peer sent (0: none seen since registration, and the
    /// program compares the first with the socket's own `snd_una`). An ACK that moves it is
    /// the peer's kernel taking new data of ours: that is what counts as tx activity.
    /// Unused for datagram sockets.
    pub acked: u32,
    /// What the socket is: [`SlotRef::STREAM`] (TCP) or [`SlotRef::DATAGRAM`] (connected UDP).
    /// Userspace sets it at registration; it decides how the programs read a packet.
    pub kind: u32,
}

impl SlotRef {
    /// [`SlotRef::kind`] of a TCP socket: payload, ACKs, FIN and RST are read from the header.
    pub const STREAM: u32 = 0;
    /// [`SlotRef::kind`] of a connected UDP socket: every datagram is payload, received ones
    /// stamp rx on ingress and sent ones stamp tx on egress. No header is read.
    pub const DATAGRAM: u32 = 1;

    /// A fresh registration of TCP socket in `slot` at `generation`, with no stamps yet.
    pub const fn new(slot: u32, generation: u32) -> Self {
        Self::of_kind(slot, generation, Self::STREAM)
    }

    /// A fresh registration of a socket of `kind` in `slot` at `generation`.
    pub const fn of_kind(slot: u32, generation: u32, kind: u32) -> Self {
        Self {
            slot,
            generation,
            rx_jiffies: 0,
            tx_jiffies: 0,
            acked: 0,
            kind,
        }
    }
}

/// One row of the activity table: what the kernel saw of one registered socket.
///
/// Stamps are `bpf_ktime_get_ns()`, which is `CLOCK_MONOTONIC`, taken at the first packet of
/// a jiffy that moves them: a stamp may be up to one jiffy older than the last such packet.
/// Only received payload moves `last_rx_ns`: a pure ACK is not a sign of life from the peer's
/// *application*. `last_tx_ns` moves when the peer acknowledges new data of ours, so a
/// retransmission that nobody acknowledges is not activity. For a UDP socket every datagram is
/// payload: one received moves `last_rx_ns`, one sent moves `last_tx_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActivityEntry {
    /// Last time a segment with payload was received.
    pub last_rx_ns: u64,
    /// Last time the peer acknowledged new data we sent.
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
    /// The kernel gave up on the connection (`sk_err` was `ETIMEDOUT`): keepalive probes or
    /// retransmissions went unanswered, or `TCP_USER_TIMEOUT` expired.
    pub const TIMED_OUT: u32 = 1 << 5;
    /// With [`TIMED_OUT`]: keepalive probes were outstanding, so it was keepalive that gave up
    /// (not a retransmission or user timeout of unacknowledged data).
    pub const KEEPALIVE_EXPIRED: u32 = 1 << 6;

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
const _: () = assert!(core::mem::size_of::<SlotRef>() == 32);
