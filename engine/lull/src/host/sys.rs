//! The few `bpf(2)` commands host mode issues itself, because aya 0.14 does not expose them:
//! it does not hand out a link's fd (needed to replace a link's program in place with
//! `BPF_LINK_UPDATE`), has no `BPF_LINK_UPDATE`, and creates an iterator's file only once per
//! link (host mode creates one per network namespace).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use super::HostError;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_ITER_CREATE: libc::c_long = 33;

/// `BPF_CGROUP_SOCK_OPS`.
pub(crate) const ATTACH_CGROUP_SOCK_OPS: u32 = 3;
/// `BPF_TRACE_ITER`.
pub(crate) const ATTACH_TRACE_ITER: u32 = 28;

fn bpf(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: every caller passes a live, zero-padded attribute struct of `size` bytes laid out
    // as the kernel expects for `cmd`; pointers inside it point to live memory.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn new_fd(ret: libc::c_long) -> OwnedFd {
    // SAFETY: the syscall returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(ret as RawFd) }
}

fn c_path(path: &Path) -> Result<CString, HostError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        HostError::syscall(
            format!("pin path {}", path.display()),
            io::Error::from(io::ErrorKind::InvalidInput),
        )
    })
}

/// `BPF_OBJ_GET`: opens a pinned program, map or link.
pub(crate) fn obj_get(path: &Path) -> Result<OwnedFd, HostError> {
    let name = c_path(path)?;
    // union bpf_attr for BPF_OBJ_*: pathname, bpf_fd, file_flags, path_fd.
    let mut attr = [0u64; 3];
    attr[0] = name.as_ptr() as u64;
    bpf(BPF_OBJ_GET, attr.as_mut_ptr().cast(), size_of_val(&attr))
        .map(new_fd)
        .map_err(|e| HostError::syscall(format!("bpf(BPF_OBJ_GET) {}", path.display()), e))
}

/// `BPF_OBJ_PIN`: pins `fd` at `path` (which must not exist).
pub(crate) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<(), HostError> {
    let name = c_path(path)?;
    let mut attr = [0u64; 3];
    attr[0] = name.as_ptr() as u64;
    attr[1] = fd.as_raw_fd() as u32 as u64;
    bpf(BPF_OBJ_PIN, attr.as_mut_ptr().cast(), size_of_val(&attr))
        .map(drop)
        .map_err(|e| HostError::syscall(format!("bpf(BPF_OBJ_PIN) {}", path.display()), e))
}

/// `BPF_LINK_CREATE` of `prog` on `target` (a cgroup directory fd, or none for an iterator).
pub(crate) fn link_create(
    prog: BorrowedFd<'_>,
    target: Option<BorrowedFd<'_>>,
    attach_type: u32,
    what: &str,
) -> Result<OwnedFd, HostError> {
    // prog_fd, target_fd, attach_type, flags, then unions this code leaves zeroed.
    let mut attr = [0u32; 16];
    attr[0] = prog.as_raw_fd() as u32;
    attr[1] = target.map_or(0, |t| t.as_raw_fd() as u32);
    attr[2] = attach_type;
    bpf(
        BPF_LINK_CREATE,
        attr.as_mut_ptr().cast(),
        size_of_val(&attr),
    )
    .map(new_fd)
    .map_err(|e| HostError::syscall(format!("bpf(BPF_LINK_CREATE) {what}"), e))
}

/// `BPF_LINK_UPDATE`: makes `link` run `new_prog` instead of whatever it ran, atomically: no
/// socket sees neither program or both.
pub(crate) fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    what: &str,
) -> Result<(), HostError> {
    // link_fd, new_prog_fd, flags (0: whatever program the link runs), old_prog_fd.
    let mut attr = [link.as_raw_fd() as u32, new_prog.as_raw_fd() as u32, 0, 0];
    bpf(
        BPF_LINK_UPDATE,
        attr.as_mut_ptr().cast(),
        size_of_val(&attr),
    )
    .map(drop)
    .map_err(|e| HostError::syscall(format!("bpf(BPF_LINK_UPDATE) {what}"), e))
}

/// `BPF_ITER_CREATE`: a new run of an iterator link. The run covers the network namespace of
/// the calling thread.
pub(crate) fn iter_create(link: BorrowedFd<'_>) -> Result<std::fs::File, HostError> {
    let mut attr = [link.as_raw_fd() as u32, 0];
    bpf(
        BPF_ITER_CREATE,
        attr.as_mut_ptr().cast(),
        size_of_val(&attr),
    )
    .map(|fd| std::fs::File::from(new_fd(fd)))
    .map_err(|e| HostError::syscall("bpf(BPF_ITER_CREATE)", e))
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LinkInfo {
    /// The link's id.
    pub(crate) id: u32,
    /// The program it runs.
    pub(crate) prog_id: u32,
    /// For a cgroup link: the cgroup's id, 0 once the cgroup was removed (the link is
    /// defunct).
    pub(crate) cgroup_id: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub(crate) fn link_info(link: BorrowedFd<'_>) -> Result<LinkInfo, HostError> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned union whose cgroup
    // member starts with `__u64 cgroup_id`. Oversized and zeroed, as the kernel accepts.
    let mut info = [0u64; 16];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&raw mut attr).cast(),
        size_of::<InfoAttr>(),
    )
    .map_err(|e| HostError::syscall("bpf(BPF_OBJ_GET_INFO_BY_FD) on a link", e))?;
    Ok(LinkInfo {
        id: (info[0] >> 32) as u32,
        prog_id: info[1] as u32,
        cgroup_id: info[2],
    })
}

/// The id of a program, from its fd.
pub(crate) fn prog_id(prog: BorrowedFd<'_>) -> Result<u32, HostError> {
    // struct bpf_prog_info begins with type (u32) and id (u32).
    let mut info = [0u32; 64];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&raw mut attr).cast(),
        size_of::<InfoAttr>(),
    )
    .map_err(|e| HostError::syscall("bpf(BPF_OBJ_GET_INFO_BY_FD) on a program", e))?;
    Ok(info[1])
}

/// Moves the calling thread into the network namespace `ns` (an open `/proc/PID/ns/net`).
/// Only for threads made for it: the thread stays there.
pub(crate) fn setns_net(ns: BorrowedFd<'_>) -> Result<(), HostError> {
    // SAFETY: setns on an fd the caller keeps open for the call; it changes only the calling
    // thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(HostError::last_os("setns(CLONE_NEWNET)"));
    }
    Ok(())
}

/// Runs `f` on a new thread that has joined the network namespace `ns` (an open
/// `/proc/PID/ns/net`). Only that thread changes namespace.
pub(crate) fn in_netns<T: Send>(
    ns: BorrowedFd<'_>,
    f: impl FnOnce() -> Result<T, HostError> + Send,
) -> Result<T, HostError> {
    let raw = ns.as_raw_fd();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on an fd the caller keeps open for the call; it changes only
                // this (new, scoped) thread's network namespace.
                if unsafe { libc::setns(raw, libc::CLONE_NEWNET) } != 0 {
                    return Err(HostError::last_os("setns(CLONE_NEWNET)"));
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(HostError::syscall(
                    "a network-namespace thread panicked",
                    io::Error::other("panic"),
                ))
            })
    })
}
