//! [`ActivityTable`]: lull's eBPF programs, shared by every lull process on the host, and the
//! rows of their table that this process uses.

use std::{
    os::fd::{AsFd, BorrowedFd},
    path::Path,
    sync::{
        Mutex, OnceLock, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use lull_common::SlotRef;

use super::{
    Activity, ActivityError, ActivitySource, CgroupScope, Grace, Slot, SlotAllocator, SourceKind,
    cgroup::ResolvedCgroup,
    extents::{Placement, RowExtents},
    link_health::WatchedLink,
    notices::Notices,
    pinned::PinnedObject,
    rows::Rows,
};

#[cfg(lull_embedded_bpf)]
static BPF_OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/lull.bpf.o"
)));
#[cfg(not(lull_embedded_bpf))]
static BPF_OBJECT: Option<&[u8]> = None;

/// Whether this build carries the BPF object (built by `cargo xtask build-ebpf`).
pub fn bpf_object_embedded() -> bool {
    BPF_OBJECT.is_some()
}

/// The BPF object this build carries, if any: for tools that load its other programs (the
/// `ebpf-overhead` benchmark loads the empty one, to measure the hook's own cost).
pub fn bpf_object() -> Option<&'static [u8]> {
    BPF_OBJECT
}

/// The host table's rows when the first lull on the host makes it: 24 MiB of kernel memory.
pub const DEFAULT_HOST_ROWS: u32 = 1 << 20;

/// How to load an [`ActivityTable`].
#[derive(Clone, Debug)]
pub struct TableOptions {
    /// Slot indices this table serves: the most sockets registered through it at once. Rows
    /// of the host's shared table are leased as they are used, 4,096 at a time.
    pub capacity: u32,
    /// The cgroup whose sockets the programs see (default: the one this process runs in).
    pub cgroup: CgroupScope,
    /// Rows of the host's shared table, if this is the first lull on the host and makes it
    /// (default [`DEFAULT_HOST_ROWS`]). Later users find it made, at the size it has.
    pub host_rows: u32,
}

impl Default for TableOptions {
    fn default() -> Self {
        Self {
            capacity: 1 << 16,
            cgroup: CgroupScope::Current,
            host_rows: DEFAULT_HOST_ROWS,
        }
    }
}

/// The eBPF activity tracker: per registered socket, the last time payload came in, the last
/// time the peer acknowledged new data, and whether and how it closed, readable without a
/// system call.
///
/// The programs and their table are pinned once per host and shared by every lull process
/// (see [`pinned`](super::pinned)); each cgroup gets one attachment, made by its first user
/// and removed by its last. A `cgroup_skb` ingress program stamps the table for registered
/// sockets (and does one storage lookup, nothing more, for any other socket of the cgroup);
/// a `sock_ops` program marks closes. Nothing runs on egress until a UDP flow is watched (see
/// [`ActivityTable::observe_datagrams`]), and nothing at all for sockets outside the cgroup.
pub struct ActivityTable {
    // Field order is drop order: the links' fds before the pins they keep alive, our rows
    // before the leases of their extents, and the pins before the cgroup they attach to.
    watched: Vec<WatchedLink>,
    /// The egress link, once a UDP flow asked for it (`None` inside: attaching failed, and
    /// UDP flows are left to their handles' own stamps).
    egress: OnceLock<Option<WatchedLink>>,
    rows: Rows,
    notices: Notices,
    extents: RowExtents,
    allocator: SlotAllocator,
    pinned: Mutex<PinnedObject>,
    cgroup: ResolvedCgroup,
    capacity: u32,
    detached: AtomicBool,
}

impl ActivityTable {
    /// Opens the host's pinned programs (loading and pinning them if this is the first lull
    /// on the host) and makes sure they are attached to the chosen cgroup.
    ///
    /// Needs CAP_BPF and CAP_NET_ADMIN (or root); fails with
    /// [`ActivityError::NotPermitted`] without them, and with [`ActivityError::NoBpfObject`]
    /// when this build has no object.
    pub fn load(options: &TableOptions) -> Result<Self, ActivityError> {
        let object = BPF_OBJECT.ok_or(ActivityError::NoBpfObject)?;
        let cgroup = options.cgroup.resolve()?;
        let capacity = options.capacity.max(1);
        let mut pinned = PinnedObject::open(object, options.host_rows.max(1))?;
        let watched = pinned.attach(&cgroup.path)?;
        let rows =
            Rows::map(pinned.activity.fd().as_fd(), pinned.rows as usize).map_err(|source| {
                ActivityError::Syscall {
                    call: "mmap(LULL_ACTIVITY)",
                    source,
                }
            })?;
        let notices = Notices::map(pinned.notices.fd().as_fd(), pinned.rows).map_err(|source| {
            ActivityError::Syscall {
                call: "mmap(LULL_NOTICES)",
                source,
            }
        })?;
        let extents = RowExtents::new(pinned.extents_dir(), pinned.rows, capacity);
        tracing::debug!(
            cgroup = %cgroup.path.display(),
            capacity,
            host_rows = pinned.rows,
            "lull's BPF programs are attached"
        );
        Ok(Self {
            watched,
            egress: OnceLock::new(),
            rows,
            notices,
            extents,
            allocator: SlotAllocator::new(0, capacity, Grace::Rcu),
            pinned: Mutex::new(pinned),
            cgroup,
            capacity,
            detached: AtomicBool::new(false),
        })
    }

    /// The number of slot indices this table serves.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The cgroup whose sockets the programs see.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup.path
    }

    /// Registers a TCP socket and returns its slot. From now on the programs track it,
    /// including a socket opened before the table was loaded (as long as it is in the cgroup).
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

    /// Reads a slot: a few loads from the shared mapping, no system call. A slot that was
    /// unregistered (or reused since) reads as empty.
    #[inline]
    pub fn read(&self, slot: Slot) -> Activity {
        self.extents
            .placement(slot)
            .map_or_else(Activity::default, |at| self.rows.read(row_slot(at)))
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

    /// Makes the programs see connected UDP sockets' traffic, attaching the egress program to
    /// the cgroup now if no lull user has yet (a datagram's tx is only seen leaving). Returns
    /// whether they can; `false` once attaching failed (for example after the process dropped
    /// its privileges), and UDP flows then rely on their handles' own stamps. The engine calls
    /// it at the first UDP flow; call it earlier to attach before dropping privileges.
    pub fn observe_datagrams(&self) -> bool {
        self.egress
            .get_or_init(|| match self.pinned().attach_egress() {
                Ok(link) => Some(link),
                Err(err) => {
                    tracing::warn!(
                        "UDP flows are observed through their handles' send and receive calls \
                         (the eBPF egress program could not be attached: {err})"
                    );
                    None
                }
            })
            .is_some()
    }

    /// Registers `fd` in a slot the caller allocated (engines allocate their own slots), with
    /// both stamps starting at `baseline_ns`.
    pub(crate) fn attach_slot(
        &self,
        fd: BorrowedFd<'_>,
        slot: Slot,
        baseline_ns: u64,
    ) -> Result<(), ActivityError> {
        self.attach_slot_as(fd, slot, baseline_ns, SlotRef::STREAM)
    }

    /// [`attach_slot`](Self::attach_slot) for a socket of `kind` ([`SlotRef::STREAM`] or
    /// [`SlotRef::DATAGRAM`]).
    fn attach_slot_as(
        &self,
        fd: BorrowedFd<'_>,
        slot: Slot,
        baseline_ns: u64,
        kind: u32,
    ) -> Result<(), ActivityError> {
        // A previous lessee's notices are not this table's news.
        let at = self
            .extents
            .place(slot, |extent| self.notices.clear(extent))?;
        let row = self.rows.open(row_slot(at), baseline_ns)?;
        let inserted =
            self.pinned()
                .slots
                .insert(&fd, SlotRef::of_kind(at.row, at.generation, kind), 0);
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
        if let Some(at) = self.extents.placement(slot) {
            self.rows.retire(row_slot(at));
        }
    }

    fn forget_socket(&self, fd: BorrowedFd<'_>) {
        // ENOENT (never registered, or storage already gone) is fine: the goal is no storage.
        let _ = self.pinned().slots.remove(&fd);
    }

    fn pinned(&self) -> std::sync::MutexGuard<'_, PinnedObject> {
        self.pinned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forwards the kernel side's aya-log records to the `log`/`tracing` logger.
    pub fn flush_logs(&self) {
        if let Some(logger) = self.pinned().logger.as_mut() {
            logger.flush();
        }
    }

    /// Checks that every program is still attached.
    pub fn verify_attached(&self) -> Result<(), ActivityError> {
        let egress = self.egress.get().and_then(Option::as_ref);
        for link in self.watched.iter().chain(egress) {
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

    /// The raw row of the shared table at `row`: its generation (0 while free) and stamps.
    /// For diagnostics; the engine reads through [`ActivityTable::read`].
    pub fn row(&self, row: u32) -> Option<(u32, Activity)> {
        self.rows.get(row).map(|cell| cell.read())
    }

    /// Where `slot` lives in the shared table, once registered: its row.
    pub fn row_of(&self, slot: Slot) -> Option<u32> {
        self.extents.placement(slot).map(|at| at.row)
    }

    /// The kernel ids of the links that attach lull's programs (for `bpftool link show`).
    pub fn link_ids(&self) -> Vec<u32> {
        let egress = self.egress.get().and_then(Option::as_ref);
        self.watched
            .iter()
            .chain(egress)
            .map(|l| l.link_id)
            .collect()
    }

    /// Where lull's programs and maps are pinned (for tools that load other programs of the
    /// same object against the same maps, such as the `ebpf-overhead` benchmark).
    pub fn pin_dir(&self) -> std::path::PathBuf {
        self.pinned().dir().to_path_buf()
    }

    /// The kernel ids of lull's pinned programs (ingress, sock_ops), for `bpftool prog show`.
    pub fn program_ids(&self) -> [Option<u32>; 2] {
        self.pinned().program_ids()
    }
}

impl Drop for ActivityTable {
    fn drop(&mut self) {
        // Registrations still open end with the table: their rows are retired before their
        // extents are leased to someone else (whose epoch would ignore them anyway).
        for rows in self.extents.leased_rows() {
            for row in rows {
                if let Some(cell) = self.rows.get(row) {
                    cell.retire();
                }
            }
        }
    }
}

/// A placement as the rows address it.
#[inline]
fn row_slot(at: Placement) -> Slot {
    Slot {
        index: at.row,
        generation: at.generation,
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

    fn observe_datagrams(&self) -> bool {
        ActivityTable::observe_datagrams(self)
    }

    fn attach_datagram(
        &self,
        fd: BorrowedFd<'_>,
        slot: Slot,
        baseline_ns: u64,
    ) -> Result<bool, ActivityError> {
        if !self.observe_datagrams() {
            return Ok(false);
        }
        self.attach_slot_as(fd, slot, baseline_ns, SlotRef::DATAGRAM)?;
        Ok(true)
    }

    fn detach(&self, slot: Slot, fd: Option<BorrowedFd<'_>>) {
        if let Some(fd) = fd {
            self.forget_socket(fd);
        }
        self.retire(slot);
    }

    fn registered_rows(&self) -> Option<u64> {
        Some(
            self.extents
                .leased_rows()
                .into_iter()
                .flatten()
                .filter_map(|row| self.rows.get(row))
                .filter(|cell| cell.read().0 != 0)
                .count() as u64,
        )
    }

    fn link_ids(&self) -> Vec<u32> {
        ActivityTable::link_ids(self)
    }

    #[inline]
    fn prefetch(&self, slot_index: u32) {
        let slot = Slot {
            index: slot_index,
            generation: 0,
        };
        if let Some(at) = self.extents.placement(slot) {
            self.rows.prefetch(at.row);
        }
    }

    #[inline]
    fn read(&self, slot: Slot, _fd: Option<BorrowedFd<'_>>) -> Result<Activity, ActivityError> {
        Ok(ActivityTable::read(self, slot))
    }

    fn resolution_ns(&self) -> u64 {
        RESOLUTION_NS
    }

    fn reports_timeouts(&self) -> bool {
        true
    }

    fn take_notices(&self, indices: std::ops::Range<u32>, closed: &mut Vec<u32>) {
        self.extents.leased_in(indices.clone(), |first, extent| {
            self.notices.take(extent, |offset| {
                let index = first + offset;
                if indices.contains(&index) {
                    closed.push(index);
                }
            });
        });
    }

    fn detach_needs_grace(&self) -> bool {
        true
    }

    fn reserve(&self) -> Result<(), ActivityError> {
        // Every block of slot indices this table serves gets its extent now, while the lock
        // files in /run can still be made and written.
        for first in (0..self.capacity).step_by(lull_common::EXTENT_ROWS as usize) {
            let slot = Slot {
                index: first,
                generation: 0,
            };
            self.extents
                .place(slot, |extent| self.notices.clear(extent))?;
        }
        Ok(())
    }

    fn check(&self) -> Result<(), ActivityError> {
        self.flush_logs();
        self.verify_attached()
    }
}

/// How far a stamp may be off: the programs write at most once per jiffy per direction, so a
/// stamp may be one jiffy older than the packet that last moved it. 10 ms is a jiffy at
/// HZ=100, the coarsest setting kernels ship with.
pub const RESOLUTION_NS: u64 = 10_000_000;
