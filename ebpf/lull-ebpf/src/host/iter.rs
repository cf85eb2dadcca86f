//! The iterator programs: pickup (apply rules to connections that already exist), list
//! (`lull ls`'s rows), owners (`lull ls`'s process column) and clock (jiffies against the
//! monotonic clock, for HZ).

use core::{ffi::c_void, ptr};

use aya_ebpf::helpers::generated::{
    bpf_get_socket_cookie, bpf_getsockopt, bpf_skc_to_tcp_sock, bpf_sock_from_file,
};
use lull_common::host::{
    ClockRecord, ListRecord, OwnerRecord, PickupRecord, SockRecord, pickup, sock_flags,
};

use super::{
    AF_INET, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_STATE_CB_FLAG, HOST_COOKIE_OFF,
    HOST_COUNTERS, HOST_CSS_DFL_CGRP_OFF, HOST_LRCVTIME_OFF, HOST_LSNDTIME_OFF, HOST_OWNER_TASK,
    HOST_PROBES_OUT_OFF, HOST_RCV_TSTAMP_OFF, HOST_SK_STORAGE_OFF, HOST_SOCKET_SK_OFF,
    HOST_STATE_OFF, HOST_TASK_CGROUPS_OFF, HOST_TASK_COMM_OFF, HOST_TASK_TGID_OFF, NO_SLOT,
    OwnerTask, SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS, TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN,
    matching::{Match, any_rule_covers, match_rule},
    set_keepalive, setsockopt,
    util::{
        addresses, jiffies, load, load16, now_ns, off, read_kernel, seq_write, storage_get,
        v4_mapped,
    },
};

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
    // SAFETY: the iterator's context is valid for the call; `meta` is never NULL.
    let session = unsafe { (*(*ctx).meta).session_id } as u32;
    // SAFETY: a map definition and a non-null socket.
    let stored = unsafe { storage_get(tp.cast(), ptr::null_mut(), 0) }.cast::<SockRecord>();
    if !stored.is_null() {
        // Watched already; but if this run picked it up (and the record did not fit the
        // buffer, so the kernel runs the program again for this socket), say so again.
        // SAFETY: non-null storage of this map holds a `SockRecord`.
        let record = unsafe { *stored };
        if record.session == session && record.flags & sock_flags::PICKED_UP != 0 {
            seq_write(
                seq,
                &PickupRecord {
                    cookie: record.cookie,
                    result: pickup::PICKED,
                    state,
                    slot: record.slot,
                    err: 0,
                },
            );
        }
        return 0;
    }
    let (family, _, local_port, remote, remote_port) = addresses(tp);
    let mut out = PickupRecord {
        cookie: 0,
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
    let matched = match_rule(tp, local_port, remote_port, &remote);
    if matches!(matched, Match::None) {
        return 0;
    }
    // Only now: asking for a socket's cookie gives it one for good, and the list iterator
    // skips sockets without one cheaply.
    // SAFETY: the helper's tracing variant takes any socket pointer.
    let cookie = unsafe { bpf_get_socket_cookie(tp.cast()) };
    out.cookie = cookie;
    let spec = match matched {
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
                    session,
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
    // A watched socket has a cookie (the sock_ops program asked for it); most others have
    // none. The cookie sits in `sock_common`, whose cache lines the walk of the hash chain
    // has just loaded, while the storage pointer is a cache miss away: at a million sockets
    // that miss is most of the cost of a socket lull does not watch.
    // SAFETY: a load from a non-null `sock_common` at a BTF offset.
    if unsafe { load::<u64>(skc, off(&HOST_COOKIE_OFF)) } == 0 {
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
    // SAFETY: loads from a non-null `tcp_sock` at BTF offsets.
    let out = unsafe {
        let rx_ack = now.wrapping_sub(load::<u32>(tp, off(&HOST_RCV_TSTAMP_OFF)));
        let rx_data = now.wrapping_sub(load::<u32>(tp, off(&HOST_LRCVTIME_OFF)));
        ListRecord {
            cookie: record.cookie,
            since_ns: record.since_ns,
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
    let (file, task, fd, seq) =
        unsafe { ((*ctx).file, (*ctx).task, (*ctx).fd, (*(*ctx).meta).seq) };
    if file.is_null() || task.is_null() {
        return 0;
    }
    if !task_in_rule_cgroup(ctx, task) {
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
    // SAFETY: see above. The cookie first: it is in `sock_common`, and usually 0.
    let cookie = unsafe { load::<u64>(sk, off(&HOST_COOKIE_OFF)) };
    // SAFETY: see above.
    if cookie == 0 || unsafe { load::<u64>(sk, off(&HOST_SK_STORAGE_OFF)) } == 0 {
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

/// Whether `task` runs in a cgroup a rule names (or below one). The iterator visits a task's
/// files one after another, so the answer is kept for the next call in a per-CPU slot with
/// the task and the run's session: the files of processes no rule covers (on a loopback
/// benchmark, the million client ends) are then passed over without touching their sockets.
/// A watched socket held by a process outside the rules' cgroups (passed over a Unix
/// socket, or its process moved away) is listed without its process.
#[inline(always)]
fn task_in_rule_cgroup(ctx: *mut BpfIterTaskFile, task: *mut u8) -> bool {
    // SAFETY: the iterator's context is valid for the call; `meta` is never NULL.
    let session = unsafe { (*(*ctx).meta).session_id };
    let Some(cache) = HOST_OWNER_TASK.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a per-CPU value; BPF programs run with preemption off.
    unsafe {
        if (*cache).task == task as u64 && (*cache).session == session {
            return (*cache).covered != 0;
        }
    }
    // SAFETY: probe reads at BTF offsets: task->cgroups (a css_set), then its dfl_cgrp.
    let cgroup = unsafe {
        let css_set = read_kernel::<u64>(task.add(off(&HOST_TASK_CGROUPS_OFF)));
        if css_set == 0 {
            0
        } else {
            read_kernel::<u64>((css_set as *const u8).add(off(&HOST_CSS_DFL_CGRP_OFF)))
        }
    };
    let covered = any_rule_covers(cgroup);
    // SAFETY: as above.
    unsafe {
        *cache = OwnerTask {
            task: task as u64,
            session,
            covered: u64::from(covered),
        };
    }
    covered
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
