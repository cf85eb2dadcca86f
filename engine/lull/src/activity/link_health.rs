//! Noticing that another process detached our programs.
//!
//! aya's `LinkInfo` does not expose the attach target, so this reads `bpf_link_info` with the
//! raw syscall. A cgroup link that was detached with `BPF_LINK_DETACH` (for example by
//! `bpftool link detach`) stays alive as long as we hold it, but reports cgroup id 0.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

use super::ActivityError;

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// One of our links, watched for detachment.
pub(crate) struct WatchedLink {
    pub(crate) program: &'static str,
    pub(crate) link_id: u32,
    fd: OwnedFd,
}

impl WatchedLink {
    pub(crate) fn open(program: &'static str, link_id: u32) -> Result<Self, ActivityError> {
        // bpf_attr for BPF_LINK_GET_FD_BY_ID: { link_id: u32, next_id: u32, open_flags: u32 }.
        let mut attr = [0u32; 4];
        attr[0] = link_id;
        let fd = bpf(
            BPF_LINK_GET_FD_BY_ID,
            attr.as_mut_ptr().cast(),
            size_of_val(&attr),
        )
        .map_err(|source| ActivityError::Syscall {
            call: "bpf(BPF_LINK_GET_FD_BY_ID)",
            source,
        })?;
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(Self {
            program,
            link_id,
            fd,
        })
    }

    /// Whether the link is still attached to a cgroup.
    pub(crate) fn attached(&self) -> Result<bool, ActivityError> {
        // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned union whose
        // cgroup member starts with `__u64 cgroup_id`. Oversized and zeroed, as the kernel
        // accepts.
        let mut info = [0u64; 16];
        #[repr(C)]
        struct InfoAttr {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut attr = InfoAttr {
            bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&self.fd) as u32,
            info_len: size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        bpf(
            BPF_OBJ_GET_INFO_BY_FD,
            (&raw mut attr).cast(),
            size_of::<InfoAttr>(),
        )
        .map_err(|source| ActivityError::Syscall {
            call: "bpf(BPF_OBJ_GET_INFO_BY_FD) on a link",
            source,
        })?;
        Ok(info[2] != 0)
    }
}

fn bpf(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: `attr` points to a live buffer of `size` bytes laid out as the kernel expects for
    // `cmd`; any pointer inside it points to live memory of the length it declares.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
