//! [`RunCgroup`]: the cgroup every worker process runs in, and no peer does.
//!
//! lull's eBPF source attaches its programs to the cgroup its process runs in. With every
//! worker of a strategy in one cgroup made for the run, all of them share one attachment (one
//! link pair, pinned once), and the peers, left in the cgroup the orchestrator runs in, have
//! sockets that run none of lull's programs: the far end of a connection is another host's
//! business. Workers move in between fork and exec, as `lull run` starts its peers outside
//! its own cgroup.

use std::{
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lull::activity::{check_cgroup_dir, current_cgroup};

/// The prefix of the run's cgroup: `lull-real-<pid>`, a child of the orchestrator's cgroup.
const PREFIX: &str = "lull-real-";

/// The run's cgroup, removed when dropped (the workers in it must have exited by then).
pub struct RunCgroup {
    path: PathBuf,
    /// The cgroup the orchestrator runs in, where the peers run too.
    home: PathBuf,
    /// The run's `cgroup.procs`, open for writing: a worker writes `0` to it before exec.
    procs: File,
    id: u64,
}

impl RunCgroup {
    /// Makes the run's cgroup, first removing any an earlier run left (its orchestrator gone).
    pub fn create() -> Result<Self> {
        let home = current_cgroup().context("finding this process's cgroup")?;
        remove_orphans(&home);
        let path = home.join(format!("{PREFIX}{}", std::process::id()));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        // From here on, dropping `run` removes the directory, whatever fails next.
        let run = Removal(path.clone());
        check_cgroup_dir(&path, true)?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", path.display()))?;
        let id = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .ino();
        std::mem::forget(run);
        Ok(Self {
            path,
            home,
            procs,
            id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup the peers (and the orchestrator) run in.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The cgroup's id (its directory's inode), as lull names its link pins.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Makes `command`'s process move into this cgroup before it runs anything, so that every
    /// socket it opens belongs here.
    pub fn enter_on_exec(&self, command: &mut Command) {
        lull_harness::process::enter_cgroup_on_exec(command, &self.procs);
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        Removal(self.path.clone()).remove();
    }
}

/// Removes a cgroup directory when dropped.
struct Removal(PathBuf);

impl Removal {
    /// Removes the cgroup, waiting up to 3 s for processes that are exiting to leave it.
    fn remove(&self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match std::fs::remove_dir(&self.0) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("real: removing cgroup {}: {e}", self.0.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Removal {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Removes the run cgroups under `home` whose orchestrator is gone (killed before it could
/// remove its own) and that hold no process any more.
fn remove_orphans(home: &Path) {
    let Ok(entries) = std::fs::read_dir(home) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_dir(entry.path()) {
            Ok(()) => eprintln!(
                "real: removed {}, left by an earlier run",
                entry.path().display()
            ),
            Err(err) => eprintln!(
                "real: {} was left by an earlier run and cannot be removed: {err}",
                entry.path().display()
            ),
        }
    }
}
