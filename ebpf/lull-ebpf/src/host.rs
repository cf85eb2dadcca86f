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

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, SkStorage},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_getsockopt, bpf_jiffies64, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_seq_write, bpf_setsockopt, bpf_sk_storage_delete,
        bpf_sk_storage_get, bpf_skc_to_tcp_sock, bpf_sock_from_file,
    },
    macros::{btf_map, sock_ops},
    maps::lpm_trie::Key,
    programs::SockOpsContext,
};
use lull_common::host::{
    CgroupKey, CidrKey, ClockRecord, HostConfig, ListRecord, MAX_CGROUP_DEPTH, MAX_CIDRS,
    MAX_RULE_CGROUPS, MAX_RULES, OwnerRecord, PORT_MAP_ENTRIES, PickupRecord, RULE_SLOTS, RuleBank,
    RuleCounters, RuleName, RuleSpec, SockRecord, VERDICT_RING_BYTES, VerdictEvent, pickup,
    port_word_index, rule_flags, sock_flags, verdict,
};

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
/// `sock.sk_socket`.
#[unsafe(no_mangle)]
static HOST_SK_SOCKET_OFF: u32 = 0;
/// From a `struct socket *` to its inode's `i_ino` (`socket_alloc.vfs_inode` minus
/// `socket_alloc.socket`, plus `inode.i_ino`).
#[unsafe(no_mangle)]
static HOST_SOCKET_INO_OFF: u32 = 0;

/// `socket.sk`.
#[unsafe(no_mangle)]
static HOST_SOCKET_SK_OFF: u32 = 0;
/// `sock_common.skc_cookie`: the socket cookie, 0 until something asks for it.
#[unsafe(no_mangle)]
static HOST_COOKIE_OFF: u32 = 0;
/// `sock.sk_bpf_storage`: non-NULL when the socket has BPF socket storage.
#[unsafe(no_mangle)]
static HOST_SK_STORAGE_OFF: u32 = 0;
/// `task_struct.tgid`.
#[unsafe(no_mangle)]
static HOST_TASK_TGID_OFF: u32 = 0;
/// `task_struct.comm`.
#[unsafe(no_mangle)]
static HOST_TASK_COMM_OFF: u32 = 0;

#[inline(always)]
fn off(global: &'static u32) -> usize {
    // SAFETY: a plain read of a global; volatile so that the compiler keeps the load from
    // `.rodata` (which the verifier then sees as a constant) instead of folding in 0.
    unsafe { ptr::read_volatile(global) as usize }
}

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
        _pad: 0,
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

// ---------------------------------------------------------------------------------------
// Rule matching
// ---------------------------------------------------------------------------------------

enum Match {
    /// No rule matches, or the first match is `off`.
    None,
    /// The socket's cgroup could not be read.
    NoCgroup,
    /// This rule applies.
    Rule(RuleSpec),
}

/// The first rule of the bank in force whose cgroup holds the socket (at any depth) and whose
/// ports and CIDRs match.
#[inline(always)]
fn match_rule(tp: *const u8, local_port: u16, remote_port: u16, remote: &[u8; 16]) -> Match {
    let Some(config) = HOST_CONFIG.get(0) else {
        return Match::None;
    };
    let bank = config.active_bank & 1;
    let Some(mask) = cgroup_mask(tp, bank) else {
        return Match::NoCgroup;
    };
    if mask == 0 {
        return Match::None;
    }
    let Some(rules) = HOST_BANKS.get(bank) else {
        return Match::None;
    };
    let count = rules.count;
    for position in 0..MAX_RULES as u32 {
        if position >= count || mask >> position == 0 {
            break;
        }
        if mask >> position & 1 == 0 {
            continue;
        }
        let spec = rules.rules[position as usize];
        if spec.flags & rule_flags::LOCAL_PORTS != 0
            && !port_listed(bank, position, false, local_port)
        {
            continue;
        }
        if spec.flags & rule_flags::REMOTE_PORTS != 0
            && !port_listed(bank, position, true, remote_port)
        {
            continue;
        }
        if spec.flags & rule_flags::REMOTE_CIDRS != 0 {
            let key = Key::new(
                16 + 128,
                CidrKey {
                    bank: bank as u8,
                    position: position as u8,
                    addr: *remote,
                },
            );
            if HOST_CIDRS.get(&key).is_none() {
                continue;
            }
        }
        if spec.flags & rule_flags::OFF != 0 {
            return Match::None;
        }
        return Match::Rule(spec);
    }
    Match::None
}

#[inline(always)]
fn port_listed(bank: u32, position: u32, remote: bool, port: u16) -> bool {
    HOST_PORTS
        .get(port_word_index(bank, position, remote, port))
        .is_some_and(|word| word >> (port & 63) & 1 == 1)
}

/// The rule positions whose cgroup is the socket's cgroup or one of its ancestors: one
/// [`HOST_CGROUPS`] lookup per level, walking up the kernfs nodes. `None` if the socket's
/// cgroup cannot be read.
#[inline(always)]
fn cgroup_mask(tp: *const u8, bank: u32) -> Option<u64> {
    // SAFETY (the reads below): bpf_probe_read_kernel checks the address itself and fills
    // zeros on failure; the offsets come from this kernel's BTF.
    let cgroup = unsafe { read_kernel::<u64>(tp.add(off(&HOST_SK_CGROUP_OFF))) };
    if cgroup == 0 {
        return None;
    }
    // SAFETY: see above.
    let mut kn = unsafe { read_kernel::<u64>((cgroup as *const u8).add(off(&HOST_CGROUP_KN_OFF))) };
    if kn == 0 {
        return None;
    }
    let mut mask = 0u64;
    for _ in 0..MAX_CGROUP_DEPTH {
        if kn == 0 {
            break;
        }
        let node = kn as *const u8;
        let key = CgroupKey {
            // SAFETY: see above.
            cgroup_id: unsafe { read_kernel::<u64>(node.add(off(&HOST_KN_ID_OFF))) },
            bank,
            _pad: 0,
        };
        // SAFETY: a read-only lookup; the value is a plain u64.
        if let Some(m) = unsafe { HOST_CGROUPS.get(&key) } {
            mask |= *m;
        }
        // SAFETY: see above.
        kn = unsafe { read_kernel::<u64>(node.add(off(&HOST_KN_PARENT_OFF))) };
    }
    Some(mask)
}

// ---------------------------------------------------------------------------------------
// Iterators
// ---------------------------------------------------------------------------------------

/// `struct bpf_iter_meta`.
#[repr(C)]
pub struct BpfIterMeta {
    pub seq: *mut c_void,
    pub session_id: u64,
    pub seq_num: u64,
}

/// `struct bpf_iter__tcp`.
#[repr(C)]
pub struct BpfIterTcp {
    pub meta: *mut BpfIterMeta,
    pub sk_common: *mut u8,
    pub uid: u32,
}

/// Applies the rules to connections that existed before: every ESTABLISHED TCP socket of this
/// iterator's network namespace that a rule matches and that is not watched yet. Writes one
/// [`PickupRecord`] per socket a rule matched, picked up or not.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn lull_host_pickup(ctx: *mut BpfIterTcp) -> i32 {
    // SAFETY: the iterator's context is valid for the call; `meta` is never NULL.
    let (skc, seq) = unsafe { ((*ctx).sk_common, (*(*ctx).meta).seq) };
    if skc.is_null() {
        return 0;
    }
    // SAFETY: non-null `sock_common`; NULL for request and TIME_WAIT sockets.
    let tp = unsafe { bpf_skc_to_tcp_sock(skc.cast()) }.cast::<u8>();
    if tp.is_null() {
        return 0;
    }
    // SAFETY: loads from a non-null `tcp_sock` at BTF offsets.
    let state = unsafe { load::<u8>(tp, off(&HOST_STATE_OFF)) };
    if state == TCP_LISTEN || state == TCP_CLOSE {
        return 0;
    }
    // SAFETY: a map definition and a non-null socket.
    if !unsafe { storage_get(tp.cast(), ptr::null_mut(), 0) }.is_null() {
        return 0;
    }
    let (family, _, local_port, remote, remote_port) = addresses(tp);
    // SAFETY: the helper's tracing variant takes any socket pointer.
    let cookie = unsafe { bpf_get_socket_cookie(tp.cast()) };
    let mut out = PickupRecord {
        cookie,
        result: pickup::PICKED,
        state,
        slot: NO_SLOT,
        err: 0,
    };
    let remote = if family == AF_INET {
        v4_mapped(u32::from_ne_bytes([
            remote[0], remote[1], remote[2], remote[3],
        ]))
    } else {
        remote
    };
    let spec = match match_rule(tp, local_port, remote_port, &remote) {
        Match::None => return 0,
        Match::NoCgroup => {
            out.result = pickup::NO_CGROUP;
            seq_write(seq, &out);
            return 0;
        }
        Match::Rule(spec) => spec,
    };
    out.slot = spec.slot as u16;
    let Some(counters) = HOST_COUNTERS.get_ptr_mut(spec.slot) else {
        return 0;
    };
    if state != TCP_ESTABLISHED {
        out.result = pickup::NOT_ESTABLISHED;
    } else {
        let err = set_keepalive(tp.cast(), &spec);
        if err != 0 {
            out.result = pickup::SETSOCKOPT;
            out.err = err as i32;
        } else {
            let mut flags: i32 = 0;
            // SAFETY: a locked `tcp_sock` and a 4-byte value on the stack.
            unsafe {
                bpf_getsockopt(
                    tp.cast(),
                    SOL_TCP,
                    TCP_BPF_SOCK_OPS_CB_FLAGS,
                    ptr::from_mut(&mut flags).cast(),
                    4,
                )
            };
            let err = setsockopt(
                tp.cast(),
                SOL_TCP,
                TCP_BPF_SOCK_OPS_CB_FLAGS,
                flags | BPF_SOCK_OPS_STATE_CB_FLAG as i32,
            );
            if err != 0 {
                out.result = pickup::CB_FLAGS;
                out.err = err as i32;
            } else {
                let mut record = SockRecord {
                    cookie,
                    since_ns: now_ns(),
                    slot: spec.slot as u16,
                    flags: sock_flags::PICKED_UP,
                    _pad: 0,
                };
                // SAFETY: as in `established`.
                let stored = unsafe {
                    storage_get(
                        tp.cast(),
                        ptr::from_mut(&mut record).cast(),
                        BPF_SK_STORAGE_GET_F_CREATE.into(),
                    )
                };
                if stored.is_null() {
                    out.result = pickup::STORAGE;
                }
            }
        }
    }
    // SAFETY: per-CPU value, as in `established`.
    unsafe {
        match out.result {
            pickup::PICKED => (*counters).picked_up += 1,
            pickup::NOT_ESTABLISHED => {}
            _ => (*counters).setsockopt_failed += 1,
        }
    }
    seq_write(seq, &out);
    0
}

/// Lists the watched connections of this iterator's network namespace: a [`ClockRecord`]
/// first, then one [`ListRecord`] per watched socket.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn lull_host_list(ctx: *mut BpfIterTcp) -> i32 {
    // SAFETY: as in `lull_host_pickup`.
    let (skc, meta) = unsafe { ((*ctx).sk_common, (*ctx).meta) };
    // SAFETY: `meta` is never NULL.
    let (seq, seq_num) = unsafe { ((*meta).seq, (*meta).seq_num) };
    let now = jiffies();
    if seq_num == 0 {
        seq_write(
            seq,
            &ClockRecord {
                magic: ClockRecord::MAGIC,
                jiffies: now,
                ktime_ns: now_ns(),
            },
        );
    }
    if skc.is_null() {
        return 0;
    }
    // SAFETY: as in `lull_host_pickup`.
    let tp = unsafe { bpf_skc_to_tcp_sock(skc.cast()) }.cast::<u8>();
    if tp.is_null() {
        return 0;
    }
    // SAFETY: as in `lull_host_pickup`.
    let stored = unsafe { storage_get(tp.cast(), ptr::null_mut(), 0) }.cast::<SockRecord>();
    if stored.is_null() {
        return 0;
    }
    // SAFETY: non-null storage of this map holds a `SockRecord`.
    let record = unsafe { *stored };
    let (family, local, local_port, remote, remote_port) = addresses(tp);
    let now = now as u32;
    // SAFETY: loads from a non-null `tcp_sock` at BTF offsets; the pointer chase for the
    // inode goes through bpf_probe_read_kernel.
    let out = unsafe {
        let rx_ack = now.wrapping_sub(load::<u32>(tp, off(&HOST_RCV_TSTAMP_OFF)));
        let rx_data = now.wrapping_sub(load::<u32>(tp, off(&HOST_LRCVTIME_OFF)));
        let socket = read_kernel::<u64>(tp.add(off(&HOST_SK_SOCKET_OFF)));
        let inode = if socket == 0 {
            0
        } else {
            read_kernel::<u64>((socket as *const u8).add(off(&HOST_SOCKET_INO_OFF)))
        };
        ListRecord {
            cookie: record.cookie,
            since_ns: record.since_ns,
            inode,
            idle_rx_jiffies: if rx_ack < rx_data { rx_ack } else { rx_data },
            idle_tx_jiffies: now.wrapping_sub(load::<u32>(tp, off(&HOST_LSNDTIME_OFF))),
            slot: record.slot,
            flags: record.flags,
            family,
            local_port,
            remote_port,
            state: load::<u8>(tp, off(&HOST_STATE_OFF)),
            probes_out: load::<u8>(tp, off(&HOST_PROBES_OUT_OFF)),
            _pad: [0; 4],
            local_addr: local,
            remote_addr: remote,
        }
    };
    seq_write(seq, &out);
    0
}

/// `struct bpf_iter__task_file`.
#[repr(C)]
pub struct BpfIterTaskFile {
    pub meta: *mut BpfIterMeta,
    pub task: *mut u8,
    pub fd: u32,
    pub file: *mut u8,
}

/// For every open file of every process (threads sharing a file table are visited once)
/// that may be a watched socket: its cookie and the process. This is how `lull ls` names a
/// socket's process without reading `/proc/*/fd` (a `readlink` per descriptor on the host).
///
/// The verifier will not pass a socket reached from a file to `bpf_sk_storage_get` (the
/// pointer is "untrusted"), so this reads two fields instead: the socket cookie, which is 0
/// until something (host mode's `sock_ops`, for a watched socket) asks for it, and
/// `sk_bpf_storage`, NULL unless the socket has BPF socket storage. A socket with both is
/// written; userspace keeps the ones whose cookie `lull ls` lists.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn lull_host_owners(ctx: *mut BpfIterTaskFile) -> i32 {
    // SAFETY: the iterator's context is valid for the call; `meta` is never NULL.
    let (file, task, fd, seq) = unsafe {
        (
            (*ctx).file,
            (*ctx).task,
            (*ctx).fd,
            (*(*ctx).meta).seq,
        )
    };
    if file.is_null() || task.is_null() {
        return 0;
    }
    // SAFETY: a non-null `struct file`; the helper returns NULL unless it is a socket.
    let socket = unsafe { bpf_sock_from_file(file.cast()) }.cast::<u8>();
    if socket.is_null() {
        return 0;
    }
    // SAFETY (this and the loads below): loads at BTF offsets from non-null kernel objects;
    // the verifier turns loads through the untrusted socket pointer into faulting-safe ones.
    let sk = unsafe { load::<*mut u8>(socket, off(&HOST_SOCKET_SK_OFF)) };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: see above.
    let (cookie, storage) = unsafe {
        (
            load::<u64>(sk, off(&HOST_COOKIE_OFF)),
            load::<u64>(sk, off(&HOST_SK_STORAGE_OFF)),
        )
    };
    if cookie == 0 || storage == 0 {
        return 0;
    }
    // SAFETY: see above.
    let out = unsafe {
        OwnerRecord {
            cookie,
            pid: load::<u32>(task, off(&HOST_TASK_TGID_OFF)),
            fd,
            comm: load16(task, off(&HOST_TASK_COMM_OFF)),
        }
    };
    seq_write(seq, &out);
    0
}

/// `struct bpf_iter__bpf_map`.
#[repr(C)]
pub struct BpfIterBpfMap {
    pub meta: *mut BpfIterMeta,
    pub map: *mut c_void,
}

/// Writes one [`ClockRecord`]: jiffies and the monotonic clock, read together. Two runs a
/// moment apart tell userspace the kernel's HZ. It iterates BPF maps only because that is a
/// cheap iterator to run.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_map")]
pub extern "C" fn lull_host_clock(ctx: *mut BpfIterBpfMap) -> i32 {
    // SAFETY: the iterator's context is valid for the call; `meta` is never NULL.
    let meta = unsafe { (*ctx).meta };
    // SAFETY: as above.
    let (seq, seq_num) = unsafe { ((*meta).seq, (*meta).seq_num) };
    if seq_num == 0 {
        seq_write(
            seq,
            &ClockRecord {
                magic: ClockRecord::MAGIC,
                jiffies: jiffies(),
                ktime_ns: now_ns(),
            },
        );
    }
    0
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// (family, local address, local port, remote address, remote port) of a `tcp_sock`;
/// addresses in network byte order, IPv4 in the first four bytes.
#[inline(always)]
fn addresses(tp: *const u8) -> (u16, [u8; 16], u16, [u8; 16], u16) {
    // SAFETY: loads from a non-null `tcp_sock` at BTF offsets.
    unsafe {
        let family = load::<u16>(tp, off(&HOST_FAMILY_OFF));
        let local_port = load::<u16>(tp, off(&HOST_NUM_OFF));
        let remote_port = u16::from_be(load::<u16>(tp, off(&HOST_DPORT_OFF)));
        let (local, remote) = if family == AF_INET {
            (
                ip4_bytes(load::<u32>(tp, off(&HOST_SADDR_OFF))),
                ip4_bytes(load::<u32>(tp, off(&HOST_DADDR_OFF))),
            )
        } else {
            (
                load16(tp, off(&HOST_V6_SADDR_OFF)),
                load16(tp, off(&HOST_V6_DADDR_OFF)),
            )
        };
        (family, local, local_port, remote, remote_port)
    }
}

/// The local or remote IPv6 address from the context, one 4-byte field load at a time: the
/// verifier refuses a load through a context pointer that was moved (as copying the array
/// would do).
#[inline(always)]
fn ctx_ip6(ctx: &SockOpsContext, local: bool) -> [u8; 16] {
    let ops = ctx.ops;
    // SAFETY: context fields at constant offsets; the verifier rewrites each load.
    let w = unsafe {
        if local {
            [
                ptr::read_volatile(ptr::addr_of!((*ops).local_ip6[0])),
                ptr::read_volatile(ptr::addr_of!((*ops).local_ip6[1])),
                ptr::read_volatile(ptr::addr_of!((*ops).local_ip6[2])),
                ptr::read_volatile(ptr::addr_of!((*ops).local_ip6[3])),
            ]
        } else {
            [
                ptr::read_volatile(ptr::addr_of!((*ops).remote_ip6[0])),
                ptr::read_volatile(ptr::addr_of!((*ops).remote_ip6[1])),
                ptr::read_volatile(ptr::addr_of!((*ops).remote_ip6[2])),
                ptr::read_volatile(ptr::addr_of!((*ops).remote_ip6[3])),
            ]
        }
    };
    words_to_bytes(w)
}

#[inline(always)]
fn v4_mapped(ip4: u32) -> [u8; 16] {
    let b = ip4.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

#[inline(always)]
fn ip4_bytes(ip4: u32) -> [u8; 16] {
    let b = ip4.to_ne_bytes();
    [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// A load of `T` at `base + offset`.
///
/// # Safety
/// `base` must be a non-null kernel object pointer the verifier knows the type of, and
/// `offset` a constant offset of a `T` field in it.
#[inline(always)]
unsafe fn load<T: Copy>(base: *const u8, offset: usize) -> T {
    // SAFETY: upheld by the caller; the verifier checks the access against BTF.
    unsafe { ptr::read_volatile(base.add(offset).cast::<T>()) }
}

/// 16 bytes at `base + offset`, as four 4-byte loads.
///
/// # Safety
/// As for [`load`].
#[inline(always)]
unsafe fn load16(base: *const u8, offset: usize) -> [u8; 16] {
    // SAFETY: upheld by the caller.
    unsafe {
        words_to_bytes([
            load::<u32>(base, offset),
            load::<u32>(base, offset + 4),
            load::<u32>(base, offset + 8),
            load::<u32>(base, offset + 12),
        ])
    }
}

/// Reads a `T` at any kernel address; zeros if the address cannot be read.
///
/// # Safety
/// `T` must be valid for every bit pattern.
#[inline(always)]
unsafe fn read_kernel<T: Copy + Default>(src: *const u8) -> T {
    let mut value = T::default();
    // SAFETY: the helper checks `src` and writes at most size_of::<T>() bytes into `value`.
    let rc = unsafe {
        bpf_probe_read_kernel(
            ptr::from_mut(&mut value).cast(),
            core::mem::size_of::<T>() as u32,
            src.cast(),
        )
    };
    if rc != 0 { T::default() } else { value }
}

/// `bpf_sk_storage_get` on [`HOST_SOCKS`].
///
/// # Safety
/// `sk` must be a non-null socket pointer of a kind the program type may pass.
#[inline(always)]
unsafe fn storage_get(sk: *mut c_void, value: *mut c_void, flags: u64) -> *mut c_void {
    // SAFETY: upheld by the caller; the map pointer is relocated by the loader.
    unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&HOST_SOCKS).cast_mut().cast(),
            sk,
            value,
            flags,
        )
    }
}

#[inline(always)]
fn seq_write<T>(seq: *mut c_void, value: &T) {
    // SAFETY: `seq` is the iterator's seq_file; `value` is a plain struct on the stack.
    unsafe {
        bpf_seq_write(
            seq.cast(),
            ptr::from_ref(value).cast(),
            core::mem::size_of::<T>() as u32,
        )
    };
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: no arguments, cannot fail.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn jiffies() -> u64 {
    // SAFETY: no arguments, cannot fail.
    unsafe { bpf_jiffies64() }
}
