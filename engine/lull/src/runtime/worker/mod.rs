//! The engine thread: one wheel, one ring, one loop.
//!
//! Each turn of the loop takes commands, fires the timers that are due, sends the probes they
//! asked for as one io_uring submission, and sleeps until the next timer (or command). A
//! turn's probes are bounded (`max_probes_per_tick`), so a herd of connections that all come
//! due together is spread over ticks instead of stalling the loop.
//!
//! This module is the loop, the commands and the housekeeping; what a firing decides and does
//! is in `verdict`, where its timer lands in `placement`, and the io_uring batch in `batch`.
//!
//! # Ground rules
//!
//! - Only the engine thread touches a worker: its wheel, connection records and batch are
//!   neither locked nor shared (see the ground rules in `shared`).
//! - A firing holds its connection's slot `Busy` while it may touch the fd: until the firing
//!   ends if it queued nothing, until the batch completes if it did.
//! - Every watched connection has one timer for its whole life, re-armed in place, and freed
//!   only when the handle is dropped (`Unwatch`).

mod batch;
mod placement;
mod verdict;

#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{BorrowedFd, RawFd},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use crate::{
    activity::{ActivitySource, Slot, SlotAllocator, SlotState, TcpInfoSource},
    clock::monotonic_ns,
    policy::{Mode, Policy, Probe},
    probe::ring::ProbeRing,
    wheel::{Poll, TimingWheel},
};

use self::{batch::ProbeBatch, placement::Placement};
use super::{
    conn::{Arm, CompiledPolicy, ConnState, Phase, ProbeKind},
    events::{bump, drop_one, raise_to},
    flow::{FlowKind, Observer},
    shared::{Command, Shared},
};

/// How often the source is checked and kernel logs are forwarded.
const HOUSEKEEPING_NS: u64 = 1_000_000_000;
/// How long a close notice may wait for the engine's next turn when no timer is due sooner:
/// notices are read each turn, and an idle engine would otherwise turn only for housekeeping,
/// leaving a peer's RST or the kernel's timeout unreported for up to a second.
const NOTICE_POLL_NS: u64 = 50_000_000;
/// Timer expiries handled per turn before commands get a look-in again.
const MAX_FIRES_PER_TURN: u32 = 16_384;
/// Expiries taken from the wheel and prefetched before any of them is handled.
const PREFETCH_BATCH: usize = 32;
/// Timers the wheel may re-file per call while cascading a slot.
const CASCADE_BUDGET: usize = 4_096;
/// Commands taken per turn: a burst of a million registrations must not starve the timers.
const MAX_COMMANDS_PER_TURN: usize = 4_096;
/// Wall time a turn may spend firing timers before it yields to commands and the next turn.
const TURN_BUDGET_NS: u64 = 2_000_000;

/// Marks a free connection record.
const FREE_FD: RawFd = -2;
/// The fd of a simulated connection: probes go to a no-op instead of a socket.
pub(crate) const VIRTUAL_FD: RawFd = -1;

pub(crate) struct WorkerConfig {
    pub(crate) tick_ns: u64,
    pub(crate) max_probes_per_tick: u32,
    /// The coalescing grid (a whole number of ticks): arms with slack land on its points.
    pub(crate) grid_ns: u64,
    /// Connections the engine may hold: the wheel and connection table reserve this much
    /// address space up front (touched only as connections arrive), so they never reallocate
    /// and never carry growth slack.
    pub(crate) capacity: u32,
}

pub(crate) struct Worker {
    shared: Arc<Shared>,
    commands: crossbeam_channel::Receiver<Command>,
    source: Arc<dyn ActivitySource>,
    /// The source's [`resolution_ns`](ActivitySource::resolution_ns), read once per source.
    resolution_ns: u64,
    /// Set once the source failed and the worker fell back to `TCP_INFO`, which cannot fail.
    source_failed: bool,
    next_housekeeping_ns: u64,
    wheel: TimingWheel,
    placement: Placement,
    /// Connection records by local slot index; `FREE_FD` marks a free one.
    conns: Vec<ConnState>,
    policies: Vec<CompiledPolicy>,
    batch: ProbeBatch,
    /// Slot indices this engine serves, from `shared.slot_base`.
    capacity: u32,
    /// Connections the source noticed closing, by slot index; kept to reuse its allocation.
    noticed: Vec<u32>,
    /// The peer of each flow on an unconnected UDP socket, by local slot index: where its
    /// datagrams go. Only such flows have an entry.
    destinations: HashMap<u32, socket2::SockAddr>,
}

impl Worker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        commands: crossbeam_channel::Receiver<Command>,
        ring: ProbeRing,
        config: WorkerConfig,
    ) -> Self {
        let source = shared.source();
        let start_ns = monotonic_ns();
        Self {
            resolution_ns: source.resolution_ns(),
            source,
            source_failed: false,
            next_housekeeping_ns: start_ns + HOUSEKEEPING_NS,
            shared,
            commands,
            wheel: TimingWheel::with_capacity(config.capacity as usize),
            placement: Placement::new(start_ns, config.tick_ns, config.grid_ns),
            conns: {
                let conns = Vec::with_capacity(config.capacity as usize);
                crate::memory::advise_huge_pages(
                    conns.as_ptr(),
                    conns.capacity() * size_of::<ConnState>(),
                );
                conns
            },
            policies: Vec::new(),
            batch: ProbeBatch::new(ring, config.max_probes_per_tick),
            capacity: config.capacity,
            noticed: Vec::new(),
            destinations: HashMap::new(),
        }
    }

    pub(crate) fn run(mut self) {
        // SAFETY: gettid takes no arguments, touches no memory and cannot fail.
        let tid = unsafe { libc::gettid() };
        self.shared.thread_id.store(tid, Ordering::Relaxed);
        loop {
            let turn_start = monotonic_ns();
            let turn_cpu = thread_cpu_ns();
            for n in 0..MAX_COMMANDS_PER_TURN {
                // A registration burst gets at most a turn's budget before timers run again.
                if n % 64 == 63 && monotonic_ns() - turn_start >= TURN_BUDGET_NS {
                    break;
                }
                match self.commands.try_recv() {
                    Ok(Command::Shutdown) | Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        return;
                    }
                    Ok(cmd) => self.handle(cmd),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                }
            }
            let now = monotonic_ns();
            self.fire_noticed(now);
            let budget_left = self.fire_due(now, turn_start + TURN_BUDGET_NS);
            if now >= self.next_housekeeping_ns {
                self.housekeeping(now);
            }
            let counters = &self.shared.counters;
            raise_to(&counters.max_loop_us, (monotonic_ns() - turn_start) / 1_000);
            raise_to(
                &counters.max_loop_cpu_us,
                (thread_cpu_ns() - turn_cpu) / 1_000,
            );

            let now = monotonic_ns();
            let wake_ns = if self.commands.is_empty() {
                self.next_wake_ns(now, budget_left)
            } else {
                now
            };
            if wake_ns <= now {
                continue;
            }
            let deadline = Instant::now() + Duration::from_nanos(wake_ns - now);
            match self.commands.recv_deadline(deadline) {
                Ok(Command::Shutdown) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return;
                }
                Ok(cmd) => self.handle(cmd),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn next_wake_ns(&self, now: u64, budget_left: bool) -> u64 {
        let mut wake = self.next_housekeeping_ns;
        if let Some(tick) = self.wheel.next_expiration() {
            let mut tick = tick;
            if !budget_left {
                // This tick's probe budget is spent: come back at the next tick.
                tick = tick.max(self.placement.tick_of(now) + 1);
            }
            wake = wake.min(self.placement.tick_start(tick));
        }
        if self.source.reports_timeouts()
            && self.shared.counters.watched.load(Ordering::Relaxed) > 0
        {
            wake = wake.min(now + NOTICE_POLL_NS);
        }
        wake
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::AddPolicy { id, policy, flow } => self.add_policy(id, &policy, flow),
            Command::Watch {
                slot,
                fd,
                policy,
                now_ns,
                dest,
            } => self.watch(slot, fd, policy, now_ns, dest),
            Command::Unwatch { slot } => self.unwatch(slot),
            Command::SetPolicy { slot, policy } => {
                let now_tick = self.placement.tick_of(monotonic_ns());
                if let Some(c) = self.conn_mut(slot) {
                    c.policy = policy;
                    let timer = c.timer;
                    self.wheel.reset(timer, now_tick);
                }
            }
            Command::Shutdown => {}
        }
    }

    fn add_policy(&mut self, id: u16, policy: &Policy, flow: FlowKind) {
        let payload = match &policy.probe {
            Probe::Bytes(payload) => self.batch.intern_payload(payload.as_bytes()),
            Probe::Kernel | Probe::Callback => 0,
        };
        let compiled = CompiledPolicy::new(policy, payload, flow);
        let id = id as usize;
        if self.policies.len() <= id {
            self.policies.resize(id + 1, compiled);
        }
        self.policies[id] = compiled;
    }

    fn local(&self, slot: Slot) -> Option<usize> {
        slot.index
            .checked_sub(self.shared.slot_base)
            .map(|l| l as usize)
    }

    fn conn_mut(&mut self, slot: Slot) -> Option<&mut ConnState> {
        let local = self.local(slot)?;
        self.conns.get_mut(local).filter(|c| c.fd != FREE_FD)
    }

    fn watch(&mut self, slot: Slot, fd: RawFd, policy: u16, now: u64, dest: Option<SocketAddr>) {
        let Some(local) = self.local(slot) else {
            return;
        };
        let Some(p) = self.policies.get(policy as usize).copied() else {
            tracing::error!(%slot.index, policy, "watch refers to an unknown policy");
            return;
        };
        let (phase, first) = match (p.probe, p.mode) {
            (ProbeKind::Kernel, _) => (Phase::Kernel, Arm::exact(now + p.kernel_verdict_ns())),
            (_, Mode::KeepWarm) => (Phase::Watching, p.keep_warm_arm(now)),
            // Without timeout reports from the source, the kernel's verdict on the transport
            // is only seen when the engine looks, and the application tier's first probe may be
            // far later than the dead bound.
            _ if p.tiered && !self.source.reports_timeouts() => {
                (Phase::Watching, p.first_tiered_arm(now))
            }
            _ => (Phase::Watching, p.idle_arm(now)),
        };
        let first = self.placement.place(first);
        let timer = self
            .wheel
            .insert(self.placement.deadline_tick(first), local as u32);
        if self.conns.len() <= local {
            let free = ConnState::new(FREE_FD, timer, 0, Phase::Inert);
            self.conns.resize(local + 1, free);
        }
        self.conns[local] = ConnState::new(fd, timer, policy, phase);
        // Watched from now: what arrives later is news (the source's stamps start at `now`).
        self.conns[local].set_mark(now);
        bump(&self.shared.counters.watched);
        self.gauge_flow(p.flow, true);
        if let Some(dest) = dest {
            self.destinations
                .insert(local as u32, socket2::SockAddr::from(dest));
        }
    }

    /// Keeps the UDP flow gauges in step with a flow watched (`up`) or no longer.
    fn gauge_flow(&self, flow: FlowKind, up: bool) {
        let counters = &self.shared.counters;
        let gauges = match flow.observer() {
            None => return,
            Some(Observer::Ebpf) => [Some(&counters.datagram_flows), None],
            Some(Observer::Wrapper) => [
                Some(&counters.datagram_flows),
                Some(&counters.datagram_flows_wrapper),
            ],
        };
        for gauge in gauges.into_iter().flatten() {
            if up {
                bump(gauge);
            } else {
                drop_one(gauge);
            }
        }
    }

    fn unwatch(&mut self, slot: Slot) {
        let Some(local) = self.local(slot) else {
            return;
        };
        if let Some(c) = self.conns.get_mut(local).filter(|c| c.fd != FREE_FD) {
            let old = *c;
            c.fd = FREE_FD;
            self.wheel.remove(old.timer);
            self.ungauge(old.phase());
            drop_one(&self.shared.counters.watched);
            if let Some(p) = self.policies.get(old.policy as usize) {
                self.gauge_flow(p.flow, false);
            }
            self.destinations.remove(&(local as u32));
        }
        if let Some(cell) = self.shared.stats.get(local) {
            cell.reset();
        }
        self.shared.slots.free(slot);
    }

    /// Fires the timers due at `now`. Returns whether probe budget is left in this tick.
    fn fire_due(&mut self, now: u64, turn_deadline_ns: u64) -> bool {
        let tick = self.placement.tick_of(now);
        self.batch.start_tick(tick);
        let mut fires = 0;
        let mut due = [0u32; PREFETCH_BATCH];
        'turn: while fires < MAX_FIRES_PER_TURN {
            let budget = self.batch.room();
            let mut n = 0;
            let mut idle = false;
            while n < budget.min(PREFETCH_BATCH) {
                let expired = match self.wheel.poll_within(tick, CASCADE_BUDGET) {
                    Poll::Expired(expired) => expired,
                    // A big cascade is done in pieces, so the turn's time limit holds.
                    Poll::Yield => break,
                    Poll::Idle => {
                        idle = true;
                        break;
                    }
                };
                let local = expired.token;
                // Every table this expiry will read, for all of the batch, before any of it is
                // handled: the misses overlap instead of queueing one behind the other.
                if let Some(c) = self.conns.get(local as usize) {
                    crate::memory::prefetch(c);
                }
                self.shared.slots.prefetch(local);
                self.source.prefetch(self.shared.slot_base + local);
                if let Some(cell) = self.shared.stats.get(local as usize) {
                    crate::memory::prefetch(cell);
                }
                due[n] = local;
                n += 1;
            }
            for &local in &due[..n] {
                self.fire(local as usize, now);
            }
            fires += n as u32;
            // Out of due timers, out of probe budget, or out of this turn's time: commands and
            // the next tick must not wait behind a herd.
            if idle || budget == 0 || monotonic_ns() >= turn_deadline_ns {
                break 'turn;
            }
        }
        self.flush(now);
        self.batch.tick_budget_left()
    }

    /// Looks at once at every connection the source says closed since the last turn, rather
    /// than at its next timer: a close (or the kernel giving up) is news now.
    fn fire_noticed(&mut self, now: u64) {
        let base = self.shared.slot_base;
        self.source
            .take_notices(base..base + self.capacity, &mut self.noticed);
        if self.noticed.is_empty() {
            return;
        }
        let noticed = std::mem::take(&mut self.noticed);
        for &index in &noticed {
            let local = (index - base) as usize;
            if self
                .conns
                .get(local)
                .is_some_and(|c| c.fd != FREE_FD && c.phase() != Phase::Inert)
            {
                bump(&self.shared.counters.wakeups_noticed);
                self.fire(local, now);
            }
        }
        self.noticed = noticed;
        self.noticed.clear();
        // A firing may have queued a probe (a connection that was only half closed): send it.
        self.flush(now);
    }

    fn fire(&mut self, local: usize, now: u64) {
        let Some(&c) = self.conns.get(local).filter(|c| c.fd != FREE_FD) else {
            return;
        };
        let Some(slot) = self.shared.slots.slot_at(local as u32) else {
            return;
        };
        // From here until the slot is released, a dropping handle waits for us.
        if !self
            .shared
            .slots
            .transition(slot, SlotState::Live, SlotState::Busy)
        {
            // Dropped: the Unwatch command is on its way and will free the entry.
            return;
        }
        bump(&self.shared.counters.wakeups);
        let p = self.policies[c.policy as usize];
        let mut queued = false;
        if c.resume != 0 && c.phase() != Phase::Inert {
            // The last probe went out short: finish it before anything else, or the stream
            // the peer parses is left with half a frame. It does not count as a probe. (Not on
            // a connection that closed since: nothing reads that stream any more.)
            if let ProbeKind::Bytes(payload) = p.probe {
                self.rearm(local, Arm::exact(now + p.interval_ns));
                queued = self.batch.push_probe(local, &c, payload, c, None);
            }
        }
        let mut arrived = false;
        if !queued {
            let evaluation = self.evaluate(slot, local, c, &p, now);
            queued = evaluation.queued;
            arrived = evaluation.arrived;
        }
        if p.drain && c.fd >= 0 && self.conns[local].phase() != Phase::Inert {
            // No read for a connection that received nothing since its probe: it would come
            // back empty, and cost a submission entry and a completion for nothing.
            let counters = &self.shared.counters;
            if arrived && self.batch.push_drain(local, c.fd) {
                queued = true;
                bump(&counters.drains);
            } else if !arrived {
                bump(&counters.drains_skipped);
            }
        }
        if queued {
            // Released once the batch has completed, in `flush`.
            self.batch.hold(local);
        } else {
            release(&self.shared.slots, slot);
        }
    }

    fn housekeeping(&mut self, now: u64) {
        self.next_housekeeping_ns = now + HOUSEKEEPING_NS;
        if self.source_failed {
            return;
        }
        if let Err(err) = self.source.check() {
            self.source_failed = true;
            tracing::warn!(
                "{err}; switching this engine to the TCP_INFO activity source (no connection is \
                 dropped)"
            );
            let fallback: Arc<dyn ActivitySource> = Arc::new(TcpInfoSource);
            self.shared.set_source(fallback.clone());
            self.resolution_ns = fallback.resolution_ns();
            self.source = fallback;
        }
    }
}

/// Moves a slot the engine held `Busy` back to `Live`: its handle may drop it again.
fn release(slots: &SlotAllocator, slot: Slot) {
    let released = slots.transition(slot, SlotState::Busy, SlotState::Live);
    debug_assert!(released, "only the engine moves a slot out of Busy");
}

/// CPU time of the calling thread: a turn's own work, unlike wall time, is not inflated when
/// the scheduler runs something else in the middle of it.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call only; the calling thread's CPU clock
    // always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn borrow<'a>(fd: RawFd) -> Option<BorrowedFd<'a>> {
    // SAFETY: only called for the fd of a slot this thread holds `Busy`, which its handle
    // keeps open until the slot is released (see the ground rules in `shared`).
    (fd >= 0).then(|| unsafe { BorrowedFd::borrow_raw(fd) })
}
