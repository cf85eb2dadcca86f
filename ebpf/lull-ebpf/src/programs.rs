use core::{
    intrinsics::{AtomicOrdering, atomic_or},
    ptr,
};

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_MMAPABLE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        bpf_sock,
    },
    btf_maps::{Array, SkStorage},
    helpers::generated::{
        bpf_jiffies64, bpf_ktime_get_ns, bpf_sk_storage_get, bpf_skc_to_tcp_sock, bpf_tcp_sock,
    },
    macros::{btf_map, cgroup_skb, sock_ops},
    programs::{SkBuffContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use lull_common::{
    ActivityEntry, DEFAULT_TABLE_ENTRIES, NOTICE_WORDS_PER_EXTENT, SlotRef, flags, notice_words,
};

/// Returned by `cgroup_skb` programs to let the packet through. lull only observes.
pub(crate) const PASS: i32 = 1;
/// Returned by `sock_ops` programs: the callback's own result does not matter to lull.
const SOCK_OPS_OK: u32 = 1;

/// TCP states (`include/net/tcp_states.h`) the close classification needs.
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_SYN_RECV: u32 = 3;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const ECONNRESET: i32 = 104;
const ETIMEDOUT: i32 = 110;

#[btf_map]
static LULL_SLOTS: SkStorage<SlotRef> = SkStorage::new();

#[btf_map]
static LULL_ACTIVITY: Array<
    ActivityEntry,
    { DEFAULT_TABLE_ENTRIES as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

/// Close notices: a bit per row, and a summary bit per 64 rows, so that an engine finds the
/// connections that closed without a system call and without scanning its rows (see
/// `lull_common::notice_words`). Userspace sizes it to match the table at load time.
#[btf_map]
static LULL_NOTICES: Array<
    u64,
    {
        (DEFAULT_TABLE_ENTRIES / lull_common::EXTENT_ROWS + 1) as usize
            * NOTICE_WORDS_PER_EXTENT as usize
    },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

/// Byte offset of `struct sock::sk_err` in the running kernel, from its BTF (0: unknown).
/// In `.rodata`, which the loader freezes, so the verifier treats it as a constant.
#[unsafe(no_mangle)]
static LULL_SK_ERR_OFFSET: u32 = 0;

/// Byte offset of `struct inet_connection_sock::icsk_probes_out` (0: unknown).
#[unsafe(no_mangle)]
static LULL_PROBES_OUT_OFFSET: u32 = 0;

#[cgroup_skb]
pub fn lull_ingress(ctx: SkBuffContext) -> i32 {
    match try_lull_ingress(&ctx) {
        Ok(()) | Err(()) => PASS,
    }
}

#[sock_ops]
pub fn lull_sock_ops(ctx: SockOpsContext) -> u32 {
    match try_lull_sock_ops(&ctx) {
        Ok(()) | Err(()) => SOCK_OPS_OK,
    }
}

/// The per-packet path. For a socket lull does not watch it is one storage lookup. For a
/// watched one it is that lookup and a jiffies compare, unless a stamp is stale: then the
/// header is read in place (no helper call) and the row written once for this jiffy.
///
/// Everything the engine needs of a TCP socket comes in on this side: payload from the peer,
/// the peer's acknowledgements of our payload (tx progress, which retransmissions never make),
/// and the peer's FIN and RST. Our own FIN and RST, and timeouts, come from `sock_ops`. A
/// registered UDP socket's datagrams are all payload: rx is stamped here without a header
/// read, tx by the egress program (see `datagram`).
fn try_lull_ingress(ctx: &SkBuffContext) -> Result<(), ()> {
    let skb = ctx.skb.skb;
    // SAFETY: reading a context field; the verifier rewrites it to a checked load.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Ok(());
    }
    let Some(st) = slot_ref(sk.cast()) else {
        return Ok(());
    };
    // SAFETY: the helper takes no arguments; the verifier inlines it as a load of jiffies.
    let now_j = unsafe { bpf_jiffies64() };
    // SAFETY: `st` is this socket's storage, valid for the whole program run.
    let (rx_j, tx_j) = unsafe { ((*st).rx_jiffies, (*st).tx_jiffies) };
    if rx_j == now_j && tx_j == now_j {
        return Ok(());
    }
    // Only on the stale path, once per jiffy: a TCP socket's packets in between never load it.
    // SAFETY: as above.
    if unsafe { (*st).kind } == SlotRef::DATAGRAM {
        // Every datagram is payload: no header to read.
        if rx_j != now_j {
            stamp(st, now_j, Direction::Rx);
        }
        return Ok(());
    }
    let seg = Segment::parse(skb).ok_or(())?;
    let mut bits = 0;
    if seg.flags & TCP_RST != 0 {
        bits |= flags::PEER_RST;
    }
    if seg.flags & TCP_FIN != 0 {
        bits |= flags::PEER_FIN;
    }
    let stamp_rx = seg.payload > 0 && rx_j != now_j;
    let stamp_tx = tx_j != now_j && seg.flags & TCP_ACK != 0 && ack_moved(sk, st, seg.ack);
    if bits == 0 && !stamp_rx && !stamp_tx {
        return Ok(());
    }
    let Some((entry, state, row)) = registered_entry(st) else {
        return Ok(());
    };
    if stamp_rx || stamp_tx {
        // SAFETY: the helper takes no arguments and cannot fail.
        let now_ns = unsafe { bpf_ktime_get_ns() };
        // SAFETY: `entry` points into the array map's value area, valid for the whole program
        // run; the fields are 8-byte aligned, so each store is one instruction, never torn.
        // `st` as above.
        unsafe {
            if stamp_rx {
                ptr::addr_of_mut!((*entry).last_rx_ns).write_volatile(now_ns);
                (*st).rx_jiffies = now_j;
            }
            if stamp_tx {
                ptr::addr_of_mut!((*entry).last_tx_ns).write_volatile(now_ns);
                (*st).tx_jiffies = now_j;
            }
        }
    }
    set_flags(entry, state, row, bits);
    Ok(())
}

/// Whether `ack` acknowledges data of ours that the last one seen did not, remembering it.
///
/// The first ACK after registration is compared with the socket's own `snd_una` as it stands
/// before this packet is processed (the ACK level TCP has seen): only then is a helper call
/// made. After that the socket's storage remembers the last ACK, so a steady stream of
/// duplicate ACKs and window updates costs a compare.
#[inline(always)]
fn ack_moved(sk: *mut bpf_sock, st: *mut SlotRef, ack: u32) -> bool {
    // SAFETY: `st` is this socket's storage, valid for the whole program run.
    let mut last = unsafe { (*st).acked };
    if last == 0 {
        // SAFETY: `sk` is the packet's non-null socket; the helper returns NULL unless it is
        // a full TCP socket.
        let tp = unsafe { bpf_tcp_sock(sk) };
        if tp.is_null() {
            return false;
        }
        // SAFETY: non-null, as checked; the verifier rewrites the load to the socket's field.
        last = unsafe { (*tp).snd_una };
    }
    if ack == last {
        return false;
    }
    // SAFETY: as above; only this socket's packets write its storage.
    unsafe { (*st).acked = ack };
    // Sequence space wraps: "after" is a positive signed distance.
    (ack.wrapping_sub(last) as i32) > 0
}

/// State changes of watched sockets: which side closed, and how.
fn try_lull_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
    match ctx.op() {
        // Every socket of the cgroup asks for state callbacks: they fire a few times in a
        // connection's life, never per packet, and this is the only moment to ask. Sockets
        // established before the programs were attached get their closes from the packets
        // the ingress program sees (the peer's FIN and RST).
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => ctx
            .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
            .map_err(|_| ()),
        BPF_SOCK_OPS_STATE_CB => {
            let (old, new) = (ctx.arg(0), ctx.arg(1));
            // SAFETY: reading a context field; the verifier rewrites it to a checked load.
            let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
            if sk.is_null() {
                return Ok(());
            }
            let Some(st) = slot_ref(sk.cast()) else {
                return Ok(());
            };
            let Some((entry, state, row)) = registered_entry(st) else {
                return Ok(());
            };
            let bits = match new {
                TCP_CLOSE_WAIT => flags::PEER_FIN,
                TCP_FIN_WAIT1 => flags::LOCAL_FIN,
                TCP_LAST_ACK => flags::PEER_FIN | flags::LOCAL_FIN,
                TCP_CLOSE => flags::STATE_CLOSE | close_cause(sk.cast(), old),
                _ => 0,
            };
            set_flags(entry, state, row, bits);
            if new == TCP_CLOSE {
                // SAFETY: `st` is this socket's storage, valid for the whole program run.
                let slot = unsafe { (*st).slot };
                debug!(
                    ctx,
                    "slot {} closed from state {}, flags {:x}", slot, old, bits
                );
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Why a socket reached `TCP_CLOSE`, from `sk_err` (and, for a timeout, whether keepalive
/// probes were out), as flag bits. A kernel without readable BTF offsets gets no cause.
#[inline(always)]
fn close_cause(sk: *mut core::ffi::c_void, old: u32) -> u32 {
    let sk_err_at = global(&LULL_SK_ERR_OFFSET);
    if sk_err_at == 0 {
        return 0;
    }
    // SAFETY: `sk` is the context's non-null socket; the helper returns NULL unless it is a
    // full TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) }.cast::<u8>();
    if tp.is_null() {
        return 0;
    }
    // SAFETY: `tp` is a BTF pointer to this socket's `tcp_sock`, which begins with `struct
    // sock`; the offset is a load-time constant from the kernel's own BTF, so the verifier
    // checks this load against the field it names.
    let sk_err = unsafe { ptr::read_volatile(tp.add(sk_err_at as usize).cast::<i32>()) };
    match sk_err {
        ECONNRESET => flags::PEER_RST,
        ETIMEDOUT => {
            let probes_at = global(&LULL_PROBES_OUT_OFFSET);
            // SAFETY: as above, for `inet_connection_sock::icsk_probes_out`, a u8.
            let probes =
                probes_at != 0 && unsafe { ptr::read_volatile(tp.add(probes_at as usize)) } > 0;
            flags::TIMED_OUT | if probes { flags::KEEPALIVE_EXPIRED } else { 0 }
        }
        // No error, straight from an open state: this side aborted (a close with SO_LINGER 0,
        // or a disconnect), which sends a RST. From a closing state it is the orderly end.
        0 if matches!(
            old,
            TCP_ESTABLISHED | TCP_CLOSE_WAIT | TCP_SYN_SENT | TCP_SYN_RECV
        ) =>
        {
            flags::LOCAL_RST
        }
        _ => 0,
    }
}

/// The socket's [`SlotRef`], if userspace registered it.
#[inline(always)]
pub(crate) fn slot_ref(sk: *mut core::ffi::c_void) -> Option<*mut SlotRef> {
    // SAFETY: the map pointer is the BTF map definition the loader relocates; `sk` is a
    // non-null socket from the context. The helper returns NULL when the socket is not a full
    // socket or has no storage in this map.
    let st = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&LULL_SLOTS).cast_mut().cast(),
            sk,
            ptr::null_mut(),
            0,
        )
    }
    .cast::<SlotRef>();
    (!st.is_null()).then_some(st)
}

/// The table row of a registered socket, with its state word as loaded once, or `None` if the
/// slot has since been freed or handed to another registration (its generation says so).
#[inline(always)]
pub(crate) fn registered_entry(st: *mut SlotRef) -> Option<(*mut ActivityEntry, u64, u32)> {
    // SAFETY: `st` is a socket's storage, valid for the whole program run.
    let SlotRef {
        slot, generation, ..
    } = unsafe { *st };
    let entry = LULL_ACTIVITY.get_ptr_mut(slot)?;
    // Volatile, because userspace writes the word through its own mapping; the BPF backend
    // has no atomic-load instruction below `--cpu=v4`, and an aligned 8-byte load is one
    // instruction, so it cannot tear. Loaded once: the generation check and the flag check
    // must judge the same value.
    // SAFETY: `entry` is a valid array value pointer for the whole program run.
    let state = unsafe { ptr::addr_of!((*entry).state).read_volatile() };
    (ActivityEntry::generation_of(state) == generation).then_some((entry, state, slot))
}

/// Sets `bits` in row `row`'s flags with one atomic OR, unless `state` (the word as loaded by
/// [`registered_entry`]) already has them all: an OR dirties the cache line the engine reads,
/// and rx of one socket may run on two CPUs at once. A close bit that is new also posts a
/// notice, after the flags, so the engine that finds the notice finds the flags.
#[inline(always)]
fn set_flags(entry: *mut ActivityEntry, state: u64, row: u32, bits: u32) {
    let new = bits & !ActivityEntry::flags_of(state);
    if new == 0 {
        return;
    }
    // The BPF target does not advertise read-modify-write atomics to Rust (its baseline CPU
    // lacks them), so `AtomicU64::fetch_or` does not exist; the intrinsic lowers to
    // BPF_ATOMIC|BPF_OR, which `--cpu=v3` enables.
    // SAFETY: `state` is a valid, aligned u64 for the whole program run.
    unsafe {
        atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(
            ptr::addr_of_mut!((*entry).state),
            u64::from(bits),
        );
    }
    if new & flags::CLOSED_MASK != 0 {
        post_notice(row);
    }
}

/// Tells the engine that owns `row` that its connection closed.
#[inline(always)]
fn post_notice(row: u32) {
    let (summary, leaf, leaf_bit, row_bit) = notice_words(row);
    for (index, bit) in [(leaf, row_bit), (summary, leaf_bit)] {
        if let Some(word) = LULL_NOTICES.get_ptr_mut(index) {
            // SAFETY: a valid, aligned u64 of the array's value area for the whole run; the
            // OR is atomic because another CPU may post a notice in the same word.
            unsafe {
                atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(word, 1u64 << bit);
            }
        }
    }
}

#[inline(always)]
fn global(value: &'static u32) -> u32 {
    // SAFETY: a read of a global the loader set before load; volatile so that the compiler
    // does not fold the compile-time 0 into the code.
    unsafe { ptr::read_volatile(value) }
}

/// What the ingress program needs from a TCP segment, read in place. `cgroup_skb` sees the
/// packet from its network header, and only registered TCP sockets get here (datagram sockets
/// return before the parse).
pub(crate) struct Segment {
    pub(crate) ack: u32,
    pub(crate) flags: u8,
    pub(crate) payload: u32,
}

impl Segment {
    #[inline(always)]
    pub(crate) fn parse(skb: *mut __sk_buff) -> Option<Self> {
        // SAFETY: context fields; the verifier rewrites them to the packet's bounds, and every
        // read below is checked against `end` first, as the verifier demands.
        let (data, end, len) =
            unsafe { ((*skb).data as usize, (*skb).data_end as usize, (*skb).len) };
        // Every bound is `start + constant > end`: the verifier tracks packet pointers through
        // such adds, while a bare `data >= end` (what `data + 1 > end` compiles to) it cannot.
        if data + 20 > end {
            return None;
        }
        // SAFETY: in bounds, as checked.
        let first = unsafe { *(data as *const u8) };
        let ip_len = match first >> 4 {
            4 => usize::from(first & 0x0f) * 4,
            // Extension headers are rare on TCP; such packets are ignored, not misread.
            // SAFETY: in bounds, as checked.
            6 if data + 40 <= end && unsafe { *((data + 6) as *const u8) } == 6 => 40,
            _ => return None,
        };
        let tcp = data + ip_len;
        if tcp + 20 > end {
            return None;
        }
        // SAFETY: the 20-byte TCP header is in bounds, as checked.
        let (doff, flags, ack) = unsafe {
            (
                u32::from(*((tcp + 12) as *const u8) >> 4) * 4,
                *((tcp + 13) as *const u8),
                u32::from_be(ptr::read_unaligned((tcp + 8) as *const u32)),
            )
        };
        Some(Self {
            ack,
            flags,
            payload: len.saturating_sub(ip_len as u32 + doff),
        })
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Which stamp a datagram moves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Rx,
    Tx,
}

/// Writes the row's stamp for `direction` and remembers the jiffy in the socket's storage,
/// unless the registration is gone (a stale generation).
#[inline(always)]
pub(crate) fn stamp(st: *mut SlotRef, now_j: u64, direction: Direction) {
    let Some((entry, _, _)) = registered_entry(st) else {
        return;
    };
    // SAFETY: the helper takes no arguments and cannot fail.
    let now_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `entry` points into the array map's value area, valid for the whole program run;
    // the fields are 8-byte aligned, so each store is one instruction, never torn. `st` is this
    // socket's storage, valid for the whole program run.
    unsafe {
        if direction == Direction::Rx {
            ptr::addr_of_mut!((*entry).last_rx_ns).write_volatile(now_ns);
            (*st).rx_jiffies = now_j;
        } else {
            ptr::addr_of_mut!((*entry).last_tx_ns).write_volatile(now_ns);
            (*st).tx_jiffies = now_j;
        }
    }
}
