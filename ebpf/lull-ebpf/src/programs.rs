use core::{
    intrinsics::{AtomicOrdering, atomic_and, atomic_or},
    ptr,
};

use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock,
    },
    btf_maps::{Array, SkStorage},
    helpers::generated::{bpf_ktime_get_ns, bpf_sk_storage_get, bpf_tcp_sock},
    macros::{btf_map, cgroup_skb, sock_ops},
    programs::{SkBuffContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use lull_common::{ActivityEntry, DEFAULT_TABLE_ENTRIES, SlotRef, flags};

/// Returned by `cgroup_skb` programs to let the packet through. lull only observes.
const PASS: i32 = 1;
/// `TCP_CLOSE` from `include/net/tcp_states.h`.
const TCP_CLOSE: u32 = 7;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

#[btf_map]
static LULL_SLOTS: SkStorage<SlotRef> = SkStorage::new();

#[btf_map]
static LULL_ACTIVITY: Array<
    ActivityEntry,
    { DEFAULT_TABLE_ENTRIES as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

#[cgroup_skb]
pub fn lull_ingress(ctx: SkBuffContext) -> i32 {
    match try_lull_ingress(&ctx) {
        Ok(()) | Err(()) => PASS,
    }
}

#[cgroup_skb]
pub fn lull_egress(ctx: SkBuffContext) -> i32 {
    match try_lull_egress(&ctx) {
        Ok(()) | Err(()) => PASS,
    }
}

#[sock_ops]
pub fn lull_sock_ops(ctx: SockOpsContext) -> u32 {
    match try_lull_sock_ops(&ctx) {
        Ok(()) | Err(()) => 1,
    }
}

fn try_lull_ingress(ctx: &SkBuffContext) -> Result<(), ()> {
    let Some((_, entry)) = registered_entry(ctx)? else {
        return Ok(());
    };
    let seg = Segment::parse(ctx)?;
    if seg.tcp_flags & TCP_RST != 0 {
        set_flag(entry, flags::PEER_RST);
    }
    if seg.tcp_flags & TCP_FIN != 0 {
        set_flag(entry, flags::PEER_FIN);
    }
    if seg.payload_len > 0 {
        // SAFETY: `entry` points into the array map's value area, valid for the whole program
        // run; the field is 8-byte aligned, so the store is one instruction and never torn.
        unsafe { ptr::addr_of_mut!((*entry).last_rx_ns).write_volatile(now()) };
        clear_flag(entry, flags::RETRANSMITTING);
    }
    Ok(())
}

fn try_lull_egress(ctx: &SkBuffContext) -> Result<(), ()> {
    let Some((sk, entry)) = registered_entry(ctx)? else {
        return Ok(());
    };
    let seg = Segment::parse(ctx)?;
    if seg.tcp_flags & TCP_RST != 0 {
        set_flag(entry, flags::LOCAL_RST);
    }
    if seg.tcp_flags & TCP_FIN != 0 {
        set_flag(entry, flags::LOCAL_FIN);
    }
    if seg.payload_len == 0 {
        return Ok(());
    }
    // This hook runs before TCP advances `snd_nxt` past a new segment, so new data starts exactly
    // at `snd_nxt` and anything earlier is a retransmission: a sign of trouble, not of life.
    // SAFETY: `sk` was checked non-null by `registered_entry` (passing that same value keeps the
    // verifier's null check); `bpf_tcp_sock` returns NULL for non-TCP sockets.
    let tp = unsafe { bpf_tcp_sock(sk) };
    if !tp.is_null() {
        // SAFETY: checked non-null above; the kernel rewrites this load to the socket's field.
        let snd_nxt = unsafe { (*tp).snd_nxt };
        if (seg.seq.wrapping_sub(snd_nxt) as i32) < 0 {
            set_flag(entry, flags::RETRANSMITTING);
            return Ok(());
        }
    }
    // SAFETY: as in `try_lull_ingress`.
    unsafe { ptr::addr_of_mut!((*entry).last_tx_ns).write_volatile(now()) };
    Ok(())
}

fn try_lull_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
    match ctx.op() {
        // Only connections established after attach get here; older ones still get their
        // close seen on the wire (FIN/RST) by the cgroup_skb programs.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => ctx
            .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
            .map_err(|_| ()),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            // SAFETY: reading a context field; the verifier rewrites it to a checked load.
            let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
            if sk.is_null() {
                return Ok(());
            }
            let Some((slot, entry)) = lookup_entry(sk)? else {
                return Ok(());
            };
            set_flag(entry, flags::STATE_CLOSE);
            debug!(ctx, "slot {} closed (old state {})", slot, ctx.arg(0));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The socket that owns this packet and its table row, if that socket is registered.
///
/// This is the whole per-packet cost for an unregistered socket: one storage lookup.
#[inline(always)]
fn registered_entry(
    ctx: &SkBuffContext,
) -> Result<Option<(*mut bpf_sock, *mut ActivityEntry)>, ()> {
    let sk = skb_sock(ctx);
    if sk.is_null() {
        return Ok(None);
    }
    match lookup_entry(sk) {
        Ok(found) => Ok(found.map(|(_, entry)| (sk, entry))),
        Err(()) => {
            warn!(ctx, "registered socket points outside the activity table");
            Err(())
        }
    }
}

#[inline(always)]
fn lookup_entry(sk: *mut bpf_sock) -> Result<Option<(u32, *mut ActivityEntry)>, ()> {
    // SAFETY: the map pointer is the BTF map definition the loader relocates; `sk` is a
    // non-null socket from the context. The helper returns NULL when the socket is not a full
    // socket or has no storage in this map.
    let slot_ref = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&LULL_SLOTS).cast_mut().cast(),
            sk.cast(),
            ptr::null_mut(),
            0,
        )
    }
    .cast::<SlotRef>();
    if slot_ref.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null storage returned by the helper holds a `SlotRef` written by userspace.
    let SlotRef { slot, generation } = unsafe { *slot_ref };
    let entry = LULL_ACTIVITY.get_ptr_mut(slot).ok_or(())?;
    // The slot may have been freed and handed to another socket since this socket registered;
    // its generation says so, and then this socket must not touch it.
    if ActivityEntry::generation_of(load_state(entry)) != generation {
        return Ok(None);
    }
    Ok(Some((slot, entry)))
}

#[inline(always)]
fn skb_sock(ctx: &SkBuffContext) -> *mut bpf_sock {
    // SAFETY: reading a context field; the verifier rewrites it to a checked load.
    unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: the helper takes no arguments and cannot fail.
    unsafe { bpf_ktime_get_ns() }
}

/// Reads the state word. Volatile, because userspace writes it through its own mapping; the
/// BPF backend has no atomic-load instruction below `--cpu=v4`, and an aligned 8-byte load is
/// one instruction, so it cannot tear.
#[inline(always)]
fn load_state(entry: *mut ActivityEntry) -> u64 {
    // SAFETY: `entry` is a valid array value pointer for the whole program run.
    unsafe { ptr::addr_of!((*entry).state).read_volatile() }
}

/// Sets `bit` with an atomic OR, skipping the write (and the cache-line bounce) when it is
/// already set: rx and tx of one socket may run on two CPUs at once.
#[inline(always)]
fn set_flag(entry: *mut ActivityEntry, bit: u32) {
    if ActivityEntry::flags_of(load_state(entry)) & bit == 0 {
        // The BPF target does not advertise read-modify-write atomics to Rust (its baseline CPU
        // lacks them), so `AtomicU64::fetch_or` does not exist; the intrinsic lowers to
        // BPF_ATOMIC|BPF_OR, which `--cpu=v3` enables.
        // SAFETY: `state` is a valid, aligned u64 for the whole program run.
        unsafe {
            atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(
                ptr::addr_of_mut!((*entry).state),
                u64::from(bit),
            );
        }
    }
}

#[inline(always)]
fn clear_flag(entry: *mut ActivityEntry, bit: u32) {
    if ActivityEntry::flags_of(load_state(entry)) & bit != 0 {
        // SAFETY: as in `set_flag`.
        unsafe {
            atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(
                ptr::addr_of_mut!((*entry).state),
                !u64::from(bit),
            );
        }
    }
}

/// What the programs need from a TCP segment. `cgroup_skb` sees the packet from its network
/// header, and only registered sockets get here, which are TCP by construction.
struct Segment {
    seq: u32,
    tcp_flags: u8,
    payload_len: u32,
}

impl Segment {
    #[inline(always)]
    fn parse(ctx: &SkBuffContext) -> Result<Self, ()> {
        let ip: [u8; 8] = ctx.load(0).map_err(|_| ())?;
        let ip_len = match ip[0] >> 4 {
            4 => u32::from(ip[0] & 0x0f) * 4,
            // Extension headers are rare on TCP; such packets are ignored, not misread.
            6 if ip[6] == 6 => 40,
            _ => return Err(()),
        };
        let tcp: [u8; 14] = ctx.load(ip_len as usize).map_err(|_| ())?;
        let header_len = ip_len + u32::from(tcp[12] >> 4) * 4;
        Ok(Self {
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            tcp_flags: tcp[13],
            payload_len: ctx.len().saturating_sub(header_len),
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
