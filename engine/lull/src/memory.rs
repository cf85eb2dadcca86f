//! Memory hints for the engine's big per-connection tables.
//!
//! At a million connections every table is tens of megabytes, and each timer expiry touches
//! several of them at random offsets. Two things make that cheaper: huge pages, so those
//! accesses do not also miss the TLB (on a VM, a TLB miss is a two-dimensional page walk), and
//! prefetching a batch of expiries before handling them, so their cache misses overlap.

/// Asks for transparent huge pages on the whole 2 MiB pages inside `bytes` bytes at `ptr`.
/// A hint: it does nothing where THP is disabled, and never fails.
pub(crate) fn advise_huge_pages<T>(ptr: *const T, bytes: usize) {
    const HUGE: usize = 2 << 20;
    let start = (ptr as usize).next_multiple_of(HUGE);
    let end = (ptr as usize + bytes) & !(HUGE - 1);
    if end > start {
        // SAFETY: madvise takes no memory of ours to read or write, and MADV_HUGEPAGE changes
        // no contents and no permissions of the range, so no memory is invalidated whatever
        // the range holds (callers pass whole pages of their own allocations).
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

/// Starts loading the cache line at `ptr`. A hint: never faults, even on a bad address.
#[inline(always)]
pub(crate) fn prefetch<T>(ptr: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch instructions do not fault and have no architectural effect.
    unsafe {
        core::arch::x86_64::_mm_prefetch(ptr.cast::<i8>(), core::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}
