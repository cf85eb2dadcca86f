//! Small helpers of host mode's programs: loads at BTF offsets, addresses, socket storage,
//! clocks.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    helpers::generated::{
        bpf_jiffies64, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_seq_write, bpf_sk_storage_get,
    },
    programs::SockOpsContext,
};

use super::{
    AF_INET, HOST_DADDR_OFF, HOST_DPORT_OFF, HOST_FAMILY_OFF, HOST_NUM_OFF, HOST_SADDR_OFF,
    HOST_SOCKS, HOST_V6_DADDR_OFF, HOST_V6_SADDR_OFF,
};

/// The value of an offset global.
#[inline(always)]
pub(super) fn off(global: &'static u32) -> usize {
    // SAFETY: a plain read of a global; volatile so that the compiler keeps the load from
    // `.rodata` (which the verifier then sees as a constant) instead of folding in 0.
    unsafe { ptr::read_volatile(global) as usize }
}

/// (family, local address, local port, remote address, remote port) of a `tcp_sock`;
/// addresses in network byte order, IPv4 in the first four bytes.
#[inline(always)]
pub(super) fn addresses(tp: *const u8) -> (u16, [u8; 16], u16, [u8; 16], u16) {
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
pub(super) fn ctx_ip6(ctx: &SockOpsContext, local: bool) -> [u8; 16] {
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
pub(super) fn v4_mapped(ip4: u32) -> [u8; 16] {
    let b = ip4.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

#[inline(always)]
pub(super) fn ip4_bytes(ip4: u32) -> [u8; 16] {
    let b = ip4.to_ne_bytes();
    [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

#[inline(always)]
pub(super) fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
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
pub(super) unsafe fn load<T: Copy>(base: *const u8, offset: usize) -> T {
    // SAFETY: upheld by the caller; the verifier checks the access against BTF.
    unsafe { ptr::read_volatile(base.add(offset).cast::<T>()) }
}

/// 16 bytes at `base + offset`, as four 4-byte loads.
///
/// # Safety
/// As for [`load`].
#[inline(always)]
pub(super) unsafe fn load16(base: *const u8, offset: usize) -> [u8; 16] {
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
pub(super) unsafe fn read_kernel<T: Copy + Default>(src: *const u8) -> T {
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
pub(super) unsafe fn storage_get(sk: *mut c_void, value: *mut c_void, flags: u64) -> *mut c_void {
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
pub(super) fn seq_write<T>(seq: *mut c_void, value: &T) {
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
pub(super) fn now_ns() -> u64 {
    // SAFETY: no arguments, cannot fail.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub(super) fn jiffies() -> u64 {
    // SAFETY: no arguments, cannot fail.
    unsafe { bpf_jiffies64() }
}
