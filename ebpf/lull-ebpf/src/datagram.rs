//! UDP: the egress program. (The stamp both directions of a datagram socket share is
//! [`stamp`](crate::programs::stamp), beside the other row writes.)
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

use aya_ebpf::{helpers::generated::bpf_jiffies64, macros::cgroup_skb, programs::SkBuffContext};
use lull_common::SlotRef;

use crate::programs::{Direction, PASS, slot_ref, stamp};

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
