//! [`RunCgroup`]: the cgroup `lull run` opens its sockets in, which is the only one its eBPF
//! programs are attached to.
//!
//! By default lull makes a cgroup of its own, a child of the one it was started in, so that no
//! other process's sockets pay for its programs; `--cgroup DIR` names one instead. The
//! processes lull starts (the demo's peers) run back in the cgroup lull came from: their
//! sockets are the far end, and must not run lull's programs either.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Result;
use lull::activity::{CgroupScope, OwnCgroup, check_cgroup_dir, current_cgroup, move_self_to};

use super::args::SourceArg;
use crate::usage::usage;

/// Where this run's sockets live.
pub struct RunCgroup {
    path: PathBuf,
    /// The cgroup lull was started in.
    outside: PathBuf,
    /// Held for the run when lull made its own cgroup; dropping it removes the cgroup.
    own: Option<Arc<OwnCgroup>>,
    /// `cgroup.procs` of `outside`, opened while lull still may: after `--user` drops its
    /// privileges, opening it fails, and the demo's peers could not leave lull's cgroup.
    outside_procs: Option<File>,
}

impl RunCgroup {
    /// Moves lull into the cgroup its sockets will live in: `--cgroup DIR` if given, else one
    /// of its own. `None` when there is nothing to attach (the TCP_INFO source), or when lull
    /// may not make a cgroup and may fall back to TCP_INFO anyway.
    pub fn enter(dir: Option<&Path>, source: SourceArg) -> Result<Option<Self>> {
        let outside = current_cgroup()?;
        if let Some(dir) = dir {
            if source == SourceArg::TcpInfo {
                return Err(usage(
                    "--cgroup",
                    "the TCP_INFO source attaches nothing; drop --cgroup or use --source ebpf",
                ));
            }
            check_cgroup_dir(dir, true).map_err(|e| usage("--cgroup", e.to_string()))?;
            move_self_to(dir).map_err(|e| usage("--cgroup", e.to_string()))?;
            let outside_procs = open_procs(&outside).ok();
            return Ok(Some(Self {
                path: dir.into(),
                outside,
                own: None,
                outside_procs,
            }));
        }
        if source == SourceArg::TcpInfo {
            return Ok(None);
        }
        match OwnCgroup::shared() {
            Ok(own) => Ok(Some(Self {
                path: own.path().into(),
                outside_procs: open_procs(&outside).ok(),
                outside,
                own: Some(own),
            })),
            Err(err) if source == SourceArg::Auto => {
                tracing::warn!("cannot make a cgroup for lull's sockets: {err}");
                Ok(None)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The scope to give the engine.
    pub fn scope(&self) -> CgroupScope {
        CgroupScope::Path(self.path.clone())
    }

    /// The file a process writes `0` to in order to leave this run's cgroup for the one lull
    /// came from: the demo's peers do it between fork and exec.
    pub fn outside_procs(&self) -> Result<File> {
        match &self.outside_procs {
            Some(procs) => procs
                .try_clone()
                .map_err(|e| anyhow::anyhow!("duplicating the fd of cgroup.procs: {e}")),
            None => open_procs(&self.outside),
        }
    }
}

fn open_procs(cgroup: &Path) -> Result<File> {
    let procs = cgroup.join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", procs.display()))
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        // Our own cgroup moves us back as it goes; a named one is left as it was found.
        if self.own.take().is_none()
            && let Err(err) = move_self_to(&self.outside)
        {
            tracing::warn!("moving back to {}: {err}", self.outside.display());
        }
    }
}
