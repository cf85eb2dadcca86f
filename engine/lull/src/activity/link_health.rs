//! Noticing that another process detached our programs.
//!
//! aya's `LinkInfo` does not expose the attach target, so this reads `bpf_link_info` with the
//! raw syscall ([`bpf_syscall`](crate::bpf_syscall)). A cgroup link that was detached with `BPF_LINK_DETACH` (for example by
//! `bpftool link detach`) stays alive as long as we hold it, but reports cgroup id 0.

use std::os::fd::{AsFd as _, OwnedFd};

use super::ActivityError;
use crate::bpf_syscall::{link_fd_by_id, link_info};

/// One of our links, watched for detachment.
pub(crate) struct WatchedLink {
    pub(crate) program: &'static str,
    pub(crate) link_id: u32,
    fd: OwnedFd,
}

impl WatchedLink {
    pub(crate) fn open(program: &'static str, link_id: u32) -> Result<Self, ActivityError> {
        let fd = link_fd_by_id(link_id).map_err(|source| ActivityError::Syscall {
            call: "bpf(BPF_LINK_GET_FD_BY_ID)",
            source,
        })?;
        Ok(Self {
            program,
            link_id,
            fd,
        })
    }

    /// Whether the link is still attached to a cgroup.
    pub(crate) fn attached(&self) -> Result<bool, ActivityError> {
        let info = link_info(self.fd.as_fd()).map_err(|source| ActivityError::Syscall {
            call: "bpf(BPF_OBJ_GET_INFO_BY_FD) on a link",
            source,
        })?;
        Ok(info.cgroup_id != 0)
    }
}
