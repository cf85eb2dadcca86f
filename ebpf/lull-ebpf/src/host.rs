//! Host mode's kernel half: keepalive policy and close verdicts for sockets of processes lull
//! does not own. See `lull_common::host` for the maps and records.
//!
//! Cost model: everything here runs once per connection (establishment, close) or once per
//! socket per iterator run, never per packet. `lull_host_sock_ops` is attached to the cgroups
//! the rules name; it asks for state callbacks (`BPF_SOCK_OPS_STATE_CB_FLAG`) only on sockets a
//! rule matched, so an unmatched socket pays one program run at establishment and nothing
//! after, and a matched one pays one more per state change.
//!
//! Kernel struct fields are read at byte offsets that userspace found in the kernel's BTF and
//! wrote into the `.rodata` globals below (there is no CO-RE for Rust). A load from a
//! `PTR_TO_BTF_ID` at such a frozen, hence constant, offset is checked by the verifier against
//! the kernel's types. Pointers stored in kernel structs (the socket's cgroup, its kernfs
//! nodes) are followed with `bpf_probe_read_kernel` instead, which any offset may use.

mod iter;
mod matching;
mod util;

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, SkStorage},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_setsockopt, bpf_sk_storage_delete, bpf_skc_to_tcp_sock,
    },
    macros::{btf_map, sock_ops},
    programs::SockOpsContext,
};
use lull_common::host::{
    CgroupKey, CidrKey, HostConfig, MAX_CIDRS, MAX_RULE_CGROUPS, PORT_MAP_ENTRIES, RULE_SLOTS,
    RuleBank, RuleCounters, RuleName, RuleSpec, SockRecord, VERDICT_RING_BYTES, VerdictEvent,
    rule_flags, verdict,
};
use matching::{Match, match_rule};
use util::{ctx_ip6, ip4_bytes, load, now_ns, off, storage_get, v4_mapped};

// ---- Offsets into kernel structs, from BTF, written by userspace at load time. ----
// `sock` fields are at the same offset in `tcp_sock`, which begins with `inet_connection_sock`,
// which begins with `inet_sock`, which begins with `sock`, which begins with `sock_common`.

/// `sock.sk_err`.
#[unsafe(no_mangle)]
static HOST_SK_ERR_OFF: u32 = 0;
/// `inet_connection_sock.icsk_probes_out`.
#[unsafe(no_mangle)]
static HOST_PROBES_OUT_OFF: u32 = 0;
/// `inet_connection_sock.icsk_retransmits`.
#[unsafe(no_mangle)]
static HOST_RETRANSMITS_OFF: u32 = 0;
/// `tcp_sock.snd_wnd`.
#[unsafe(no_mangle)]
static HOST_SND_WND_OFF: u32 = 0;
/// `sock.sk_cgrp_data.cgroup`: the socket's cgroup v2.
#[unsafe(no_mangle)]
static HOST_SK_CGROUP_OFF: u32 = 0;
/// `cgroup.kn`.
#[unsafe(no_mangle)]
static HOST_CGROUP_KN_OFF: u32 = 0;
/// `kernfs_node.id`: a cgroup's id is its kernfs node's id (the directory's inode number).
#[unsafe(no_mangle)]
static HOST_KN_ID_OFF: u32 = 0;
/// `kernfs_node.__parent` (`parent` before Linux 6.15).
#[unsafe(no_mangle)]
static HOST_KN_PARENT_OFF: u32 = 0;
/// `sock_common.skc_family`.
#[unsafe(no_mangle)]
static HOST_FAMILY_OFF: u32 = 0;
/// `sock_common.skc_state`.
#[unsafe(no_mangle)]
static HOST_STATE_OFF: u32 = 0;
/// `sock_common.skc_num`: the local port, host byte order.
#[unsafe(no_mangle)]
static HOST_NUM_OFF: u32 = 0;
/// `sock_common.skc_dport`: the remote port, network byte order.
#[unsafe(no_mangle)]
static HOST_DPORT_OFF: u32 = 0;
/// `sock_common.skc_daddr`.
#[unsafe(no_mangle)]
static HOST_DADDR_OFF: u32 = 0;
/// `sock_common.skc_rcv_saddr`.
#[unsafe(no_mangle)]
static HOST_SADDR_OFF: u32 = 0;
/// `sock_common.skc_v6_daddr`.
#[unsafe(no_mangle)]
static HOST_V6_DADDR_OFF: u32 = 0;
/// `sock_common.skc_v6_rcv_saddr`.
#[unsafe(no_mangle)]
static HOST_V6_SADDR_OFF: u32 = 0;
/// `tcp_sock.rcv_tstamp`: jiffies of the last ACK received.
#[unsafe(no_mangle)]
static HOST_RCV_TSTAMP_OFF: u32 = 0;
/// `tcp_sock.lsndtime`: jiffies of the last data sent.
#[unsafe(no_mangle)]
static HOST_LSNDTIME_OFF: u32 = 0;
/// `inet_connection_sock.icsk_ack.lrcvtime`: jiffies of the last data received.
#[unsafe(no_mangle)]
static HOST_LRCVTIME_OFF: u32 = 0;

/// `socket.sk`.
#[unsafe(no_mangle)]
static HOST_SOCKET_SK_OFF: u32 = 0;
/// `sock_common.skc_cookie`: the socket cookie, 0 until something asks for it.
#[unsafe(no_mangle)]
static HOST_COOKIE_OFF: u32 = 0;
/// `sock.sk_bpf_storage`: non-NULL when the socket has BPF socket storage.
#[unsafe(no_mangle)]
static HOST_SK_STORAGE_OFF: u32 = 0;
/// `task_struct.cgroups`: the task's `css_set`.
#[unsafe(no_mangle)]
static HOST_TASK_CGROUPS_OFF: u32 = 0;
/// `css_set.dfl_cgrp`: its cgroup v2.
#[unsafe(no_mangle)]
static HOST_CSS_DFL_CGRP_OFF: u32 = 0;
/// `task_struct.tgid`.
#[unsafe(no_mangle)]
static HOST_TASK_TGID_OFF: u32 = 0;
/// `task_struct.comm`.
#[unsafe(no_mangle)]
static HOST_TASK_COMM_OFF: u32 = 0;

// ---- Maps. All are pinned by userspace. ----

#[btf_map]
static HOST_CONFIG: Array<HostConfig, 1> = Array::new();
#[btf_map]
static HOST_BANKS: Array<RuleBank, 2> = Array::new();
#[btf_map]
static HOST_PORTS: Array<u64, PORT_MAP_ENTRIES, { BPF_F_MMAPABLE as usize }> = Array::new();
#[btf_map]
static HOST_CIDRS: LpmTrie<CidrKey, u8, MAX_CIDRS> = LpmTrie::new();
#[btf_map]
static HOST_CGROUPS: HashMap<CgroupKey, u64, MAX_RULE_CGROUPS> = HashMap::new();
#[btf_map]
static HOST_SOCKS: SkStorage<SockRecord> = SkStorage::new();
#[btf_map]
static HOST_VERDICTS: RingBuf<VerdictEvent, VERDICT_RING_BYTES> = RingBuf::new();
#[btf_map]
static HOST_COUNTERS: PerCpuArray<RuleCounters, RULE_SLOTS> = PerCpuArray::new();
#[btf_map]
static HOST_NAMES: Array<RuleName, RULE_SLOTS> = Array::new();
/// The owners iterator's memo of the task it is on (see `iter::task_in_rule_cgroup`). Not
/// pinned: it means nothing outside one run.
#[btf_map]
static HOST_OWNER_TASK: PerCpuArray<OwnerTask, 1> = PerCpuArray::new();

/// A value of [`HOST_OWNER_TASK`].
#[repr(C)]
#[derive(Clone, Copy)]
struct OwnerTask {
    task: u64,
    session: u64,
    covered: u64,
}

const AF_INET: u16 = 2;
const SOL_SOCKET: i32 = 1;
const SO_KEEPALIVE: i32 = 9;
const SOL_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;
/// `bpf_setsockopt` option (Linux 6.14+) that sets a socket's sock_ops callback flags from
/// programs without a sock_ops context, such as iterators.
const TCP_BPF_SOCK_OPS_CB_FLAGS: i32 = 1008;

const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LISTEN: u8 = 10;

const EPIPE: i32 = 32;
const ECONNABORTED: i32 = 103;
const ECONNRESET: i32 = 104;
const ECONNREFUSED: i32 = 111;

/// The slot recorded when no rule could be told.
const NO_SLOT: u16 = 0xffff;

// ---------------------------------------------------------------------------------------
// sock_ops
// ---------------------------------------------------------------------------------------

#[sock_ops]
pub fn lull_host_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            established(&ctx);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == u32::from(TCP_CLOSE) => closed(&ctx),
        _ => {}
    }
    1
}

/// A new connection: find its rule, and apply it.
#[inline(always)]
fn established(ctx: &SockOpsContext) {
    // SAFETY: a context field; the verifier rewrites the load and types it as a socket or NULL.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // Already watched: the program is attached to two cgroups on this socket's path, or the
    // old and new program both ran while lull replaced it.
    // SAFETY: a map definition and a non-null socket; NULL means "no storage".
    if !unsafe { storage_get(sk.cast(), ptr::null_mut(), 0) }.is_null() {
        return;
    }
    // SAFETY: `sk` is a non-null full socket; the helper returns NULL if it is not TCP.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) }.cast::<u8>();
    if tp.is_null() {
        return;
    }
    let family = ctx.family() as u16;
    let remote = if family == AF_INET {
        v4_mapped(ctx.remote_ip4())
    } else {
        ctx_ip6(ctx, false)
    };
    let local_port = ctx.local_port() as u16;
    let remote_port = (u32::from_be(ctx.remote_port()) & 0xffff) as u16;
    let Match::Rule(spec) = match_rule(tp, local_port, remote_port, &remote) else {
        return;
    };
    let Some(counters) = HOST_COUNTERS.get_ptr_mut(spec.slot) else {
        return;
    };
    let ops = ctx.ops.cast::<c_void>();
    let failed = set_keepalive(ops, &spec) != 0
        || ctx
            .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
            .is_err();
    let mut record = SockRecord {
        // SAFETY: the sock_ops variant of the helper takes the context.
        cookie: unsafe { bpf_get_socket_cookie(ops) },
        since_ns: now_ns(),
        slot: spec.slot as u16,
        flags: 0,
        session: 0,
    };
    // SAFETY: as above; F_CREATE initialises the storage with `record`.
    let stored = !unsafe {
        storage_get(
            sk.cast(),
            ptr::from_mut(&mut record).cast(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .is_null();
    // SAFETY: a per-CPU value, written only by this CPU, with preemption off in BPF programs.
    unsafe {
        if failed || !stored {
            (*counters).setsockopt_failed += 1;
        }
        if stored {
            (*counters).applied += 1;
        }
    }
}

/// A watched connection is gone: classify the close, count it, and tell userspace.
#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    // SAFETY: as in `established`.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: as in `established`.
    let stored = unsafe { storage_get(sk.cast(), ptr::null_mut(), 0) }.cast::<SockRecord>();
    if stored.is_null() {
        return;
    }
    // SAFETY: non-null storage of this map holds a `SockRecord`.
    let record = unsafe { *stored };
    // Deleting first makes the verdict once-only even if two instances of this program run
    // for the socket (during a program replacement).
    // SAFETY: a map definition and a non-null socket.
    if unsafe { bpf_sk_storage_delete(ptr::from_ref(&HOST_SOCKS).cast_mut().cast(), sk.cast()) }
        != 0
    {
        return;
    }
    // SAFETY: as in `established`.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) }.cast::<u8>();
    if tp.is_null() {
        return;
    }
    // SAFETY: loads from a non-null `tcp_sock` at BTF offsets (see the module docs).
    let (sk_err, probes_out, retransmits, snd_wnd) = unsafe {
        (
            load::<i32>(tp, off(&HOST_SK_ERR_OFF)),
            load::<u8>(tp, off(&HOST_PROBES_OUT_OFF)),
            load::<u8>(tp, off(&HOST_RETRANSMITS_OFF)),
            load::<u32>(tp, off(&HOST_SND_WND_OFF)),
        )
    };
    let old_state = ctx.arg(0) as u8;
    let verdict = classify(old_state, sk_err, probes_out, retransmits, snd_wnd);
    let Some(counters) = HOST_COUNTERS.get_ptr_mut(u32::from(record.slot)) else {
        return;
    };
    // SAFETY: per-CPU value, as in `established`; `verdict` < verdict::COUNT.
    unsafe { (*counters).closed[verdict as usize % verdict::COUNT] += 1 };
    let Some(mut entry) = HOST_VERDICTS.reserve(0) else {
        // SAFETY: as above.
        unsafe { (*counters).lost += 1 };
        return;
    };
    let family = ctx.family() as u16;
    let (local_addr, remote_addr) = if family == AF_INET {
        (ip4_bytes(ctx.local_ip4()), ip4_bytes(ctx.remote_ip4()))
    } else {
        (ctx_ip6(ctx, true), ctx_ip6(ctx, false))
    };
    // SAFETY: context fields, rewritten by the verifier to loads from the socket.
    let (bytes_received, bytes_acked) =
        unsafe { ((*ctx.ops).bytes_received, (*ctx.ops).bytes_acked) };
    entry.write(VerdictEvent {
        cookie: record.cookie,
        since_ns: record.since_ns,
        closed_ns: now_ns(),
        bytes_received,
        bytes_acked,
        sk_err,
        slot: record.slot,
        flags: record.flags,
        family,
        local_port: ctx.local_port() as u16,
        remote_port: (u32::from_be(ctx.remote_port()) & 0xffff) as u16,
        verdict,
        old_state,
        probes_out,
        retransmits,
        _pad: [0; 6],
        local_addr,
        remote_addr,
    });
    entry.submit(0);
}

/// Why a connection closed, from the state it left and `sk_err` (the error its application's
/// next call would have returned). See `lull_common::host::verdict`.
#[inline(always)]
fn classify(old_state: u8, sk_err: i32, probes_out: u8, retransmits: u8, snd_wnd: u32) -> u8 {
    match sk_err {
        // No error: an orderly close, unless the socket went straight from a state where
        // both sides could still send to CLOSE, which only an abort does (a RST sent).
        0 if old_state == TCP_ESTABLISHED || old_state == TCP_CLOSE_WAIT => verdict::LOCAL_ABORT,
        0 => verdict::CLOSED,
        // tcp_reset(): ECONNRESET, EPIPE in CLOSE_WAIT, ECONNREFUSED in SYN_SENT.
        ECONNRESET | EPIPE | ECONNREFUSED => verdict::RESET_BY_PEER,
        // tcp_abort() (`ss -K`, bpf_sock_destroy).
        ECONNABORTED => verdict::LOCAL_ABORT,
        // ETIMEDOUT, or the soft error (an ICMP unreachable) tcp_write_err() reports instead.
        // The keepalive timer only probes with nothing in flight, so probes out with no
        // retransmission is a keepalive death. Zero-window probes also count in
        // probes_out, but only with the peer's window shut.
        _ if probes_out > 0 && retransmits == 0 && snd_wnd > 0 => verdict::KEEPALIVE_TIMEOUT,
        _ => verdict::USER_TIMEOUT,
    }
}

/// Sets SO_KEEPALIVE and the rule's timings; returns the first error, or 0.
#[inline(always)]
fn set_keepalive(sk: *mut c_void, spec: &RuleSpec) -> i64 {
    let mut rc = setsockopt(sk, SOL_SOCKET, SO_KEEPALIVE, 1);
    rc |= setsockopt(sk, SOL_TCP, TCP_KEEPIDLE, spec.idle_s as i32);
    rc |= setsockopt(sk, SOL_TCP, TCP_KEEPINTVL, spec.interval_s as i32);
    rc |= setsockopt(sk, SOL_TCP, TCP_KEEPCNT, spec.count as i32);
    if spec.flags & rule_flags::USER_TIMEOUT != 0 {
        rc |= setsockopt(sk, SOL_TCP, TCP_USER_TIMEOUT, spec.user_timeout_ms as i32);
    }
    rc
}

#[inline(always)]
fn setsockopt(sk: *mut c_void, level: i32, name: i32, value: i32) -> i64 {
    let mut v = value;
    // SAFETY: `sk` is the sock_ops context or a locked `tcp_sock` from the iterator; `v` is
    // a 4-byte value on the stack.
    unsafe { bpf_setsockopt(sk, level, name, ptr::from_mut(&mut v).cast(), 4) }
}
