//! The few `bpf(2)` commands host mode issues itself, because aya 0.14 does not expose them:
//! it does not hand out a link's fd (needed to replace a link's program in place with
//! `BPF_LINK_UPDATE`), has no `BPF_LINK_UPDATE`, and creates an iterator's file only once per
//! link (host mode creates one per network namespace).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use super::HostError;
use crate::bpf_syscall::{
    BPF_ITER_CREATE, BPF_LINK_CREATE, BPF_LINK_UPDATE, BPF_OBJ_GET, BPF_OBJ_PIN, bpf, new_fd,
};

/// `BPF_CGROUP_SOCK_OPS`.
pub(crate) const ATTACH_CGROUP_SOCK_OPS: u32 = 3;
/// `BPF_TRACE_ITER`.
pub(crate) const ATTACH_TRACE_ITER: u32 = 28;

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
