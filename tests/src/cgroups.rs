//! [`TestCgroup`]: a cgroup v2 directory a test makes for itself, and leaves.

use std::path::{Path, PathBuf};

use lull::activity::{current_cgroup, move_self_to};

/// A child of this process's cgroup, made for one test; dropping it moves the process back
/// and removes the directory.
pub struct TestCgroup {
    path: PathBuf,
    home: PathBuf,
}

impl TestCgroup {
    /// Makes `lull-test-<name>-<pid>` next to nothing else: a child of the current cgroup.
    ///
    /// # Panics
    /// If the directory cannot be made: the test cannot go on without it.
    pub fn new(name: &str) -> Self {
        let home = current_cgroup().expect("this process's cgroup");
        let path = home.join(format!("lull-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path, home }
    }

    /// Moves this whole process in: sockets it opens from now on belong here.
    pub fn enter(&self) {
        move_self_to(&self.path).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Moves this process back to where it was.
    pub fn leave(&self) {
        move_self_to(&self.home).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = move_self_to(&self.home);
        let _ = std::fs::remove_dir(&self.path);
    }
}
