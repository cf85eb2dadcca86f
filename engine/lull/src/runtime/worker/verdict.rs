//! What a firing does: read the connection's activity, decide, and act on the verdict, from
//! re-arming its timer to sending a probe, reporting it dead or putting it to rest.

use std::{sync::atomic::AtomicU64, time::Duration};

use crate::{
    activity::Slot,
    policy::OnDead,
    socket::{self, tcp_info},
};

use super::{
    super::{
        CloseReason, ConnId, DeadTier, Event, Observer,
        conn::{
            Arm, CompiledPolicy, ConnState, Phase, ProbeKind, Verdict, after_kernel_probe, decide,
            decide_kernel, decide_tiered, kernel_probing,
        },
        events::{bump, drop_one},
    },
    Worker, borrow,
};

/// What a firing's evaluation did.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Evaluation {
    /// A request on the connection's fd was queued.
    pub(super) queued: bool,
    /// Payload arrived since the connection's last probe.
    pub(super) arrived: bool,
}

impl Worker {
    /// Reads the connection's activity and acts on the verdict.
    pub(super) fn evaluate(
        &mut self,
        slot: Slot,
        local: usize,
        c: ConnState,
        p: &CompiledPolicy,
        now: u64,
    ) -> Evaluation {
        let fd = borrow(c.fd);
        // Where the kernel watches the transport, its verdict comes from a source that reports
        // timeouts, or else from TCP_INFO; a source whose reads are that same snapshot takes
        // its activity from it, so the firing makes one getsockopt, not two.
        let info =
            (c.phase() != Phase::Inert && p.kernel_watched() && !self.source.reports_timeouts())
                .then(|| fd.map(tcp_info))
                .flatten();
        let snapshot = match &info {
            Some(Ok(info)) => self.source.activity_from_tcp_info(info, now),
            _ => None,
        };
        let read = match p.flow.observer() {
            // The handle's own stamps: the flow's chosen observer, or what is left of an eBPF
            // one after the source failed (its datagram rows are stamped all along).
            Some(Observer::Wrapper) => Ok(self.shared.datagram_activity(slot)),
            Some(Observer::Ebpf) if self.source_failed => Ok(self.shared.datagram_activity(slot)),
            _ => snapshot.map_or_else(|| self.source.read(slot, fd), Ok),
        };
        let activity = match read {
            Ok(a) => a,
            Err(err) => {
                tracing::debug!(conn = %ConnId::from_slot(slot), "reading activity: {err}");
                self.rearm(local, Arm::exact(now + p.interval_ns));
                return Evaluation::default();
            }
        };
        let base = self.placement.tick_start(self.placement.tick_of(now));
        let verdict = match (c.phase(), info) {
            (Phase::Kernel, Some(Ok(info))) => {
                decide_kernel(&mut self.conns[local], p, &activity, &info, now)
            }
            (_, Some(Ok(info))) => decide_tiered(
                &mut self.conns[local],
                p,
                &activity,
                &info,
                (now, base),
                self.resolution_ns,
            ),
            _ => {
                let verdict = decide(
                    &mut self.conns[local],
                    p,
                    &activity,
                    now,
                    base,
                    self.resolution_ns,
                );
                // A source that reports the kernel's timeouts needs no TCP_INFO to watch the
                // transport, but a tiered connection about to get lull's first probe asks it
                // once whether the kernel's keepalive is probing (see `kernel_probing`).
                match (&verdict, fd) {
                    (Verdict::Probe(_), Some(fd)) if p.tiered && c.phase() == Phase::Watching => {
                        match tcp_info(fd) {
                            Ok(info) if kernel_probing(&info) => {
                                self.conns[local] = c;
                                Verdict::Rearm(after_kernel_probe(p, &info, now))
                            }
                            _ => verdict,
                        }
                    }
                    _ => verdict,
                }
            }
        };
        self.gauge(c.phase(), self.conns[local].phase());
        // Something arrived since the connection's last probe (or since it was watched): an
        // answer, or traffic, that a draining policy must read. Nothing else is worth a read.
        let arrived = activity.last_rx_ns > c.mark()
            || matches!(verdict, Verdict::Answered { .. } | Verdict::Revived(_));
        Evaluation {
            queued: self.apply(slot, local, c, p, verdict),
            arrived,
        }
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
                    bump(&self.shared.counters.wakeups_rearmed);
                }
                self.rearm(local, at);
            }
            Verdict::Probe(at) => {
                self.rearm(local, at);
                match p.probe {
                    ProbeKind::Bytes(payload) => {
                        let dest = if p.flow.is_addressed() {
                            match self.destinations.get(&(local as u32)) {
                                Some(dest) => Some(dest),
                                // Cannot happen: the watch that made the flow named its peer.
                                None => return false,
                            }
                        } else {
                            None
                        };
                        return self.batch.push_probe(
                            local,
                            &self.conns[local],
                            payload,
                            before,
                            dest,
                        );
                    }
                    ProbeKind::Callback => {
                        self.emit(Event::ProbeDue { id });
                        self.count_sent(local, p);
                    }
                    ProbeKind::Kernel => {}
                }
            }
            Verdict::Answered { rtt, next: at } => {
                bump(&self.shared.counters.probes_answered);
                if let Some(cell) = self.shared.stats.get(local) {
                    cell.add_answered(rtt);
                }
                self.rearm(local, at);
            }
            Verdict::Dead {
                silent,
                probes,
                tier,
                next,
            } => {
                let counters = &self.shared.counters;
                bump(&counters.dead);
                bump(match tier {
                    DeadTier::Transport => &counters.dead_transport,
                    DeadTier::Application => &counters.dead_application,
                });
                self.emit(Event::Dead {
                    id,
                    after: Duration::from_nanos(silent),
                    probes,
                    tier,
                });
                let fd = borrow(self.conns[local].fd);
                match (p.on_dead, fd, next) {
                    (OnDead::Report, _, Some(next)) => self.rearm(local, next),
                    (OnDead::Shutdown, Some(fd), _) => {
                        if let Err(err) = socket::shutdown(fd) {
                            tracing::debug!(conn = %id, "shutting a dead connection down: {err}");
                        }
                        self.make_inert(local);
                    }
                    (OnDead::Reset, Some(fd), _) => {
                        if let Err(err) = socket::reset(fd) {
                            tracing::debug!(conn = %id, "resetting a dead connection: {err}");
                        }
                        self.make_inert(local);
                    }
                    _ => self.make_inert(local),
                }
            }
            Verdict::Revived(at) => {
                bump(&self.shared.counters.revived);
                self.emit(Event::Revived { id });
                self.rearm(local, at);
            }
            Verdict::Closed(reason) => {
                self.close(local, id, reason);
            }
            Verdict::Disarm => {
                self.wheel.disarm(self.conns[local].timer);
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

    pub(super) fn close(&mut self, local: usize, id: ConnId, reason: CloseReason) {
        bump(&self.shared.counters.closed);
        self.emit(Event::Closed { id, reason });
        self.make_inert(local);
    }

    /// Re-arms `local`'s timer for the moment `arm` is placed at, and never for the tick under
    /// way: that one has been polled already.
    pub(super) fn rearm(&mut self, local: usize, arm: Arm) {
        let at_ns = self.placement.place(arm);
        let tick = self
            .placement
            .deadline_tick(at_ns)
            .max(self.wheel.now() + 1);
        let timer = self.conns[local].timer;
        self.wheel.reset(timer, tick);
    }

    /// Keeps the per-phase gauges in step with a phase change.
    pub(super) fn gauge(&self, from: Phase, to: Phase) {
        if from != to {
            self.ungauge(from);
            if let Some(gauge) = self.phase_gauge(to) {
                bump(gauge);
            }
        }
    }

    /// Takes a connection in `phase` out of the gauges (it is no longer watched).
    pub(super) fn ungauge(&self, phase: Phase) {
        if let Some(gauge) = self.phase_gauge(phase) {
            drop_one(gauge);
        }
    }

    fn phase_gauge(&self, phase: Phase) -> Option<&AtomicU64> {
        let counters = &self.shared.counters;
        match phase {
            Phase::Probing => Some(&counters.probing),
            Phase::Dead => Some(&counters.dead_now),
            Phase::Inert => Some(&counters.inert_now),
            Phase::Watching | Phase::Kernel => None,
        }
    }

    fn emit(&self, event: Event) {
        if let Err(flume::TrySendError::Full(_)) = self.shared.events.try_send(event) {
            bump(&self.shared.counters.events_dropped);
        }
    }

    pub(super) fn count_sent(&self, local: usize, p: &CompiledPolicy) {
        bump(&self.shared.counters.probes_sent);
        if p.flow.is_datagram() {
            bump(&self.shared.counters.datagram_probes_sent);
        }
        if let Some(cell) = self.shared.stats.get(local) {
            cell.add_sent();
        }
    }
}
