//! State shared between an engine's thread and the handles of the connections it watches.
//!
//! # Ground rules
//! - The engine thread owns the wheel, the connection records and the probe ring. Nothing else
//!   touches them; handles talk to it through [`Command`]s.
//! - A handle may touch its socket only while its slot is `Live` (it is, until the handle is
//!   dropped). The engine may touch a socket only after moving its slot from `Live` to `Busy`,
//!   and moves it back once every request on the fd has completed. A dropping handle moves
//!   `Live` to `Dropped`, waiting while the slot is `Busy`; after that the engine never
//!   touches the fd again. That is what makes "no probe after drop" hold even when the fd
//!   number is reused at once.
//! - Statistics cells are written by the engine thread only, read by anyone.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    os::fd::{BorrowedFd, RawFd},
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock},
    time::Duration,
};

use crate::{
    activity::{Activity, ActivitySource, Rows, Slot, SlotAllocator, SourceKind},
    clock::monotonic_ns,
    policy::{ActivityMode, Mode, OnDead, Policy, Probe},
    probe::Payload,
};

use super::{
    Event, WatchError,
    events::{ConnStatsCell, Counters},
    flow::{FlowKind, FlowRequest, Observer},
};

/// Index of a policy in an engine's policy table.
pub(crate) type PolicyId = u16;

/// A request from a handle (or the engine's owner) to the engine thread.
pub(crate) enum Command {
    /// A new policy, for flows of `flow`; always sent before the first command that refers
    /// to it.
    AddPolicy {
        id: PolicyId,
        policy: Box<Policy>,
        flow: FlowKind,
    },
    /// Start watching `slot`; `dest` is the peer of a flow on an unconnected UDP socket.
    Watch {
        slot: Slot,
        fd: RawFd,
        policy: PolicyId,
        now_ns: u64,
        dest: Option<SocketAddr>,
    },
    /// The handle was dropped: forget `slot` and free it.
    Unwatch { slot: Slot },
    /// Switch `slot` to another policy and re-evaluate it at once.
    SetPolicy { slot: Slot, policy: PolicyId },
    /// Stop the engine thread.
    Shutdown,
}

/// The process-wide set of watched sockets, by inode: one socket can only be watched by one
/// engine at a time, and this is how an fd handed to a second engine is refused.
pub(crate) fn watched_sockets() -> MutexGuard<'static, HashSet<u64>> {
    static SOCKETS: OnceLock<Mutex<HashSet<u64>>> = OnceLock::new();
    SOCKETS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// The hashable parts of a [`Policy`] (its `jitter` is an `f64`).
#[derive(Clone, PartialEq, Eq, Hash)]
struct PolicyKey {
    idle: Duration,
    interval: Duration,
    count: u32,
    jitter_bits: u64,
    mode: Mode,
    activity: ActivityMode,
    on_dead: OnDead,
    probe: Probe,
    spacing: Duration,
    drain: bool,
    hung_after: Option<Duration>,
    expect_reply: Option<Payload>,
    flow: FlowKind,
}

impl PolicyKey {
    fn of(p: &Policy, flow: FlowKind) -> Self {
        Self {
            idle: p.idle,
            interval: p.interval,
            count: p.count,
            jitter_bits: p.jitter.to_bits(),
            mode: p.mode,
            activity: p.activity,
            on_dead: p.on_dead,
            probe: p.probe.clone(),
            spacing: p.min_probe_spacing,
            drain: p.drain,
            hung_after: p.hung_after,
            expect_reply: p.expect_reply.clone(),
            flow,
        }
    }
}

/// Policies an engine has seen, each stored once.
#[derive(Default)]
pub(crate) struct PolicyRegistry {
    ids: HashMap<PolicyKey, PolicyId>,
}

impl PolicyRegistry {
    /// The id of `policy` for flows of `flow`, and whether it is new (and must be sent to the
    /// engine thread).
    pub(crate) fn intern(&mut self, policy: &Policy, flow: FlowKind) -> Option<(PolicyId, bool)> {
        let key = PolicyKey::of(policy, flow);
        if let Some(&id) = self.ids.get(&key) {
            return Some((id, false));
        }
        let id = PolicyId::try_from(self.ids.len()).ok()?;
        self.ids.insert(key, id);
        Some((id, true))
    }
}

/// Everything an engine's handles share with its thread.
pub(crate) struct Shared {
    /// Slot allocation and the per-slot `Live`/`Busy`/`Dropped` word.
    pub(crate) slots: SlotAllocator,
    /// Per-slot statistics, indexed by local slot index.
    pub(crate) stats: Box<[ConnStatsCell]>,
    pub(crate) counters: Counters,
    pub(crate) commands: crossbeam_channel::Sender<Command>,
    pub(crate) events: flume::Sender<Event>,
    /// The source in use; replaced if the eBPF source fails at run time.
    pub(crate) source: RwLock<Arc<dyn ActivitySource>>,
    pub(crate) policies: Mutex<PolicyRegistry>,
    /// First slot index of this engine (engines of a group share one source).
    pub(crate) slot_base: u32,
    /// The engine thread's kernel thread id, once it runs (for per-thread CPU accounting).
    pub(crate) thread_id: std::sync::atomic::AtomicI32,
    /// Rows of UDP flows in this process's memory, by local slot index, stamped by their
    /// handles' send and receive calls (see `flow`). Made at the first UDP flow: an engine
    /// with TCP connections alone never has them.
    pub(crate) datagram_rows: OnceLock<Rows>,
}

impl Shared {
    /// Starts tracking a new flow's activity in `slot`, and says what kind of flow it is.
    pub(crate) fn attach_flow(
        &self,
        fd: Option<BorrowedFd<'_>>,
        slot: Slot,
        now_ns: u64,
        request: FlowRequest,
    ) -> Result<FlowKind, WatchError> {
        let flow = match (request, fd) {
            (FlowRequest::Stream, _) => {
                self.source().attach(fd, slot, now_ns)?;
                return Ok(FlowKind::Stream);
            }
            (FlowRequest::Connected, Some(fd)) => FlowKind::Datagram {
                observer: if self.source().attach_datagram(fd, slot, now_ns)? {
                    Observer::Ebpf
                } else {
                    Observer::Wrapper
                },
                addressed: false,
            },
            (FlowRequest::Addressed(_), _) | (FlowRequest::Connected, None) => FlowKind::Datagram {
                observer: Observer::Wrapper,
                addressed: true,
            },
        };
        // Every datagram flow has a row its handle stamps, whoever observes it (see [`flow`](super::flow)).
        self.open_datagram_row(slot, now_ns);
        Ok(flow)
    }

    pub(crate) fn source(&self) -> Arc<dyn ActivitySource> {
        self.source
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn source_kind(&self) -> SourceKind {
        self.source().kind()
    }

    pub(crate) fn set_source(&self, source: Arc<dyn ActivitySource>) {
        *self.source.write().unwrap_or_else(PoisonError::into_inner) = source;
    }

    pub(crate) fn stats_cell(&self, slot: Slot) -> Option<&ConnStatsCell> {
        self.stats
            .get(slot.index.checked_sub(self.slot_base)? as usize)
    }

    /// Interns `policy` for flows of `flow` and, if it is new, sends it to the engine thread
    /// before returning, so that no command can refer to an id the thread has not seen.
    pub(crate) fn policy_id(&self, policy: &Policy, flow: FlowKind) -> Option<PolicyId> {
        let mut registry = self.policies.lock().unwrap_or_else(PoisonError::into_inner);
        let (id, new) = registry.intern(policy, flow)?;
        if new {
            let _ = self.commands.send(Command::AddPolicy {
                id,
                policy: Box::new(policy.clone()),
                flow,
            });
        }
        Some(id)
    }

    /// `slot` as the datagram rows index it (by local index).
    fn datagram_slot(&self, slot: Slot) -> Option<Slot> {
        Some(Slot {
            index: slot.index.checked_sub(self.slot_base)?,
            generation: slot.generation,
        })
    }

    /// Gives `slot` a datagram row, both stamps starting at `baseline_ns`.
    pub(crate) fn open_datagram_row(&self, slot: Slot, baseline_ns: u64) {
        let rows = self
            .datagram_rows
            .get_or_init(|| Rows::heap(self.slots.capacity() as usize));
        if let Some(local) = self.datagram_slot(slot) {
            // A local index is below the capacity the rows were made with: it cannot fail.
            let _ = rows.open(local, baseline_ns);
        }
    }

    /// Retires `slot`'s datagram row, if it has one.
    pub(crate) fn retire_datagram_row(&self, slot: Slot) {
        if let (Some(rows), Some(local)) = (self.datagram_rows.get(), self.datagram_slot(slot)) {
            rows.retire(local);
        }
    }

    /// What `slot`'s handle stamped in its datagram row.
    pub(crate) fn datagram_activity(&self, slot: Slot) -> Activity {
        match (self.datagram_rows.get(), self.datagram_slot(slot)) {
            (Some(rows), Some(local)) => rows.read(local),
            _ => Activity::default(),
        }
    }

    /// Stamps `slot`'s datagram row: a datagram went out (`tx`) or came in, now. Only the
    /// flow's handle calls it, while the flow is watched.
    pub(crate) fn stamp_datagram(&self, slot: Slot, tx: bool) {
        if let (Some(rows), Some(local)) = (self.datagram_rows.get(), self.datagram_slot(slot))
            && let Some(row) = rows.get(local.index)
        {
            let now = monotonic_ns();
            if tx {
                row.stamp_tx(now);
            } else {
                row.stamp_rx(now);
            }
        }
    }
}

/// Zeroed statistics cells from `calloc`, so a large capacity costs nothing until used.
pub(crate) fn zeroed_stats(capacity: usize) -> Box<[ConnStatsCell]> {
    const _: () = assert!(size_of::<ConnStatsCell>() == size_of::<[u32; 3]>());
    const _: () = assert!(align_of::<ConnStatsCell>() == align_of::<[u32; 3]>());
    // `vec![zero; n]` of integers allocates with `alloc_zeroed`.
    let cells = vec![[0u32; 3]; capacity].into_boxed_slice();
    crate::memory::advise_huge_pages(cells.as_ptr(), capacity * size_of::<[u32; 3]>());
    // SAFETY: `ConnStatsCell` is `#[repr(C)]` over three `AtomicU32`, which have the size,
    // alignment and bit validity of `u32`; all zeroes is its default.
    unsafe { Box::from_raw(Box::into_raw(cells) as *mut [ConnStatsCell]) }
}
