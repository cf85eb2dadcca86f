//! [`SharedMapping`]: the value area of a `BPF_F_MMAPABLE` array map, mapped into this process.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
};

/// A `mmap(MAP_SHARED)` of a BPF array map's values, unmapped on drop. The kernel and other
/// processes write the same memory, so every access through it must be atomic.
pub(crate) struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory that lives until drop; what may be done with it
// (atomics only) is the business of the typed views built on it.
unsafe impl Send for SharedMapping {}
// SAFETY: as above.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps the first `bytes` bytes (rounded up to pages) of the map behind `map_fd`.
    pub(crate) fn map(map_fd: BorrowedFd<'_>, bytes: usize) -> io::Result<Self> {
        let page = page_size();
        let len = bytes.max(1).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of a map fd; the kernel checks that `len` does not
        // exceed the map's value area and that the map is mmapable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map_fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { ptr, len })
    }

    /// The start of the mapping, page-aligned.
    pub(crate) fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what `mmap` returned, and the views built on the
        // mapping borrow it, so none outlives it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf takes a name, touches no memory of ours, and returns -1 for a name it
    // does not know.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4096)
}
