//! UDP's egress program: attached to a cgroup lazily, at the first UDP flow watched there
//! with the eBPF source (see the ground rules in `pinned`).

use std::fs::File;

use aya::programs::{CgroupAttachMode, CgroupSkbAttachType, links::FdLink};
use lull_common::EGRESS_PROG;

use super::{ActivityError, EGRESS, PinnedObject, WatchedLink};

impl PinnedObject {
    /// Makes sure the egress program (UDP's tx stamps) runs for the sockets of the cgroup the
    /// last [`attach`](PinnedObject::attach) covered: reuses its pinned link, or attaches and
    /// pins one, and notes in this user's record that it relies on it. Returns the link to
    /// watch.
    pub(crate) fn attach_egress(&mut self) -> Result<WatchedLink, ActivityError> {
        let _setup = self.users.setup_lock()?;
        let (id, path) = self
            .covering
            .clone()
            .ok_or(ActivityError::MissingProgram { name: EGRESS_PROG })?;
        if !self.link_healthy(id, EGRESS, EGRESS_PROG) {
            let _ = std::fs::remove_file(self.link_path(id, EGRESS));
            let dir = File::open(&path).map_err(|source| ActivityError::File {
                action: "opening cgroup",
                path: path.clone(),
                source,
            })?;
            let attach_error = |e| {
                ActivityError::classify(format!("attaching `{EGRESS_PROG}`"), e, |source| {
                    ActivityError::Program {
                        name: EGRESS_PROG,
                        action: "attaching",
                        source,
                    }
                })
            };
            let link_id = self
                .egress
                .attach(&dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            let link: FdLink = self
                .egress
                .take_link(link_id)
                .map_err(attach_error)?
                .try_into()
                .map_err(
                    |e: aya::programs::links::LinkError| ActivityError::Syscall {
                        call: "taking a bpf_link",
                        source: std::io::Error::other(e),
                    },
                )?;
            self.pin_link(link, id, EGRESS)?;
            tracing::debug!(cgroup = %path.display(), "lull's egress program is attached (UDP)");
        }
        if !self.egress_cgroups.contains(&id) {
            self.egress_cgroups.push(id);
            if let Some(record) = &mut self.record {
                record.add_egress(id)?;
            }
        }
        self.open_link(id, EGRESS, EGRESS_PROG)
    }
}
