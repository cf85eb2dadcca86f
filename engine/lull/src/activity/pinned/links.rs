//! Opening a cgroup's pinned links, to reuse them and to watch that they stay attached.

use aya::programs::links::{FdLink, PinnedLink};

use super::{ActivityError, PinnedObject, WatchedLink};

impl PinnedObject {
    /// Whether `cgroup`'s link of `program` (pinned with `suffix`) is pinned and attached.
    pub(super) fn link_healthy(&self, cgroup: u64, suffix: &str, program: &'static str) -> bool {
        self.open_link(cgroup, suffix, program)
            .is_ok_and(|watched| watched.attached().unwrap_or(false))
    }

    /// Opens `cgroup`'s pinned link of `program` (pinned with `suffix`) to watch it.
    pub(super) fn open_link(
        &self,
        cgroup: u64,
        suffix: &str,
        program: &'static str,
    ) -> Result<WatchedLink, ActivityError> {
        let path = self.link_path(cgroup, suffix);
        let link = PinnedLink::from_pin(&path).map_err(|e| ActivityError::Pin {
            action: "opening",
            path: path.clone(),
            source: e.into(),
        })?;
        let info = FdLink::from(link).info().map_err(|e| ActivityError::Pin {
            action: "reading",
            path: path.clone(),
            source: e.into(),
        })?;
        WatchedLink::open(program, info.id())
    }
}
