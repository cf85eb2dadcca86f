//! What lull keeps on the host between processes, as a test sees it from outside: the pin
//! directories in bpffs, the user records and extent leases in `/run/lull`, and which process
//! holds which lock (`/proc/locks`).

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Child,
};

use lull::activity::PIN_ROOT;

/// Where lull keeps its lock files (`lull::activity`'s `RUN_DIR`).
pub const RUN_ROOT: &str = "/run/lull";

/// A child process that is killed (SIGKILL) and reaped when dropped, so a failing test never
/// leaves one running into the next test.
pub struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    /// Takes charge of `child`.
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// The child itself, no longer killed on drop (to wait for its output).
    pub fn into_inner(mut self) -> Child {
        self.0.take().expect("taken once")
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child, which has not been reaped (we hold it).
        unsafe { libc::kill(self.id() as libc::pid_t, signal) };
    }

    /// SIGKILLs the child and reaps it.
    pub fn kill(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every lull build's pin directory in bpffs (`/sys/fs/bpf/lull/engine-*`).
pub fn pin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(PIN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("engine-"))
        })
        .collect();
    dirs.sort();
    dirs
}

/// The `/run/lull/<build>` directory that goes with a pin directory.
pub fn run_dir(pin_dir: &Path) -> PathBuf {
    Path::new(RUN_ROOT).join(pin_dir.file_name().expect("a pin directory has a name"))
}

/// The user records of process `pid` (`/run/lull/<build>/users/<pid>.<n>`), of any build.
pub fn user_records(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("{pid}.");
    let mut records: Vec<PathBuf> = std::fs::read_dir(RUN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|build| {
            std::fs::read_dir(build.path().join("users"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    records.sort();
    records
}

/// The `flock` locks held now, by (device as `/proc/locks` writes it, inode): the holder's pid.
fn flock_holders() -> HashMap<(String, u64), u32> {
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks
        .lines()
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF"; blocked waiters have "->".
        .filter(|l| !l.contains("->"))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(1) != Some(&"FLOCK") {
                return None;
            }
            let pid = fields.get(4)?.parse().ok()?;
            let (dev, ino) = fields.get(5)?.rsplit_once(':')?;
            Some(((dev.to_string(), ino.parse().ok()?), pid))
        })
        .collect()
}

/// The pid holding a `flock` on `path`, if any.
pub fn lock_holder(path: &Path) -> Option<u32> {
    let meta = std::fs::metadata(path).ok()?;
    let dev = meta.dev();
    let key = (
        format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev)),
        meta.ino(),
    );
    flock_holders().get(&key).copied()
}

/// An extent lease file (`/run/lull/<build>/extents/<k>`) and the epoch written in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The lease file.
    pub path: PathBuf,
    /// The epoch of its latest lease.
    pub epoch: u32,
}

/// The extents of `build` (its `/run/lull` directory) leased by `pid` now.
pub fn leases_of(run_dir: &Path, pid: u32) -> Vec<Lease> {
    let mut leases: Vec<Lease> = std::fs::read_dir(run_dir.join("extents"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| lock_holder(p) == Some(pid))
        .map(|path| Lease {
            epoch: std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0),
            path,
        })
        .collect();
    leases.sort_by(|a, b| a.path.cmp(&b.path));
    leases
}

/// The pinned links of a build (`<pin dir>/links/*`), by file name.
pub fn pinned_links(pin_dir: &Path) -> Vec<String> {
    let mut links: Vec<String> = std::fs::read_dir(pin_dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    links.sort();
    links
}
