//! Where lull's programs run during a strategy, read from the kernel and from lull's pins
//! rather than assumed: one link pair on the run's cgroup, shared by every worker, and none of
//! it in effect for the peers' sockets.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{cgroup::RunCgroup, softirq::bpf};

/// Where lull pins its builds' objects: `engine-<build>/links/<cgroup id>-<program>`.
const PIN_ROOT: &str = "/sys/fs/bpf/lull";
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_F_QUERY_EFFECTIVE: u64 = 1;
/// `enum bpf_attach_type`: the cgroup hooks lull can use.
const HOOKS: [(&str, u32); 3] = [("ingress", 0), ("egress", 1), ("sock_ops", 3)];
/// Most program ids read per hook.
const MOST: usize = 64;

/// Program ids per cgroup hook, in [`HOOKS`] order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Programs(pub [Vec<u32>; 3]);

impl Programs {
    /// The programs of `cgroup`: attached to it, or with `effective`, in effect for its
    /// sockets (its ancestors' included).
    pub fn query(cgroup: &Path, effective: bool) -> Result<Self> {
        let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let mut out = Self::default();
        for (ids_out, (name, hook)) in out.0.iter_mut().zip(HOOKS) {
            let mut ids = vec![0u32; MOST];
            // `union bpf_attr`'s `query` member: target_fd and attach_type, query_flags and
            // attach_flags, prog_ids, prog_cnt.
            let mut attr = [0u64; 16];
            attr[0] = dir.as_raw_fd() as u64 | u64::from(hook) << 32;
            attr[1] = if effective { BPF_F_QUERY_EFFECTIVE } else { 0 };
            attr[2] = ids.as_mut_ptr() as u64;
            attr[3] = MOST as u64;
            bpf(BPF_PROG_QUERY, &mut attr)
                .with_context(|| format!("BPF_PROG_QUERY {name} on {}", cgroup.display()))?;
            ids.truncate((attr[3] as u32 as usize).min(MOST));
            *ids_out = ids;
        }
        Ok(out)
    }

    pub fn count(&self) -> usize {
        self.0.iter().map(Vec::len).sum()
    }

    /// How many of these programs are also among `other`'s.
    pub fn shared_with(&self, other: &Self) -> usize {
        self.0
            .iter()
            .zip(&other.0)
            .map(|(a, b)| a.iter().filter(|id| b.contains(id)).count())
            .sum()
    }

    pub fn describe(&self) -> String {
        let hooks: Vec<String> = HOOKS
            .iter()
            .zip(&self.0)
            .filter(|(_, ids)| !ids.is_empty())
            .map(|((name, _), ids)| format!("{name} {ids:?}"))
            .collect();
        if hooks.is_empty() {
            "none".into()
        } else {
            hooks.join(", ")
        }
    }
}

/// lull's programs during one strategy's run, read once all its workers are up.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// Worker processes, each with its own engine.
    pub workers: usize,
    pub cgroup: PathBuf,
    /// lull's link pins for the run's cgroup.
    pub ours: Vec<String>,
    /// lull's link pins for any other cgroup on the host.
    pub elsewhere: Vec<String>,
    /// Programs attached to the run's cgroup itself.
    pub attached: Programs,
    /// Of those, how many are in effect for the peers' cgroup (none, unless an ancestor of
    /// both has them).
    pub on_peers: usize,
}

impl Attachment {
    pub fn read(run: &RunCgroup, workers: usize) -> Result<Self> {
        let (mut ours, mut elsewhere) = (Vec::new(), Vec::new());
        let prefix = format!("{}-", run.id());
        for pin in link_pins() {
            if pin
                .rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with(&prefix))
            {
                ours.push(pin);
            } else {
                elsewhere.push(pin);
            }
        }
        let attached = Programs::query(run.path(), false)?;
        let peers = Programs::query(run.home(), true)?;
        Ok(Self {
            workers,
            cgroup: run.path().to_path_buf(),
            ours,
            elsewhere,
            on_peers: attached.shared_with(&peers),
            attached,
        })
    }

    /// One link pair (ingress and sock_ops) for every worker, and nothing of it on the peers.
    pub fn shared(&self) -> bool {
        self.ours.len() == 2
            && self.attached.0[0].len() == 1
            && self.attached.0[2].len() == 1
            && self.on_peers == 0
    }

    pub fn describe(&self) -> String {
        let elsewhere = if self.elsewhere.is_empty() {
            "no lull link pinned for any other cgroup".to_string()
        } else {
            format!(
                "{} lull links pinned for other cgroups ({})",
                self.elsewhere.len(),
                self.elsewhere.join(", ")
            )
        };
        format!(
            "{} worker processes, {} link pins for the run's cgroup {} ({}), {elsewhere}; \
             programs attached there: {}; of them in effect for the peers' cgroup: {}",
            self.workers,
            self.ours.len(),
            self.cgroup.display(),
            self.ours.join(", "),
            self.attached.describe(),
            self.on_peers,
        )
    }
}

/// Every link lull has pinned on this host: `engine-<build>/links/<name>`.
fn link_pins() -> Vec<String> {
    let mut pins = Vec::new();
    let Ok(builds) = std::fs::read_dir(PIN_ROOT) else {
        return pins;
    };
    for build in builds.flatten() {
        let name = build.file_name().to_string_lossy().into_owned();
        if !name.starts_with("engine-") {
            continue;
        }
        let Ok(links) = std::fs::read_dir(build.path().join("links")) else {
            continue;
        };
        for link in links.flatten() {
            pins.push(format!(
                "{name}/links/{}",
                link.file_name().to_string_lossy()
            ));
        }
    }
    pins.sort();
    pins
}
