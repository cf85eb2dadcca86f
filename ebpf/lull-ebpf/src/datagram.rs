//! UDP: the egress program, and the stamp both directions of a datagram socket share.
//!
//! A TCP socket's sends show on ingress, as the peer's acknowledgements; a datagram is never
//! acknowledged, so its tx can only be seen leaving. That is the one reason for an egress
//! program, and why it is attached to a cgroup only once a UDP flow there is watched with the
//! eBPF source: until then the cgroup's packets run nothing on egress. Once attached, every
//! packet of the cgroup pays a storage lookup on egress; a TCP packet returns right after it,
//! and a packet of an unregistered socket finds no storage.
//!
//! Writes are stale-only, as on ingress: the row is written at the first datagram of a jiffy
//! and the socket's storage remembers which jiffy, so a busy flow dirties the cache line the
//! engine reads at most once per jiffy.

use core::ptr;

use aya_ebpf::{
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use lull_common::SlotRef;

use crate::programs::{PASS, registered_entry, slot_ref};

/// Which stamp a datagram moves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Rx,
    Tx,
}

#[cgroup_skb]
pub fn lull_egress(ctx: SkBuffContext) -> i32 {
    // SAFETY: reading a context field; the verifier rewrites it to a checked load.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    let Some(st) = slot_ref(sk.cast()) else {
        return PASS;
    };
    // SAFETY: `st` is this socket's storage, valid for the whole program run.
    let (kind, tx_j) = unsafe { ((*st).kind, (*st).tx_jiffies) };
    // TCP's tx is the peer's acknowledgement, seen on ingress.
    if kind != SlotRef::DATAGRAM {
        return PASS;
    }
    // SAFETY: the helper takes no arguments; the verifier inlines it as a load of jiffies.
    let now_j = unsafe { bpf_jiffies64() };
    if tx_j != now_j {
        stamp(st, now_j, Direction::Tx);
    }
    PASS
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
