//! [`BenchCgroups`]: the cgroups the benchmark makes for itself, and moves between.

use std::{fs::File, os::fd::AsRawFd, path::PathBuf};

use anyhow::{Context, Result};
use lull::activity::{current_cgroup, move_self_to};

/// `<cgroup the benchmark started in>/lull-ebpf-overhead-<pid>/{in,out,anchor}`, removed on
/// drop (after moving back).
pub struct BenchCgroups {
    home: PathBuf,
    parent: PathBuf,
    inside: File,
    outside: File,
}

impl BenchCgroups {
    pub fn create() -> Result<Self> {
        let home = current_cgroup()?;
        let parent = home.join(format!("lull-ebpf-overhead-{}", std::process::id()));
        for dir in [
            parent.clone(),
            parent.join("in"),
            parent.join("out"),
            parent.join("anchor"),
        ] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        let open = |name: &str| {
            File::open(parent.join(name))
                .with_context(|| format!("opening {}", parent.join(name).display()))
        };
        Ok(Self {
            inside: open("in")?,
            outside: open("out")?,
            home,
            parent,
        })
    }

    /// Where programs are attached and detached.
    pub fn inside(&self) -> PathBuf {
        self.parent.join("in")
    }

    /// Where the benchmark itself sits while it measures, and where lull's table attaches:
    /// no measured socket lives there.
    pub fn anchor(&self) -> PathBuf {
        self.parent.join("anchor")
    }

    pub fn enter_inside(&self) -> Result<()> {
        Ok(move_self_to(&self.inside())?)
    }

    pub fn enter_outside(&self) -> Result<()> {
        Ok(move_self_to(&self.parent.join("out"))?)
    }

    pub fn enter_anchor(&self) -> Result<()> {
        Ok(move_self_to(&self.anchor())?)
    }

    /// The `cgroup_skb` ingress programs in effect for `in` and for `out` (ancestors'
    /// included), or `None` if the kernel will not say. Another process attaching to an
    /// ancestor during a window shows here.
    pub fn effective_programs(&self) -> Option<(u32, u32)> {
        Some((query(&self.inside)?, query(&self.outside)?))
    }
}

impl Drop for BenchCgroups {
    fn drop(&mut self) {
        let _ = move_self_to(&self.home);
        for dir in ["in", "out", "anchor"] {
            let _ = std::fs::remove_dir(self.parent.join(dir));
        }
        if let Err(err) = std::fs::remove_dir(&self.parent) {
            eprintln!("ebpf-overhead: removing {}: {err}", self.parent.display());
        }
    }
}

/// `BPF_PROG_QUERY` with `BPF_F_QUERY_EFFECTIVE` for `BPF_CGROUP_INET_INGRESS`.
fn query(cgroup: &File) -> Option<u32> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_F_QUERY_EFFECTIVE: u32 = 1;
    const BPF_CGROUP_INET_INGRESS: u32 = 0;
    // `union bpf_attr`'s `query` member (`include/uapi/linux/bpf.h`): target_fd, attach_type,
    // query_flags, attach_flags, prog_ids (u64, null), prog_cnt at word 6.
    let mut attr = [0u32; 16];
    attr[..3].copy_from_slice(&[
        cgroup.as_raw_fd() as u32,
        BPF_CGROUP_INET_INGRESS,
        BPF_F_QUERY_EFFECTIVE,
    ]);
    // SAFETY: `attr` is an initialised `bpf_attr` prefix of the size passed, which the kernel
    // copies in and out; with `prog_ids` null it writes nothing outside it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    (ret == 0).then_some(attr[6])
}
