//! The cost ladder: `cgroup_skb` ingress programs that each add one step of lull's per-packet
//! work, so that the `ebpf-overhead` benchmark can say what each step costs on the machine it
//! runs on. lull itself never attaches them.
//!
//! | program | does, per packet |
//! |---|---|
//! | `lull_empty_ingress` | nothing: the hook's own cost, the floor |
//! | `lull_step_lookup` | the socket-storage lookup (all an unwatched socket pays) |
//! | `lull_ingress` | lull's program: lookup and jiffies compare, the rest once per jiffy |
//! | `lull_step_parse` | lookup, and the header read in place on every packet |
//! | `lull_step_stamp` | lookup, header, clock read and row store on every packet (the old way) |

use core::ptr;

use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, macros::cgroup_skb, programs::SkBuffContext};

use crate::programs::{PASS, Segment, registered_entry, slot_ref};

#[cgroup_skb]
pub fn lull_empty_ingress(_ctx: SkBuffContext) -> i32 {
    PASS
}

#[cgroup_skb]
pub fn lull_step_lookup(ctx: SkBuffContext) -> i32 {
    // SAFETY: reading a context field; the verifier rewrites it to a checked load.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if !sk.is_null() {
        let _ = slot_ref(sk.cast());
    }
    PASS
}

#[cgroup_skb]
pub fn lull_step_parse(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: as above.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if !sk.is_null() && slot_ref(sk.cast()).is_some() {
        // Volatile, so that the unused header is still read.
        if let Some(seg) = Segment::parse(skb) {
            // SAFETY: a stack value, read back at once.
            unsafe { ptr::read_volatile(&seg.ack) };
        }
    }
    PASS
}

#[cgroup_skb]
pub fn lull_step_stamp(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: as above.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    let Some(st) = slot_ref(sk.cast()) else {
        return PASS;
    };
    let Some(seg) = Segment::parse(skb) else {
        return PASS;
    };
    if let Some((entry, _, _)) = registered_entry(st) {
        // SAFETY: the helper takes no arguments and cannot fail.
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: `entry` points into the array map's value area for the whole program run;
        // the field is 8-byte aligned, so the store is one instruction.
        unsafe {
            if seg.payload > 0 {
                ptr::addr_of_mut!((*entry).last_rx_ns).write_volatile(now);
            } else {
                ptr::addr_of_mut!((*entry).last_tx_ns).write_volatile(now);
            }
        }
    }
    PASS
}
