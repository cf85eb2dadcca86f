//! The raw `bpf(2)` commands lull issues itself, because aya 0.14 does not expose them: link
//! info with its attach target, a link's fd by id, and (for host mode, in
//! [`host::sys`](crate::host)) pinning, link creation and update, and iterator runs.
//!
//! Each returns the bare `io::Error`; callers name the call in their own domain's error.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

pub(crate) const BPF_OBJ_PIN: libc::c_long = 6;
pub(crate) const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub(crate) const BPF_LINK_CREATE: libc::c_long = 28;
pub(crate) const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
pub(crate) const BPF_ITER_CREATE: libc::c_long = 33;

/// `bpf(cmd, attr, size)`.
pub(crate) fn bpf(
    cmd: libc::c_long,
    attr: *mut libc::c_void,
    size: usize,
) -> io::Result<libc::c_long> {
    // SAFETY: every caller passes a live, zero-padded attribute struct of `size` bytes laid out
    // as the kernel expects for `cmd`; pointers inside it point to live memory of the length
    // they declare.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of the fd a successful `bpf` command returned.
pub(crate) fn new_fd(ret: libc::c_long) -> OwnedFd {
    // SAFETY: the syscall returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(ret as RawFd) }
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LinkInfo {
    /// The link's id.
    pub(crate) id: u32,
    /// The program it runs.
    pub(crate) prog_id: u32,
    /// For a cgroup link: the cgroup's id, 0 once the cgroup was removed or the link was
    /// detached (`BPF_LINK_DETACH`, e.g. by `bpftool link detach`): the link is defunct.
    pub(crate) cgroup_id: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info`, which the kernel fills up to its own struct's size.
fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut [T]) -> io::Result<()> {
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&raw mut attr).cast(),
        size_of::<InfoAttr>(),
    )
    .map(drop)
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub(crate) fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned union whose cgroup
    // member starts with `__u64 cgroup_id`. Oversized and zeroed, as the kernel accepts.
    let mut info = [0u64; 16];
    obj_info(link, &mut info)?;
    Ok(LinkInfo {
        id: (info[0] >> 32) as u32,
        prog_id: info[1] as u32,
        cgroup_id: info[2],
    })
}

/// The id of a program, from its fd.
pub(crate) fn prog_id(prog: BorrowedFd<'_>) -> io::Result<u32> {
    // struct bpf_prog_info begins with type (u32) and id (u32).
    let mut info = [0u32; 64];
    obj_info(prog, &mut info)?;
    Ok(info[1])
}

/// `BPF_LINK_GET_FD_BY_ID`: a new fd for the link with id `link_id`.
pub(crate) fn link_fd_by_id(link_id: u32) -> io::Result<OwnedFd> {
    // bpf_attr for BPF_LINK_GET_FD_BY_ID: { link_id: u32, next_id: u32, open_flags: u32 }.
    let mut attr = [0u32; 4];
    attr[0] = link_id;
    bpf(
        BPF_LINK_GET_FD_BY_ID,
        attr.as_mut_ptr().cast(),
        size_of_val(&attr),
    )
    .map(new_fd)
}
