//! [`ActivityTable`]: lull's eBPF program, loaded, attached, and mapped into this process.

use std::{
    fs::File,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, SkStorage},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps,
        links::{FdLink, LinkError},
    },
};
use aya_log::EbpfLogger;
use lull_common::{ACTIVITY_MAP, EGRESS_PROG, INGRESS_PROG, SLOTS_MAP, SOCK_OPS_PROG, SlotRef};

use super::{
    Activity, ActivityError, ActivitySource, Grace, Slot, SlotAllocator, SourceKind,
    cgroup::cgroup2_root, link_health::WatchedLink, rows::Rows,
};

#[cfg(lull_embedded_bpf)]
pub(crate) static BPF_OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/lull.bpf.o"
)));
#[cfg(not(lull_embedded_bpf))]
pub(crate) static BPF_OBJECT: Option<&[u8]> = None;

/// Whether this build carries the BPF object (built by `cargo xtask build-ebpf`).
pub fn bpf_object_embedded() -> bool {
    BPF_OBJECT.is_some()
}

/// How to load an [`ActivityTable`].
#[derive(Clone, Debug)]
pub struct TableOptions {
    /// Number of slots, i.e. the most sockets registered at once. The kernel allocates
    /// 24 bytes per slot up front.
    pub capacity: u32,
    /// The cgroup v2 directory to attach to. Sockets of processes in it and below are seen.
    /// `None` means the root of the hierarchy, found in `/proc/mounts`.
    pub cgroup: Option<PathBuf>,
}

impl Default for TableOptions {
    fn default() -> Self {
        Self {
            capacity: 1 << 16,
            cgroup: None,
        }
    }
}

/// The eBPF activity tracker: per registered socket, the last time payload went in and out,
/// and whether it closed, readable without a system call.
///
/// Loading attaches three programs to a cgroup: `cgroup_skb` ingress and egress, which stamp
/// the table for every packet of a registered socket (and do one storage lookup, nothing more,
/// for any other socket), and `sock_ops`, which marks sockets that die of a timeout. Dropping
/// the table detaches them; nothing is pinned, so nothing outlives the process, even after
/// SIGKILL.
pub struct ActivityTable {
    // Field order is drop order: detach the links (by dropping them) before the programs and
    // maps go.
    _links: Vec<FdLink>,
    watched: Vec<WatchedLink>,
    slots_map: Mutex<SkStorage<MapData, SlotRef>>,
    rows: Rows,
    allocator: SlotAllocator,
    logger: Mutex<Option<EbpfLogger<&'static dyn log::Log>>>,
    cgroup: PathBuf,
    _ebpf: Ebpf,
    _activity_map: Map,
    detached: AtomicBool,
}

impl ActivityTable {
    /// Loads the embedded BPF object and attaches it.
    ///
    /// Needs CAP_BPF and CAP_NET_ADMIN (or root); fails with
    /// [`ActivityError::NotPermitted`] without them, and with [`ActivityError::NoBpfObject`]
    /// when this build has no object.
    pub fn load(options: &TableOptions) -> Result<Self, ActivityError> {
        let object = BPF_OBJECT.ok_or(ActivityError::NoBpfObject)?;
        let cgroup = match &options.cgroup {
            Some(path) => path.clone(),
            None => cgroup2_root()?,
        };
        let cgroup_dir = File::open(&cgroup).map_err(|source| ActivityError::File {
            action: "opening cgroup",
            path: cgroup.clone(),
            source,
        })?;
        let capacity = options.capacity.max(1);

        let level = kernel_log_level();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(ACTIVITY_MAP, capacity)
            .override_global(aya_log::LEVEL, &level, false)
            .load(object)
            .map_err(|e| {
                ActivityError::classify("loading lull's BPF object", e, ActivityError::Load)
            })?;

        // The logger must exist before the programs load: they refer to its ring buffer.
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                tracing::warn!("kernel-side log messages are unavailable: {err}");
                None
            }
        };

        let activity_map = ebpf
            .take_map(ACTIVITY_MAP)
            .ok_or(ActivityError::MissingMap { name: ACTIVITY_MAP })?;
        let rows = match &activity_map {
            Map::Array(data) => Rows::map(data.fd().as_fd(), capacity as usize),
            _ => {
                return Err(ActivityError::MissingMap { name: ACTIVITY_MAP });
            }
        }
        .map_err(|source| ActivityError::Syscall {
            call: "mmap(LULL_ACTIVITY)",
            source,
        })?;
        let slots_map: SkStorage<MapData, SlotRef> = ebpf
            .take_map(SLOTS_MAP)
            .ok_or(ActivityError::MissingMap { name: SLOTS_MAP })?
            .try_into()
            .map_err(|source| ActivityError::Map {
                name: SLOTS_MAP,
                source,
            })?;

        let mut links = Vec::new();
        let mut watched = Vec::new();
        for (name, attach_type) in [
            (INGRESS_PROG, CgroupSkbAttachType::Ingress),
            (EGRESS_PROG, CgroupSkbAttachType::Egress),
        ] {
            let program: &mut CgroupSkb = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|e| program_error(name, "loading", e))?;
            let id = program
                .attach(&cgroup_dir, attach_type, CgroupAttachMode::Single)
                .map_err(|e| program_error(name, "attaching", e))?;
            let link = program
                .take_link(id)
                .map_err(|e| program_error(name, "attaching", e))?;
            keep_link(name, link.try_into(), &mut links, &mut watched)?;
        }
        let sock_ops: &mut SockOps = program_mut(&mut ebpf, SOCK_OPS_PROG)?;
        sock_ops
            .load()
            .map_err(|e| program_error(SOCK_OPS_PROG, "loading", e))?;
        let id = sock_ops
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(|e| program_error(SOCK_OPS_PROG, "attaching", e))?;
        let link = sock_ops
            .take_link(id)
            .map_err(|e| program_error(SOCK_OPS_PROG, "attaching", e))?;
        keep_link(SOCK_OPS_PROG, link.try_into(), &mut links, &mut watched)?;

        tracing::debug!(
            cgroup = %cgroup.display(),
            capacity,
            "lull's BPF programs are attached"
        );
        Ok(Self {
            _links: links,
            watched,
            slots_map: Mutex::new(slots_map),
            rows,
            allocator: SlotAllocator::new(0, capacity, Grace::Rcu),
            logger: Mutex::new(logger),
            cgroup,
            _ebpf: ebpf,
            _activity_map: activity_map,
            detached: AtomicBool::new(false),
        })
    }

    /// The number of slots.
    pub fn capacity(&self) -> u32 {
        self.rows.capacity() as u32
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Registers a TCP socket and returns its slot. From now on every packet of the socket
    /// with payload stamps the slot, including for sockets opened before the table was loaded.
    pub fn register(&self, fd: BorrowedFd<'_>) -> Result<Slot, ActivityError> {
        let slot = self
            .allocator
            .alloc()
            .map_err(|source| ActivityError::Syscall {
                call: "membarrier(MEMBARRIER_CMD_GLOBAL)",
                source,
            })?
            .ok_or(ActivityError::Full {
                capacity: self.capacity(),
            })?;
        if let Err(err) = self.attach_slot(fd, slot, 0) {
            self.allocator.free(slot);
            return Err(err);
        }
        Ok(slot)
    }

    /// Reads a slot: three loads from the shared mapping, no system call. A slot that was
    /// unregistered (or reused since) reads as empty.
    #[inline]
    pub fn read(&self, slot: Slot) -> Activity {
        match self.rows.get(slot.index).map(|row| row.read()) {
            Some((generation, activity)) if generation == slot.generation => activity,
            _ => Activity::default(),
        }
    }

    /// Unregisters a slot. The kernel stops writing it at once, and it is only handed out
    /// again after an RCU grace period, so a new owner never sees the old socket's stamps.
    ///
    /// The socket keeps its (now inert) storage until it closes; use
    /// [`ActivityTable::unregister_socket`] while the socket is still open to drop it at once.
    pub fn unregister(&self, slot: Slot) {
        self.retire(slot);
        self.allocator.free(slot);
    }

    /// Unregisters a slot whose socket is still open, dropping the socket's storage too.
    pub fn unregister_socket(&self, slot: Slot, fd: BorrowedFd<'_>) {
        self.forget_socket(fd);
        self.unregister(slot);
    }

    /// Registers `fd` in a slot the caller allocated (engines allocate their own slots), with
    /// both stamps starting at `baseline_ns`.
    pub(crate) fn attach_slot(
        &self,
        fd: BorrowedFd<'_>,
        slot: Slot,
        baseline_ns: u64,
    ) -> Result<(), ActivityError> {
        let row = self.rows.get(slot.index).ok_or(ActivityError::Full {
            capacity: self.capacity(),
        })?;
        row.reset(slot.generation, baseline_ns);
        let value = SlotRef {
            slot: slot.index,
            generation: slot.generation,
        };
        let inserted = self
            .slots_map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(&fd, value, 0);
        if let Err(source) = inserted {
            row.retire();
            return Err(ActivityError::Register {
                fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
                source,
            });
        }
        Ok(())
    }

    fn retire(&self, slot: Slot) {
        if let Some(row) = self.rows.get(slot.index) {
            row.retire_if(slot.generation);
        }
    }

    fn forget_socket(&self, fd: BorrowedFd<'_>) {
        // ENOENT (never registered, or storage already gone) is fine: the goal is no storage.
        let _ = self
            .slots_map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fd);
    }

    /// Forwards the kernel side's aya-log records to the `log`/`tracing` logger.
    pub fn flush_logs(&self) {
        if let Some(logger) = self
            .logger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            logger.flush();
        }
    }

    /// Checks that every program is still attached.
    pub fn verify_attached(&self) -> Result<(), ActivityError> {
        for link in &self.watched {
            if !link.attached()? {
                self.detached.store(true, Ordering::Relaxed);
                return Err(ActivityError::Detached {
                    program: link.program,
                    link_id: link.link_id,
                });
            }
        }
        Ok(())
    }

    /// The raw row at `index`: its generation (0 while free) and stamps. For diagnostics and
    /// leak checks; the engine reads through [`ActivityTable::read`].
    pub fn row(&self, index: u32) -> Option<(u32, Activity)> {
        self.rows.get(index).map(|row| row.read())
    }

    /// The kernel ids of the links that attach lull's programs (for `bpftool link show`).
    pub fn link_ids(&self) -> Vec<u32> {
        self.watched.iter().map(|l| l.link_id).collect()
    }
}

impl ActivitySource for ActivityTable {
    fn kind(&self) -> SourceKind {
        SourceKind::Ebpf
    }

    fn attach(
        &self,
        fd: Option<BorrowedFd<'_>>,
        slot: Slot,
        baseline_ns: u64,
    ) -> Result<(), ActivityError> {
        let fd = fd.ok_or(ActivityError::NoSocket)?;
        self.attach_slot(fd, slot, baseline_ns)
    }

    fn detach(&self, slot: Slot, fd: Option<BorrowedFd<'_>>) {
        if let Some(fd) = fd {
            self.forget_socket(fd);
        }
        self.retire(slot);
    }

    fn registered_rows(&self) -> Option<u64> {
        Some(self.rows.registered())
    }

    fn link_ids(&self) -> Vec<u32> {
        ActivityTable::link_ids(self)
    }

    #[inline]
    fn prefetch(&self, slot_index: u32) {
        self.rows.prefetch(slot_index);
    }

    #[inline]
    fn read(&self, slot: Slot, _fd: Option<BorrowedFd<'_>>) -> Result<Activity, ActivityError> {
        Ok(ActivityTable::read(self, slot))
    }

    fn detach_needs_grace(&self) -> bool {
        true
    }

    fn check(&self) -> Result<(), ActivityError> {
        self.flush_logs();
        self.verify_attached()
    }
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, ActivityError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ActivityError::MissingProgram { name })?
        .try_into()
        .map_err(|e| program_error(name, "loading", e))
}

fn program_error(
    name: &'static str,
    action: &'static str,
    err: aya::programs::ProgramError,
) -> ActivityError {
    ActivityError::classify(format!("{action} BPF program `{name}`"), err, |source| {
        ActivityError::Program {
            name,
            action,
            source,
        }
    })
}

fn keep_link(
    name: &'static str,
    link: Result<FdLink, LinkError>,
    links: &mut Vec<FdLink>,
    watched: &mut Vec<WatchedLink>,
) -> Result<(), ActivityError> {
    let link = link.map_err(|e| ActivityError::Syscall {
        call: "taking a bpf_link",
        source: std::io::Error::other(e),
    })?;
    let info = link.info().map_err(|e| ActivityError::Syscall {
        call: "bpf(BPF_OBJ_GET_INFO_BY_FD) on a new link",
        source: std::io::Error::other(e),
    })?;
    watched.push(WatchedLink::open(name, info.id())?);
    links.push(link);
    Ok(())
}

/// The kernel side's log level, following the userspace logger's: debug records in the
/// kernel cost a ring-buffer write each, so they are off unless asked for.
fn kernel_log_level() -> u8 {
    match log::max_level() {
        log::LevelFilter::Off => 0,
        log::LevelFilter::Error => 1,
        log::LevelFilter::Warn => 2,
        log::LevelFilter::Info => 3,
        log::LevelFilter::Debug => 4,
        log::LevelFilter::Trace => 5,
    }
}
