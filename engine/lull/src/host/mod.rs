//! Host mode: keepalive policy, activity and verdicts for services lull does not own.
//!
//! [`Host::start`] loads a `sock_ops` program and attaches it to the cgroups that [`Rules`]
//! name. At each connection's establishment (IPv4 or IPv6, active or passive) it finds the
//! first matching rule, sets `SO_KEEPALIVE`, `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`
//! and optionally `TCP_USER_TIMEOUT` with `bpf_setsockopt`, and turns on state callbacks for
//! that socket alone. When the socket closes the kernel classifies the close into a
//! [`Verdict`], read with [`Host::drain`]. Connections that existed before are picked up by
//! a TCP iterator ([`StartReport::pickup`]).
//!
//! Nothing runs per packet: a socket no rule matches pays one program run when it is
//! established, and a watched one a run per state change. The process holds no file
//! descriptor per connection, so it is not bound by `RLIMIT_NOFILE`, and no memory per
//! connection: what the kernel keeps per socket is a 24-byte socket-storage record.
//!
//! Everything is pinned in bpffs ([`HostPaths`]), so policy stays applied while the process
//! is down, even after SIGKILL, and a restart finds the verdicts that waited in the ring
//! buffer. [`uninstall`] takes everything away.
//!
//! ```no_run
//! # fn main() -> Result<(), lull::host::HostError> {
//! use lull::host::{Host, HostPaths, Rules};
//! let rules = Rules::from_file("/etc/lull/host.toml".as_ref())?;
//! let (mut host, report) = Host::start(rules, &HostPaths::new("host"))?;
//! println!("picked up {} connections", report.pickup.picked_total());
//! loop {
//!     host.drain(|v| {
//!         println!("{} {} {} -> {}", v.kind, v.rule, v.local, v.peer);
//!         true
//!     });
//!     host.wait(std::time::Duration::from_secs(1))?;
//! }
//! # }
//! ```

mod error;
mod iter;
mod kernel;
mod list;
pub mod netns;
mod offsets;
pub mod rules;
mod sys;
mod tables;
mod verdict;

use std::{
    os::fd::{AsFd, AsRawFd as _, BorrowedFd},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use lull_common::host::{RuleCounters, VerdictEvent};

pub use error::HostError;
pub use iter::{Missed, PickupReport};
pub use kernel::HostPaths;
pub use list::{Connection, CountersReader, ListSummary, Listing, Owner, list, list_each, owners};
pub use rules::{Action, Cidr, Keepalive, Rule, Rules, RulesError};
pub use verdict::{Verdict, VerdictKind, tcp_state_name};

use crate::activity::{cgroup_id, lock_file::LockFile};
use kernel::Kernel;

/// What [`Host::start`] found and did.
#[derive(Clone, Debug)]
pub struct StartReport {
    /// Whether an earlier run's pins were found (a restart): their state was kept.
    pub restarted: bool,
    /// Cgroup links made now (the others were kept from the earlier run).
    pub links_made: usize,
    /// Connections that existed, picked up or missed.
    pub pickup: PickupReport,
    /// When verdicts were lost (the ring buffer was full) since the last start reported any:
    /// each rule's count of lost verdicts since install. Empty when none were lost since.
    /// Their connections are gone and cannot be named.
    pub lost: Vec<(String, u64)>,
    /// The kernel's HZ, as measured.
    pub hz: u32,
}

/// What [`Host::reload`] or [`Host::maintain`] changed.
#[derive(Clone, Debug, Default)]
pub struct ReloadReport {
    /// Cgroup links made.
    pub links_made: usize,
    /// Connections picked up (ones no earlier rule matched).
    pub pickup: PickupReport,
    /// Rules whose cgroup does not exist (now): they match nothing until it does.
    pub missing: Vec<(String, PathBuf)>,
}

/// A running host-mode instance. Dropping it leaves everything pinned and applied; see
/// [`uninstall`].
pub struct Host {
    kernel: Kernel,
    paths: HostPaths,
    rules: Rules,
    cgroup_ids: Vec<u64>,
    slot_names: Vec<String>,
    ring: RingBuf<MapData>,
    hz: u32,
    _lock: LockFile,
}

impl Host {
    /// Takes the instance's lock, loads and attaches everything, applies `rules`, and picks
    /// up existing connections. Fails with [`HostError::AlreadyRunning`] if another process
    /// runs this instance.
    pub fn start(rules: Rules, paths: &HostPaths) -> Result<(Self, StartReport), HostError> {
        let mut lock = LockFile::open(&paths.lock)?;
        if !lock.try_lock_exclusive()? {
            let pid = lock.read_text().ok().and_then(|t| t.trim().parse().ok());
            return Err(HostError::AlreadyRunning {
                instance: paths.instance.clone(),
                pid,
            });
        }
        lock.write_text(&format!("{}\n", std::process::id()))?;
        let mut kernel = Kernel::load(paths)?;
        let hz = iter::measure_hz(&kernel)?;
        let ring = kernel.verdicts.take().ok_or(HostError::Missing {
            kind: "map",
            name: "HOST_VERDICTS",
        })?;
        let mut host = Self {
            kernel,
            paths: paths.clone(),
            rules: Rules {
                source: PathBuf::new(),
                rules: Vec::new(),
            },
            cgroup_ids: Vec::new(),
            slot_names: Vec::new(),
            ring,
            hz,
            _lock: lock,
        };
        let applied = host.apply(rules)?;
        let lost = host.take_lost()?;
        let report = StartReport {
            restarted: host.kernel.restarted,
            links_made: applied.links_made,
            pickup: applied.pickup,
            lost,
            hz,
        };
        Ok((host, report))
    }

    /// Puts `rules` in force for new connections, and picks up existing connections that
    /// are not watched yet. Watched connections keep their options, their records and their
    /// rule. On error the running rules stay in force.
    pub fn reload(&mut self, rules: Rules) -> Result<ReloadReport, HostError> {
        self.apply(rules)
    }

    /// Notices rule cgroups that were removed or made again (a service restart gives its
    /// cgroup a new id) and re-applies the rules when one changed. Cheap when nothing did:
    /// one `stat` per rule. Call it every second or so.
    pub fn maintain(&mut self) -> Result<Option<ReloadReport>, HostError> {
        let ids = resolve(&self.rules).0;
        if ids == self.cgroup_ids {
            return Ok(None);
        }
        self.apply(self.rules.clone()).map(Some)
    }

    fn apply(&mut self, rules: Rules) -> Result<ReloadReport, HostError> {
        let (ids, missing) = resolve(&rules);
        tables::apply(&mut self.kernel, &rules, &ids, self.hz)?;
        let links_made = self.kernel.sync_links(&cover(&rules, &ids))?;
        self.slot_names = tables::read_names(&self.kernel)?
            .iter()
            .map(|n| tables::name_of(n).to_string())
            .collect();
        self.rules = rules;
        self.cgroup_ids = ids;
        let pickup = iter::pickup(&self.kernel);
        Ok(ReloadReport {
            links_made,
            pickup,
            missing,
        })
    }

    /// The rules in force.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The paths of this instance.
    pub fn paths(&self) -> &HostPaths {
        &self.paths
    }

    /// The name of the rule in `slot` (rule slots are in verdicts and counters).
    pub fn rule_name(&self, slot: u32) -> &str {
        self.slot_names
            .get(slot as usize)
            .map_or("?", String::as_str)
    }

    /// Calls `f` with each verdict waiting, oldest first, until `f` returns false or none is
    /// left; returns how many it passed. A verdict counts as read once `f` returns, so one
    /// that `f` was handling when the process died is passed again at the next start.
    pub fn drain(&mut self, mut f: impl FnMut(Verdict) -> bool) -> usize {
        let now = (crate::clock::monotonic_ns(), SystemTime::now());
        let mut passed = 0;
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<VerdictEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole `VerdictEvent` (checked length); it is plain
            // integers, valid for every bit pattern; the read is unaligned-safe.
            let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<VerdictEvent>()) };
            let name = self
                .slot_names
                .get(usize::from(event.slot))
                .map_or("?", String::as_str)
                .to_string();
            let Some(verdict) = Verdict::from_event(&event, name, now) else {
                continue;
            };
            passed += 1;
            let more = f(verdict);
            drop(item);
            if !more {
                break;
            }
        }
        passed
    }

    /// Waits up to `timeout` for a verdict to arrive.
    pub fn wait(&self, timeout: Duration) -> Result<bool, HostError> {
        let mut fds = [libc::pollfd {
            fd: self.ring.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd; the timeout fits an int.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(HostError::syscall("poll(HOST_VERDICTS)", err));
        }
        Ok(n > 0)
    }

    /// The kernel's counts per rule slot, summed over CPUs (index = slot).
    pub fn counters(&self) -> Result<Vec<RuleCounters>, HostError> {
        read_counters(&self.kernel)
    }

    /// Each rule's lost verdicts (totals since install) if any were lost since the last report;
    /// marks them reported.
    fn take_lost(&mut self) -> Result<Vec<(String, u64)>, HostError> {
        let counters = read_counters(&self.kernel)?;
        let total: u64 = counters.iter().map(|c| c.lost).sum();
        let mut config = self
            .kernel
            .config
            .get(&0, 0)
            .map_err(|source| HostError::Map {
                name: "HOST_CONFIG",
                source,
            })?;
        if total <= config.lost_reported {
            return Ok(Vec::new());
        }
        let lost = counters
            .iter()
            .enumerate()
            .filter(|(_, c)| c.lost > 0)
            .map(|(slot, c)| (self.rule_name(slot as u32).to_string(), c.lost))
            .collect();
        config.lost_reported = total;
        self.kernel
            .config
            .set(0, config, 0)
            .map_err(|source| HostError::Map {
                name: "HOST_CONFIG",
                source,
            })?;
        Ok(lost)
    }
}

impl AsFd for Host {
    /// The verdict ring buffer: readable when verdicts wait (for epoll or an async runtime).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

/// Each rule's cgroup id (0 when its directory does not exist now), and the rules whose
/// cgroup is missing.
fn resolve(rules: &Rules) -> (Vec<u64>, Vec<(String, PathBuf)>) {
    let mut missing = Vec::new();
    let ids = rules
        .rules
        .iter()
        .map(|r| {
            cgroup_id(&r.cgroup).unwrap_or_else(|_| {
                missing.push((r.name.clone(), r.cgroup.clone()));
                0
            })
        })
        .collect();
    (ids, missing)
}

/// The cgroups to attach to: each rule's, except those below another one (the program runs
/// for a socket once per attached cgroup on its path; once is enough).
fn cover(rules: &Rules, ids: &[u64]) -> Vec<(u64, PathBuf)> {
    let paths: Vec<(u64, PathBuf)> = rules
        .rules
        .iter()
        .zip(ids)
        .filter(|(_, id)| **id != 0)
        .map(|(r, id)| {
            (
                *id,
                std::fs::canonicalize(&r.cgroup).unwrap_or_else(|_| r.cgroup.clone()),
            )
        })
        .collect();
    let mut out: Vec<(u64, PathBuf)> = Vec::new();
    for (id, path) in &paths {
        let below_another = paths
            .iter()
            .any(|(other, p)| other != id && path.starts_with(p));
        if !below_another && !out.iter().any(|(o, _)| o == id) {
            out.push((*id, path.clone()));
        }
    }
    out
}

/// Sums the per-CPU counters of every slot.
fn read_counters(kernel: &Kernel) -> Result<Vec<RuleCounters>, HostError> {
    list::sum_counters(&kernel.counters)
}

/// Whether instance `paths` runs: `Some(pid)` (0 if its lock file has no pid) or `None`.
pub fn running(paths: &HostPaths) -> Option<u32> {
    if !paths.lock.exists() {
        return None;
    }
    let mut lock = LockFile::open(&paths.lock).ok()?;
    match lock.try_lock_shared() {
        Ok(true) => None,
        Ok(false) => Some(
            lock.read_text()
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0),
        ),
        Err(_) => None,
    }
}

/// Removes everything instance `paths` attached and pinned. Refuses while it runs. Returns
/// the number of cgroup links removed. Sockets keep the options they were given; their
/// closes are no longer classified.
pub fn uninstall(paths: &HostPaths) -> Result<usize, HostError> {
    if let Some(pid) = running(paths) {
        return Err(HostError::AlreadyRunning {
            instance: paths.instance.clone(),
            pid: Some(pid).filter(|&p| p != 0),
        });
    }
    let removed = kernel::uninstall(paths)?;
    let _ = std::fs::remove_file(&paths.lock);
    Ok(removed)
}
