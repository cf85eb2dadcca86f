//! [`HostUsers`]: who on this host uses one build's pinned programs, and which cgroups.
//!
//! Each user (one per [`PinnedObject`](super::pinned::PinnedObject), so one per engine or
//! group) keeps a record file in `/run/lull/<build>/users/`, locked while it lives, listing
//! the cgroups it relies on. Because the kernel releases the lock of a process that dies, a
//! record that can be locked by someone else is a dead user's: the next user to look removes
//! it. That makes "the last user" a question with an exact answer even after SIGKILL.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use super::{
    ActivityError,
    lock_file::{LockFile, RUN_DIR},
};

/// lull's own directory in bpffs, where each build pins its programs and maps.
pub const PIN_ROOT: &str = "/sys/fs/bpf/lull";

/// The `/run/lull/<build>/` directory of one build.
#[derive(Clone, Debug)]
pub(crate) struct HostUsers {
    run: PathBuf,
}

/// A live user, as its record says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostUser {
    /// The user's process.
    pub pid: u32,
    /// The cgroups it relies on: id and path.
    pub cgroups: Vec<(u64, PathBuf)>,
    /// The cgroups (by id) on which it relies on the egress program: it watches UDP flows
    /// there with the eBPF source.
    pub egress: Vec<u64>,
}

/// `setup.lock`, held exclusively; released on drop.
pub(crate) struct SetupGuard {
    _lock: LockFile,
}

impl HostUsers {
    pub(crate) fn new(run: PathBuf) -> Self {
        Self { run }
    }

    /// The directory of extent leases.
    pub(crate) fn extents_dir(&self) -> PathBuf {
        self.run.join("extents")
    }

    /// Waits for the build's setup lock. It is never removed: a waiter on a removed lock file
    /// would hold a lock nobody else can see.
    pub(crate) fn setup_lock(&self) -> Result<SetupGuard, ActivityError> {
        let lock = LockFile::open(&self.run.join("setup.lock"))?;
        lock.lock_exclusive()?;
        Ok(SetupGuard { _lock: lock })
    }

    /// Makes and locks this user's record.
    pub(crate) fn register(&self) -> Result<UserRecord, ActivityError> {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let path = self.run.join("users").join(format!("{pid}.{n}"));
        let lock = LockFile::open(&path)?;
        lock.lock_exclusive()?;
        let mut record = UserRecord {
            lock,
            path,
            pid,
            cgroups: Vec::new(),
            egress: Vec::new(),
        };
        record.write()?;
        Ok(record)
    }

    /// The live users, removing the records of dead ones on the way.
    pub(crate) fn live(&self) -> Vec<HostUser> {
        let Ok(entries) = std::fs::read_dir(self.run.join("users")) else {
            return Vec::new();
        };
        let mut live = Vec::new();
        for entry in entries.flatten() {
            let Ok(mut lock) = LockFile::open(&entry.path()) else {
                continue;
            };
            match lock.try_lock_shared() {
                // Lockable: its owner is gone.
                Ok(true) => {
                    let _ = std::fs::remove_file(entry.path());
                }
                Ok(false) => {
                    if let Some(user) = lock.read_text().ok().and_then(|t| parse_record(&t)) {
                        live.push(user);
                    }
                }
                Err(err) => tracing::warn!("{err}"),
            }
        }
        live
    }

    /// The cgroups live users rely on.
    pub(crate) fn attached_cgroups(&self) -> Vec<(u64, PathBuf)> {
        let mut all: Vec<_> = self.live().into_iter().flat_map(|u| u.cgroups).collect();
        all.sort();
        all.dedup();
        all
    }

    /// Removes the records and leases of a build nobody uses any more (not `setup.lock`).
    pub(crate) fn remove_all(&self) {
        let _ = std::fs::remove_dir_all(self.run.join("users"));
        let _ = std::fs::remove_dir_all(self.extents_dir());
    }
}

/// One user's record, locked while the user lives; removed on drop.
pub(crate) struct UserRecord {
    lock: LockFile,
    path: PathBuf,
    pid: u32,
    cgroups: Vec<(u64, PathBuf)>,
    egress: Vec<u64>,
}

impl UserRecord {
    /// Notes that this user relies on the programs attached to `cgroup`.
    pub(crate) fn add_cgroup(&mut self, id: u64, path: &Path) -> Result<(), ActivityError> {
        self.cgroups.push((id, path.into()));
        self.write()
    }

    /// Notes that this user relies on the egress program attached to `cgroup` (UDP).
    pub(crate) fn add_egress(&mut self, id: u64) -> Result<(), ActivityError> {
        self.egress.push(id);
        self.write()
    }

    fn write(&mut self) -> Result<(), ActivityError> {
        let mut text = format!("pid {}\n", self.pid);
        for (id, path) in &self.cgroups {
            text.push_str(&format!("cgroup {id} {}\n", path.display()));
        }
        for id in &self.egress {
            text.push_str(&format!("egress {id}\n"));
        }
        self.lock.write_text(&text)
    }
}

impl Drop for UserRecord {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn parse_record(text: &str) -> Option<HostUser> {
    let mut user = HostUser {
        pid: 0,
        cgroups: Vec::new(),
        egress: Vec::new(),
    };
    for line in text.lines() {
        if let Some(pid) = line.strip_prefix("pid ") {
            user.pid = pid.trim().parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("cgroup ") {
            let (id, path) = rest.split_once(' ')?;
            user.cgroups.push((id.parse().ok()?, PathBuf::from(path)));
        } else if let Some(id) = line.strip_prefix("egress ") {
            user.egress.push(id.trim().parse().ok()?);
        }
    }
    (user.pid != 0).then_some(user)
}

/// What one build has pinned on this host and who uses it, for `lull check`.
#[derive(Clone, Debug)]
pub struct PinnedBuild {
    /// The build's pin directory.
    pub dir: PathBuf,
    /// The cgroups its programs are attached to (by the ids in the link pins' names), with
    /// their paths where a live user's record gives them.
    pub links: Vec<(u64, Option<PathBuf>)>,
    /// The processes using it.
    pub users: Vec<HostUser>,
    /// The cgroups (by id) where its egress program is attached, for UDP flows.
    pub egress: Vec<u64>,
}

/// Every lull build pinned on this host.
pub fn pinned_builds() -> Vec<PinnedBuild> {
    let Ok(entries) = std::fs::read_dir(PIN_ROOT) else {
        return Vec::new();
    };
    let mut builds = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Host mode (`lull host`) pins under the same root, with a layout of its own.
        if !name.starts_with("engine-") {
            continue;
        }
        let users = HostUsers::new(Path::new(RUN_DIR).join(&name)).live();
        let mut links: Vec<(u64, Option<PathBuf>)> = std::fs::read_dir(entry.path().join("links"))
            .map(|links| {
                links
                    .flatten()
                    .filter_map(|l| {
                        let name = l.file_name().to_string_lossy().into_owned();
                        name.strip_suffix("-ingress")?.parse::<u64>().ok()
                    })
                    .map(|id| {
                        let path = users
                            .iter()
                            .flat_map(|u| &u.cgroups)
                            .find(|c| c.0 == id)
                            .map(|c| c.1.clone());
                        (id, path)
                    })
                    .collect()
            })
            .unwrap_or_default();
        links.sort();
        let mut egress: Vec<u64> = std::fs::read_dir(entry.path().join("links"))
            .map(|links| {
                links
                    .flatten()
                    .filter_map(|l| {
                        let name = l.file_name().to_string_lossy().into_owned();
                        name.strip_suffix("-egress")?.parse::<u64>().ok()
                    })
                    .collect()
            })
            .unwrap_or_default();
        egress.sort_unstable();
        builds.push(PinnedBuild {
            dir: entry.path(),
            links,
            users,
            egress,
        });
    }
    builds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_dead_users_are_removed() {
        let run = std::env::temp_dir().join(format!("lull-users-test-{}", std::process::id()));
        let users = HostUsers::new(run.clone());
        let mut me = users.register().unwrap();
        me.add_cgroup(42, Path::new("/sys/fs/cgroup/a b")).unwrap();
        me.add_egress(42).unwrap();
        let other = users.register().unwrap();
        assert_eq!(users.live().len(), 2);
        assert_eq!(
            users.attached_cgroups(),
            vec![(42, PathBuf::from("/sys/fs/cgroup/a b"))]
        );
        // A record nobody holds any more is a dead user's: make one by hand.
        std::fs::write(run.join("users").join("999999.0"), "pid 999999\n").unwrap();
        drop(other);
        let live = users.live();
        assert_eq!(live.len(), 1, "{live:?}");
        assert_eq!(live[0].pid, std::process::id());
        assert_eq!(live[0].egress, vec![42]);
        assert!(!run.join("users").join("999999.0").exists());
        drop(me);
        assert!(users.live().is_empty());
        std::fs::remove_dir_all(run).unwrap();
    }
}
