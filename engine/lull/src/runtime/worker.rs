//! The engine thread: one wheel, one ring, one loop.
//!
//! Each turn of the loop takes commands, fires the timers that are due, sends the probes they
//! asked for as one io_uring submission, and sleeps until the next timer (or command). A
//! turn's probes are bounded (`max_probes_per_tick`), so a herd of connections that all come
//! due together is spread over ticks instead of stalling the loop.

use std::{
    collections::HashMap,
    os::fd::{BorrowedFd, RawFd},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use crate::{
    activity::{ActivitySource, Slot, SlotState, TcpInfoSource},
    clock::monotonic_ns,
    policy::{OnDead, Policy, Probe},
    probe::ring::{Completion, ProbeRing},
    socket::{self, tcp_info},
    wheel::{Poll, TimingWheel},
};

use super::{
    CloseReason, ConnId, Event,
    conn::{
        Arm, CompiledPolicy, ConnState, Phase, ProbeKind, Verdict, decide, decide_kernel, snap,
    },
    shared::{Command, Shared},
};

/// How often the source is checked and kernel logs are forwarded.
const HOUSEKEEPING_NS: u64 = 1_000_000_000;
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

/// A request in the current batch.
struct Inflight {
    local: u32,
    op: Op,
}

enum Op {
    /// A probe of `len` bytes; `undo` is the state before it was decided, restored if it does
    /// not go out.
    Probe { undo: ConnState, len: u32 },
    /// Reading (and discarding) whatever the peer sent.
    Drain,
}

/// Bytes read per drain: a drained connection is read once per timer expiry.
const DRAIN_BYTES: usize = 64 * 1024;

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
    resolution_ns: u64,
    wheel: TimingWheel,
    conns: Vec<ConnState>,
    policies: Vec<CompiledPolicy>,
    payloads: Vec<Box<[u8]>>,
    payload_ids: HashMap<Box<[u8]>, u16>,
    ring: ProbeRing,
    inflight: Vec<Inflight>,
    /// Slots held `Busy` until the current batch completes, each once.
    held: Vec<u32>,
    completions: Vec<Completion>,
    /// Where drained bytes go. Nothing ever reads it, so concurrent kernel writes into it are
    /// harmless.
    drain_buf: Box<[u8]>,
    config: WorkerConfig,
    start_ns: u64,
    rng: u64,
    probes_this_tick: (u64, u32),
    next_housekeeping_ns: u64,
    source_failed: bool,
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
            shared,
            commands,
            wheel: TimingWheel::with_capacity(config.capacity as usize),
            conns: {
                let conns = Vec::with_capacity(config.capacity as usize);
                crate::memory::advise_huge_pages(
                    conns.as_ptr(),
                    conns.capacity() * size_of::<ConnState>(),
                );
                conns
            },
            policies: Vec::new(),
            payloads: Vec::new(),
            payload_ids: HashMap::new(),
            ring,
            inflight: Vec::new(),
            held: Vec::new(),
            completions: Vec::new(),
            drain_buf: vec![0; DRAIN_BYTES].into_boxed_slice(),
            config,
            start_ns,
            rng: start_ns | 1,
            probes_this_tick: (0, 0),
            next_housekeeping_ns: start_ns + HOUSEKEEPING_NS,
            source_failed: false,
        }
    }

    pub(crate) fn run(mut self) {
        // SAFETY: gettid has no preconditions.
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
            let budget_left = self.fire_due(now, turn_start + TURN_BUDGET_NS);
            if now >= self.next_housekeeping_ns {
                self.housekeeping(now);
            }
            let counters = &self.shared.counters;
            counters
                .max_loop_us
                .fetch_max((monotonic_ns() - turn_start) / 1_000, Ordering::Relaxed);
            counters
                .max_loop_cpu_us
                .fetch_max((thread_cpu_ns() - turn_cpu) / 1_000, Ordering::Relaxed);

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

    fn tick_of(&self, ns: u64) -> u64 {
        ns.saturating_sub(self.start_ns) / self.config.tick_ns
    }

    /// The first tick at or after `ns`: a timer never fires before its deadline.
    fn deadline_tick(&self, ns: u64) -> u64 {
        ns.saturating_sub(self.start_ns)
            .div_ceil(self.config.tick_ns)
    }

    fn next_wake_ns(&self, now: u64, budget_left: bool) -> u64 {
        let mut wake = self.next_housekeeping_ns;
        if let Some(tick) = self.wheel.next_expiration() {
            let mut tick = tick;
            if !budget_left {
                // This tick's probe budget is spent: come back at the next tick.
                tick = tick.max(self.tick_of(now) + 1);
            }
            wake = wake.min(
                self.start_ns
                    .saturating_add(tick.saturating_mul(self.config.tick_ns)),
            );
        }
        wake
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::AddPolicy { id, policy } => self.add_policy(id, &policy),
            Command::Watch {
                slot,
                fd,
                policy,
                now_ns,
            } => self.watch(slot, fd, policy, now_ns),
            Command::Unwatch { slot } => self.unwatch(slot),
            Command::SetPolicy { slot, policy } => {
                let now_tick = self.tick_of(monotonic_ns());
                if let Some(c) = self.conn_mut(slot) {
                    c.policy = policy;
                    let timer = c.timer;
                    self.wheel.reset(timer, now_tick);
                }
            }
            Command::Shutdown => {}
        }
    }

    fn add_policy(&mut self, id: u16, policy: &Policy) {
        let payload = match &policy.probe {
            Probe::Bytes(payload) => {
                let bytes: Box<[u8]> = payload.as_bytes().into();
                let next = self.payloads.len() as u16;
                *self.payload_ids.entry(bytes.clone()).or_insert_with(|| {
                    self.payloads.push(bytes);
                    next
                })
            }
            Probe::Kernel | Probe::Callback => 0,
        };
        let compiled = CompiledPolicy::new(policy, payload);
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

    fn watch(&mut self, slot: Slot, fd: RawFd, policy: u16, now: u64) {
        let Some(local) = self.local(slot) else {
            return;
        };
        let Some(p) = self.policies.get(policy as usize).copied() else {
            tracing::error!(%slot.index, policy, "watch refers to an unknown policy");
            return;
        };
        let (phase, first) = match (p.probe, p.mode) {
            (ProbeKind::Kernel, _) => (Phase::Kernel, Arm::exact(now + p.kernel_verdict_ns())),
            (_, crate::policy::Mode::KeepWarm) => (
                Phase::Watching,
                Arm {
                    at: now + p.interval_ns,
                    early: p.jitter_ns.min(p.interval_ns / 2),
                },
            ),
            _ => (
                Phase::Watching,
                Arm {
                    at: now + p.idle_ns,
                    early: p.jitter_ns,
                },
            ),
        };
        let first = self.place(first);
        let timer = self.wheel.insert(self.deadline_tick(first), local as u32);
        if self.conns.len() <= local {
            let free = ConnState::new(FREE_FD, timer, 0, Phase::Inert);
            self.conns.resize(local + 1, free);
        }
        self.conns[local] = ConnState::new(fd, timer, policy, phase);
        self.shared.counters.watched.fetch_add(1, Ordering::Relaxed);
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
            self.shared.counters.watched.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(cell) = self.shared.stats.get(local) {
            cell.reset();
        }
        self.shared.slots.free(slot);
    }

    /// Keeps the per-phase gauges in step with a phase change.
    fn gauge(&self, from: Phase, to: Phase) {
        if from != to {
            self.ungauge(from);
            if let Some(gauge) = self.phase_gauge(to) {
                gauge.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Takes a connection in `phase` out of the gauges (it is no longer watched).
    fn ungauge(&self, phase: Phase) {
        if let Some(gauge) = self.phase_gauge(phase) {
            gauge.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn phase_gauge(&self, phase: Phase) -> Option<&std::sync::atomic::AtomicU64> {
        let counters = &self.shared.counters;
        match phase {
            Phase::Probing => Some(&counters.probing),
            Phase::Dead => Some(&counters.dead_now),
            Phase::Inert => Some(&counters.inert_now),
            Phase::Watching | Phase::Kernel => None,
        }
    }

    /// Picks the moment an arm fires, in ns, inside its window `[at - early, at]`.
    ///
    /// A random point spreads connections that went idle together (a burst of registrations
    /// does not probe in one tick, and stays spread). That point is then snapped down onto the
    /// coalescing grid when the window allows, so connections due around the same time share
    /// a wake-up of the engine: on a VM each wake-up costs tens of microseconds, and at a
    /// million connections they would otherwise come every tick. Nothing fires later than
    /// `at`, so no bound moves.
    fn place(&mut self, arm: Arm) -> u64 {
        if arm.early == 0 {
            return arm.at;
        }
        let lo = arm.at.saturating_sub(arm.early);
        // xorshift64*: a different draw per arm.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
        let point = lo + ((u128::from(r) * u128::from(arm.early)) >> 32) as u64;
        if self.config.grid_ns > self.config.tick_ns {
            snap(point, lo, arm.at, self.start_ns, self.config.grid_ns)
        } else {
            point
        }
    }

    /// Fires the timers due at `now`. Returns whether probe budget is left in this tick.
    fn fire_due(&mut self, now: u64, turn_deadline_ns: u64) -> bool {
        let tick = self.tick_of(now);
        if self.probes_this_tick.0 != tick {
            self.probes_this_tick = (tick, 0);
        }
        let mut fires = 0;
        let mut batch = [0u32; PREFETCH_BATCH];
        'turn: while fires < MAX_FIRES_PER_TURN {
            // Each expiry queues at most one probe and one drain, so a batch this size cannot
            // overrun the tick's budget or the ring.
            let budget = (self.config.max_probes_per_tick - self.probes_this_tick.1)
                .min(self.ring.room() / 2) as usize;
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
                batch[n] = local;
                n += 1;
            }
            for &local in &batch[..n] {
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
        self.probes_this_tick.1 < self.config.max_probes_per_tick
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
        self.shared.counters.wakeups.fetch_add(1, Ordering::Relaxed);
        let p = self.policies[c.policy as usize];
        let mut queued = false;
        if c.resume != 0 {
            // The last probe went out short: finish it before anything else, or the stream
            // the peer parses is left with half a frame. It does not count as a probe.
            if let ProbeKind::Bytes(payload) = p.probe {
                self.rearm(local, Arm::exact(now + p.interval_ns));
                queued = self.push_probe(local, c, payload);
            }
        }
        if !queued {
            queued = self.evaluate(slot, local, c, &p, now);
        }
        if p.drain && c.fd >= 0 && self.conns[local].phase() != Phase::Inert {
            queued |= self.push_drain(local, c.fd);
        }
        if queued {
            // Released once the batch has completed, in `flush`.
            self.held.push(local as u32);
        } else {
            self.release(slot);
        }
    }

    /// Reads the connection's activity and acts on the verdict. Returns whether a request on
    /// its fd was queued.
    fn evaluate(
        &mut self,
        slot: Slot,
        local: usize,
        c: ConnState,
        p: &CompiledPolicy,
        now: u64,
    ) -> bool {
        let fd = borrow(c.fd);
        // Kernel probing reads TCP_INFO for the kernel's verdict; a source whose reads are that
        // same snapshot takes its activity from it, so the firing makes one getsockopt, not two.
        let info = (c.phase() == Phase::Kernel)
            .then(|| fd.map(tcp_info))
            .flatten();
        let snapshot = match &info {
            Some(Ok(info)) => self.source.activity_from_tcp_info(info, now),
            _ => None,
        };
        let read = snapshot.map_or_else(|| self.source.read(slot, fd), Ok);
        let activity = match read {
            Ok(a) => a,
            Err(err) => {
                tracing::debug!(conn = %ConnId::from_slot(slot), "reading activity: {err}");
                self.rearm(local, Arm::exact(now + p.interval_ns));
                return false;
            }
        };
        let base = self.start_ns + self.tick_of(now) * self.config.tick_ns;
        let verdict = if c.phase() == Phase::Kernel {
            match info {
                Some(Ok(info)) => decide_kernel(&mut self.conns[local], p, &activity, &info, now),
                _ => Verdict::Rearm(Arm::exact(now + p.interval_ns)),
            }
        } else {
            decide(
                &mut self.conns[local],
                p,
                &activity,
                now,
                base,
                self.resolution_ns,
            )
        };
        self.gauge(c.phase(), self.conns[local].phase());
        self.apply(slot, local, c, p, verdict)
    }

    fn apply(
        &mut self,
        slot: Slot,
        local: usize,
        before: ConnState,
        p: &CompiledPolicy,
        verdict: Verdict,
    ) -> bool {
        let id = ConnId::from_slot(slot);
        match verdict {
            Verdict::Rearm(at) => {
                if before.phase() == Phase::Watching {
                    self.shared
                        .counters
                        .wakeups_rearmed
                        .fetch_add(1, Ordering::Relaxed);
                }
                self.rearm(local, at);
            }
            Verdict::Probe(at) => {
                self.rearm(local, at);
                match p.probe {
                    ProbeKind::Bytes(payload) => {
                        return self.push_probe(local, before, payload);
                    }
                    ProbeKind::Callback => {
                        self.emit(Event::ProbeDue { id });
                        self.count_sent(local);
                    }
                    ProbeKind::Kernel => {}
                }
            }
            Verdict::Answered { rtt, next: at } => {
                self.shared
                    .counters
                    .probes_answered
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(cell) = self.shared.stats.get(local) {
                    cell.add_answered(rtt);
                }
                self.rearm(local, at);
            }
            Verdict::Dead {
                silent,
                probes,
                next: at,
            } => {
                self.shared.counters.dead.fetch_add(1, Ordering::Relaxed);
                self.emit(Event::Dead {
                    id,
                    after: Duration::from_nanos(silent),
                    probes,
                });
                let fd = borrow(self.conns[local].fd);
                match (p.on_dead, fd) {
                    (OnDead::Report, _) if at.at != u64::MAX => self.rearm(local, at),
                    (OnDead::Shutdown, Some(fd)) => {
                        if let Err(err) = socket::shutdown(fd) {
                            tracing::debug!(conn = %id, "shutting a dead connection down: {err}");
                        }
                        self.make_inert(local);
                    }
                    (OnDead::Reset, Some(fd)) => {
                        if let Err(err) = socket::reset(fd) {
                            tracing::debug!(conn = %id, "resetting a dead connection: {err}");
                        }
                        self.make_inert(local);
                    }
                    _ => self.make_inert(local),
                }
            }
            Verdict::Revived(at) => {
                self.shared.counters.revived.fetch_add(1, Ordering::Relaxed);
                self.emit(Event::Revived { id });
                self.rearm(local, at);
            }
            Verdict::Closed(reason) => {
                self.close(local, id, reason);
            }
        }
        false
    }

    fn make_inert(&mut self, local: usize) {
        let c = &mut self.conns[local];
        let old = c.phase();
        c.set_phase(Phase::Inert);
        let timer = c.timer;
        self.wheel.disarm(timer);
        self.gauge(old, Phase::Inert);
    }

    fn close(&mut self, local: usize, id: ConnId, reason: CloseReason) {
        self.shared.counters.closed.fetch_add(1, Ordering::Relaxed);
        self.emit(Event::Closed { id, reason });
        self.make_inert(local);
    }

    fn rearm(&mut self, local: usize, arm: Arm) {
        let at_ns = self.place(arm);
        let now_tick = self.wheel.now();
        let tick = self.deadline_tick(at_ns).max(now_tick + 1);
        let timer = self.conns[local].timer;
        self.wheel.reset(timer, tick);
    }

    fn release(&self, slot: Slot) {
        let released = self
            .shared
            .slots
            .transition(slot, SlotState::Busy, SlotState::Live);
        debug_assert!(released, "only the engine moves a slot out of Busy");
    }

    fn emit(&self, event: Event) {
        if let Err(flume::TrySendError::Full(_)) = self.shared.events.try_send(event) {
            self.shared
                .counters
                .events_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn count_sent(&self, local: usize) {
        self.shared
            .counters
            .probes_sent
            .fetch_add(1, Ordering::Relaxed);
        if let Some(cell) = self.shared.stats.get(local) {
            cell.add_sent();
        }
    }

    /// Queues the probe (or its unsent rest) for `local`. Returns false if nothing was queued,
    /// in which case the caller still holds the slot and must release it.
    fn push_probe(&mut self, local: usize, undo: ConnState, payload: u16) -> bool {
        let c = self.conns[local];
        let Some(bytes) = self.payloads.get(payload as usize) else {
            return false;
        };
        let offset = usize::from(c.resume).min(bytes.len());
        let rest = &bytes[offset..];
        let tag = self.inflight.len() as u64;
        let queued = if c.fd == VIRTUAL_FD {
            self.ring.push_nop(tag)
        } else {
            // SAFETY: payload buffers live in `self.payloads` for the engine's whole life and
            // are never modified; the submission completes within `flush`, before any change.
            unsafe {
                self.ring
                    .push_send(c.fd, rest.as_ptr(), rest.len() as u32, tag)
            }
        };
        if queued {
            // A no-op "sends" nothing and completes with 0, which must read as a whole probe.
            let len = if c.fd == VIRTUAL_FD {
                0
            } else {
                rest.len() as u32
            };
            self.inflight.push(Inflight {
                local: local as u32,
                op: Op::Probe { undo, len },
            });
            self.probes_this_tick.1 += 1;
        }
        queued
    }

    /// Queues a read that discards what the peer sent (policies with `drain`).
    fn push_drain(&mut self, local: usize, fd: RawFd) -> bool {
        let tag = self.inflight.len() as u64;
        // SAFETY: `drain_buf` lives as long as the worker and nothing reads it; the request
        // completes within `flush`.
        let queued = unsafe {
            self.ring
                .push_recv(fd, self.drain_buf.as_mut_ptr(), DRAIN_BYTES as u32, tag)
        };
        if queued {
            self.inflight.push(Inflight {
                local: local as u32,
                op: Op::Drain,
            });
        }
        queued
    }

    /// Submits the batch, applies each result, and releases every slot in it.
    fn flush(&mut self, now: u64) {
        if self.held.is_empty() {
            return;
        }
        // Once per batch rather than per probe: the tick's count only grows until the next tick.
        self.shared
            .counters
            .max_probes_per_tick
            .fetch_max(u64::from(self.probes_this_tick.1), Ordering::Relaxed);
        self.completions.clear();
        if let Err(err) = self.ring.submit(&mut self.completions) {
            // Nothing is known to have gone out: undo every probe of the batch.
            tracing::error!("io_uring submission failed: {err}");
            self.completions = (0..self.inflight.len() as u64)
                .map(|tag| Completion {
                    tag,
                    result: -libc::EAGAIN,
                })
                .collect();
        }
        let completions = std::mem::take(&mut self.completions);
        for done in &completions {
            self.complete(done, now);
        }
        self.completions = completions;
        self.inflight.clear();
        for local in std::mem::take(&mut self.held) {
            if let Some(slot) = self.shared.slots.slot_at(local) {
                self.release(slot);
            }
        }
    }

    fn complete(&mut self, done: &Completion, now: u64) {
        let Some(inflight) = self.inflight.get(done.tag as usize) else {
            return;
        };
        let local = inflight.local as usize;
        let (undo, len) = match inflight.op {
            Op::Probe { undo, len } => (undo, len),
            // What was read does not matter; an error shows up again at the next probe.
            Op::Drain => return,
        };
        let policy = self.policies[self.conns[local].policy as usize];
        match done.result {
            n if n >= 0 && n as u32 >= len => {
                self.conns[local].resume = 0;
                // A finished rest completes a probe that was counted as not sent.
                if undo.resume == 0 {
                    self.count_sent(local);
                }
                if self.conns[local].fd == VIRTUAL_FD
                    && let Some(slot) = self.shared.slots.slot_at(local as u32)
                {
                    self.source.probe_sent(slot, now);
                }
            }
            n if n > 0 => {
                // Short write: the send buffer is not empty, so the connection is not idle.
                // The rest goes out at the next tick; the probe does not count.
                let written = self.conns[local].resume as u32 + n as u32;
                self.restore(local, undo);
                self.conns[local].resume = written.min(u32::from(u8::MAX)) as u8;
                self.shared
                    .counters
                    .probes_deferred
                    .fetch_add(1, Ordering::Relaxed);
                self.rearm(local, Arm::exact(now + self.config.tick_ns));
            }
            e if e == -libc::EAGAIN || e == -libc::EWOULDBLOCK || e == 0 => {
                // A full send buffer: not idle. Try again an interval later, uncounted.
                self.restore(local, undo);
                self.shared
                    .counters
                    .probes_deferred
                    .fetch_add(1, Ordering::Relaxed);
                self.rearm(local, Arm::exact(now + policy.interval_ns));
            }
            e if [
                libc::EPIPE,
                libc::ECONNRESET,
                libc::ENOTCONN,
                libc::EBADF,
                libc::ETIMEDOUT,
                libc::EHOSTUNREACH,
                libc::ENETUNREACH,
            ]
            .contains(&-e) =>
            {
                if let Some(slot) = self.shared.slots.slot_at(local as u32) {
                    self.close(local, ConnId::from_slot(slot), CloseReason::SendFailed(-e));
                }
            }
            e => {
                tracing::debug!(
                    "probe send failed: {}",
                    std::io::Error::from_raw_os_error(-e)
                );
                self.restore(local, undo);
                self.rearm(local, Arm::exact(now + policy.interval_ns));
            }
        }
    }

    /// Puts a connection back as it was before a probe that did not go out.
    fn restore(&mut self, local: usize, undo: ConnState) {
        let c = &mut self.conns[local];
        let from = c.phase();
        let timer = c.timer;
        let resume = c.resume;
        *c = undo;
        c.timer = timer;
        c.resume = resume;
        self.gauge(from, undo.phase());
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

/// Marks a free connection record.
const FREE_FD: RawFd = -2;
/// The fd of a simulated connection: probes go to a no-op instead of a socket.
pub(crate) const VIRTUAL_FD: RawFd = -1;

/// CPU time of the calling thread: a turn's own work, unlike wall time, is not inflated when
/// the scheduler runs something else in the middle of it.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; the clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn borrow<'a>(fd: RawFd) -> Option<BorrowedFd<'a>> {
    // SAFETY: only called for the fd of a slot this thread holds `Busy`, which its handle
    // keeps open until the slot is released (see the ground rules in `shared`).
    (fd >= 0).then(|| unsafe { BorrowedFd::borrow_raw(fd) })
}
