//! One connection's state in the engine thread, and the lazy decision taken when its timer
//! fires.
//!
//! Traffic never touches a timer. A timer fires at the earliest moment the connection *could*
//! have become idle; [`decide`] then looks at what the activity source saw and either re-arms
//! at `last_activity + idle` (the connection was busy: the common case, and no probe) or
//! probes. This is how the kernel's own `tcp_keepalive_timer` works, with one difference: the
//! clock read and the activity read are shared by every connection due in the same tick.

use std::os::fd::RawFd;

use lull_common::flags;

use crate::{
    activity::Activity,
    policy::{ActivityMode, Mode, OnDead, Policy, Probe},
    wheel::TimerKey,
};

use super::{
    events::{CloseReason, DeadTier},
    flow::FlowKind,
};

/// The engine thread's record of one connection. 24 bytes: with the wheel entry (24), the
/// shared slot word (4) and the shared statistics (12), a connection costs 64 bytes of engine
/// memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnState {
    /// The socket, or -1 for a simulated connection.
    pub(crate) fd: RawFd,
    /// The connection's one timer; kept for its whole life and re-armed in place.
    pub(crate) timer: TimerKey,
    /// `CLOCK_MONOTONIC` ns of the last probe sent (0: never), split to keep 4-byte alignment.
    mark: [u32; 2],
    /// Index into the engine's policy table.
    pub(crate) policy: u16,
    /// Phase in the low 3 bits, unanswered probes in the high 5.
    packed: u8,
    /// Bytes of the current probe already written by a short write (0: none pending).
    pub(crate) resume: u8,
}

const _: () = assert!(size_of::<ConnState>() == 24);

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// Armed for the next possible idle moment.
    Watching = 0,
    /// At least one probe is unanswered.
    Probing = 1,
    /// Reported dead and left open (on-dead = report); watched for revival.
    Dead = 2,
    /// Closed, or dead and shut down: nothing more to do until the handle is dropped.
    Inert = 3,
    /// Kernel keepalive is doing the probing; the engine checks its verdict.
    Kernel = 4,
}

impl ConnState {
    pub(crate) fn new(fd: RawFd, timer: TimerKey, policy: u16, phase: Phase) -> Self {
        let mut c = Self {
            fd,
            timer,
            mark: [0; 2],
            policy,
            packed: 0,
            resume: 0,
        };
        c.set_phase(phase);
        c
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.packed & 0x7 {
            0 => Phase::Watching,
            1 => Phase::Probing,
            2 => Phase::Dead,
            4 => Phase::Kernel,
            _ => Phase::Inert,
        }
    }

    pub(crate) fn set_phase(&mut self, phase: Phase) {
        self.packed = (self.packed & !0x7) | phase as u8;
    }

    pub(crate) fn outstanding(&self) -> u32 {
        u32::from(self.packed >> 3)
    }

    pub(crate) fn set_outstanding(&mut self, n: u32) {
        debug_assert!(n <= crate::policy::MAX_COUNT);
        self.packed = (self.packed & 0x7) | ((n.min(31) as u8) << 3);
    }

    pub(crate) fn mark(&self) -> u64 {
        (u64::from(self.mark[0]) << 32) | u64::from(self.mark[1])
    }

    pub(crate) fn set_mark(&mut self, ns: u64) {
        self.mark = [(ns >> 32) as u32, ns as u32];
    }
}

/// How a compiled policy probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProbeKind {
    /// Bytes from the engine's payload table.
    Bytes(u16),
    /// Kernel keepalive.
    Kernel,
    /// The application's own ping.
    Callback,
}

/// A [`Policy`] in the units the engine thread works in.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CompiledPolicy {
    pub(crate) idle_ns: u64,
    pub(crate) interval_ns: u64,
    pub(crate) count: u32,
    /// The jitter window as a fraction of `idle`, in ns.
    pub(crate) jitter_ns: u64,
    /// Silence after which lull probes: the far edge of an idle arm's window. `idle` plus half
    /// the window, so the window is centred on `idle`; for a tiered policy, `hung_after` less
    /// `count` intervals, so that its verdict falls by `hung_after`.
    pub(crate) probe_after_ns: u64,
    /// The width of an idle arm's window, ending at `probe_after_ns`.
    pub(crate) probe_window_ns: u64,
    /// The transport is left to the kernel's keepalive; lull probes only for hung applications.
    pub(crate) tiered: bool,
    pub(crate) mode: Mode,
    pub(crate) activity: ActivityMode,
    pub(crate) on_dead: OnDead,
    pub(crate) probe: ProbeKind,
    pub(crate) min_spacing_ns: u64,
    pub(crate) drain: bool,
    /// What the flows of this policy are (a policy is compiled once per kind).
    pub(crate) flow: FlowKind,
}

impl CompiledPolicy {
    pub(crate) fn new(policy: &Policy, payload: u16, flow: FlowKind) -> Self {
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let idle_ns = ns(policy.idle);
        let interval_ns = ns(policy.interval);
        let jitter_ns = (idle_ns as f64 * policy.jitter) as u64;
        let (probe_after_ns, probe_window_ns) = match policy.hung_after {
            Some(hung) => {
                let span = ns(hung).saturating_sub(interval_ns * u64::from(policy.count));
                (span, (span as f64 * policy.jitter) as u64)
            }
            None => (idle_ns + jitter_ns / 2, jitter_ns),
        };
        Self {
            idle_ns,
            interval_ns,
            count: policy.count,
            jitter_ns,
            probe_after_ns,
            probe_window_ns,
            tiered: policy.hung_after.is_some(),
            mode: policy.mode,
            activity: policy.activity,
            on_dead: policy.on_dead,
            probe: match policy.probe {
                Probe::Bytes(_) => ProbeKind::Bytes(payload),
                Probe::Kernel => ProbeKind::Kernel,
                Probe::Callback => ProbeKind::Callback,
            },
            min_spacing_ns: ns(policy.min_probe_spacing),
            drain: policy.drain,
            flow,
        }
    }

    /// The first arm of a keep-warm flow watched at `now`.
    pub(crate) fn keep_warm_arm(&self, now: u64) -> Arm {
        let window = self.keep_warm_window();
        if self.flow.is_datagram() {
            // Never before `interval`: the window is late (see `keep_warm_datagram`).
            Arm {
                at: now + self.interval_ns + window,
                early: window,
            }
        } else {
            Arm {
                at: now + self.interval_ns,
                early: window,
            }
        }
    }

    /// The slack of a keep-warm arm after traffic: the jitter, at most half an interval.
    fn keep_warm_window(&self) -> u64 {
        self.jitter_ns.min(self.interval_ns / 2)
    }

    /// When a kernel-probed connection can first have been declared dead by the kernel.
    pub(crate) fn kernel_verdict_ns(&self) -> u64 {
        self.idle_ns + self.interval_ns * u64::from(self.count)
    }

    /// The first arm of a tiered connection whose source does not report the kernel's
    /// timeouts (`TCP_INFO`): the first moment the kernel's keepalive could have given up, if
    /// that comes before lull's own first probe, which it does unless `hung_after` is long.
    pub(crate) fn first_tiered_arm(&self, now: u64) -> Arm {
        let look = Arm::exact(now + self.kernel_verdict_ns() + KERNEL_VERDICT_SLACK_NS);
        let idle = self.idle_arm(now);
        if look.at < idle.at.saturating_sub(idle.early) {
            look
        } else {
            idle
        }
    }

    /// Whether the kernel watches this connection's transport (kernel probes, or the
    /// transport tier of a tiered policy).
    pub(crate) fn kernel_watched(&self) -> bool {
        self.tiered || self.probe == ProbeKind::Kernel
    }

    /// When a connection last heard from at `last` is due a probe of lull's: a window of
    /// `probe_window_ns` ending `probe_after_ns` after it.
    pub(crate) fn idle_arm(&self, last: u64) -> Arm {
        Arm {
            at: last + self.probe_after_ns,
            early: self.probe_window_ns,
        }
    }
}

/// When to fire next: anywhere in `[at - early, at]`.
///
/// Idle arms have the policy's jitter as their window, centred on `idle` (so connections probe
/// once per `idle` on average, no more): that slack is what spreads a herd of connections
/// registered together, and what lets the engine put many arms on the same coarse tick (see
/// the worker's coalescing). Arms that wait for an answer or count an interval have no slack:
/// they fire exactly at `at`, so the dead-peer bound never grows past the window's far edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Arm {
    pub(crate) at: u64,
    pub(crate) early: u64,
}

impl Arm {
    /// An arm with no slack.
    pub(crate) const fn exact(at: u64) -> Self {
        Self { at, early: 0 }
    }

    /// Whether `now` is inside the arm's window, or past it.
    fn reached(self, now: u64) -> bool {
        now >= self.at.saturating_sub(self.early)
    }
}

/// What to do after a timer fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing to send; re-arm.
    Rearm(Arm),
    /// Send a probe now (it was counted into the state already), and re-arm.
    Probe(Arm),
    /// The last probe was answered: `rtt` ns after it went out. Re-arm.
    Answered { rtt: u64, next: Arm },
    /// The peer is dead after `probes` unanswered probes and `silent` ns of silence. Re-arm
    /// at `next` to watch for a revival, unless the policy acts on the socket; `None` when
    /// nothing can revive it (the kernel gave up and closed the socket).
    Dead {
        silent: u64,
        probes: u32,
        tier: DeadTier,
        next: Option<Arm>,
    },
    /// A dead connection received payload again. Re-arm.
    Revived(Arm),
    /// The connection closed.
    Closed(CloseReason),
    /// The connection is inert: nothing will happen to it until its handle is dropped, so its
    /// timer is disarmed rather than filed for a far future the wheel would keep cascading.
    Disarm,
}

/// The decision when `c`'s timer fires at `now`, given what the source saw.
///
/// `base` is the start of the current tick (at most `now`): arms that count an interval from
/// this moment count it from there, so that arms fired on a shared tick stay on shared ticks.
/// `resolution` is how coarse the source's stamps are: payload stamped up to that long before
/// a probe still answers it. Mutates `c` to the state the verdict leaves it in.
pub(crate) fn decide(
    c: &mut ConnState,
    p: &CompiledPolicy,
    a: &Activity,
    now: u64,
    base: u64,
    resolution: u64,
) -> Verdict {
    let answered = a.last_rx_ns != 0 && a.last_rx_ns + resolution >= c.mark();
    let interval = Arm::exact(base + p.interval_ns);
    match (p.mode, c.phase()) {
        // Closed or acted on already: an inert connection fires only if a new policy asked for
        // a look, and there is nothing to look at (nor a close to report again).
        (_, Phase::Inert) => Verdict::Disarm,
        _ if a.closed() => {
            // A connection already reported dead is not reported again when the kernel then
            // gives up on it too: that is its close.
            let reported = c.phase() == Phase::Dead;
            c.set_phase(Phase::Inert);
            if p.kernel_watched() && a.flags & flags::TIMED_OUT != 0 && !reported {
                Verdict::Dead {
                    silent: now.saturating_sub(a.last_rx_ns),
                    probes: p.count,
                    tier: DeadTier::Transport,
                    next: None,
                }
            } else {
                Verdict::Closed(CloseReason::from_flags(a.flags))
            }
        }
        // The kernel probes; a source that reports its timeouts (with a prompt notice of the
        // close) was read above. This look is only the fallback for a notice that never
        // came: the kernel's verdict cannot be earlier than its bound after the last activity
        // the source saw.
        (_, Phase::Kernel) => Verdict::Rearm(Arm::exact(
            (a.last_rx_ns.max(a.last_tx_ns) + p.kernel_verdict_ns()).max(now + p.interval_ns)
                + KERNEL_VERDICT_SLACK_NS,
        )),
        (Mode::KeepWarm, _) if p.flow.is_datagram() => keep_warm_datagram(c, p, a, now, base),
        (Mode::KeepWarm, _) => {
            // Our own probes are tx too, so this is "one probe per interval of tx silence";
            // the mark covers sources whose tx stamp is coarser than a probe.
            let due = Arm {
                at: a.last_tx_ns.max(c.mark()) + p.interval_ns,
                early: p.keep_warm_window(),
            };
            if due.reached(now) {
                c.set_mark(now);
                // Exact from here: an early window on every arm would send more than one probe
                // per interval on average. The window only spreads the first arm after traffic.
                Verdict::Probe(interval)
            } else {
                Verdict::Rearm(due)
            }
        }
        (Mode::DetectDead, Phase::Watching) => {
            let last = match p.activity {
                ActivityMode::RxOnly => a.last_rx_ns,
                ActivityMode::RxOrTx => a.last_rx_ns.max(a.last_tx_ns),
            };
            let due = p.idle_arm(last);
            if !due.reached(now) {
                return Verdict::Rearm(due);
            }
            if c.mark() != 0 && now < c.mark() + p.min_spacing_ns {
                return Verdict::Rearm(Arm::exact(c.mark() + p.min_spacing_ns));
            }
            c.set_phase(Phase::Probing);
            c.set_outstanding(1);
            c.set_mark(now);
            Verdict::Probe(interval)
        }
        (Mode::DetectDead, Phase::Probing) => {
            if answered {
                let rtt = a.last_rx_ns.saturating_sub(c.mark());
                c.set_phase(Phase::Watching);
                c.set_outstanding(0);
                let last = a.last_rx_ns.max(match p.activity {
                    ActivityMode::RxOnly => 0,
                    ActivityMode::RxOrTx => a.last_tx_ns,
                });
                return Verdict::Answered {
                    rtt,
                    next: p.idle_arm(last),
                };
            }
            if c.outstanding() < p.count {
                c.set_outstanding(c.outstanding() + 1);
                c.set_mark(now);
                return Verdict::Probe(interval);
            }
            let probes = c.outstanding();
            // A tiered connection whose peer's kernel did not even acknowledge lull's probes
            // has lost its transport, not its application: the kernel, which sends no
            // keepalive while those probes are in flight, would say so later (at its user
            // timeout), and the verdict is the transport tier's.
            let first_probe = c
                .mark()
                .saturating_sub(u64::from(probes.saturating_sub(1)) * p.interval_ns);
            let acknowledged = a.last_tx_ns + resolution >= first_probe;
            let tier = if p.tiered && !acknowledged {
                DeadTier::Transport
            } else {
                DeadTier::Application
            };
            c.set_phase(Phase::Dead);
            c.set_outstanding(0);
            Verdict::Dead {
                silent: now.saturating_sub(a.last_rx_ns),
                probes,
                tier,
                next: Some(interval),
            }
        }
        (Mode::DetectDead, Phase::Dead) => {
            if answered {
                c.set_phase(Phase::Watching);
                Verdict::Revived(p.idle_arm(a.last_rx_ns))
            } else {
                Verdict::Rearm(interval)
            }
        }
    }
}

/// How long after our own keep-warm datagram its tx stamp may land: the egress program stamps
/// it as it leaves, up to a turn's work (a few ms) after the tick the decision was made on. A
/// stamp this close to the mark is taken for our datagram, not the application's.
pub(crate) const OWN_DATAGRAM_ECHO_NS: u64 = 50_000_000;

/// Keep-warm for a UDP flow: a datagram only once nothing was sent to the peer for
/// `interval`, as WireGuard's persistent keepalive does. Unlike a TCP connection's keep-warm
/// window, which is centred on the interval, this one is late: the application's own
/// datagrams, however close to the interval, never draw a keep-warm datagram. So the first
/// keep-warm datagram after the application's last goes out between `interval` and
/// `interval + window` after it (the window spreads flows that fell silent together), and then
/// one every `interval` exactly, as a fixed-period sender would.
///
/// The mark is our last keep-warm datagram (or the watch), on the tick grid. A tx stamp within
/// [`OWN_DATAGRAM_ECHO_NS`] of it is that datagram itself, seen leaving by the egress program;
/// a later one is the application's.
fn keep_warm_datagram(
    c: &mut ConnState,
    p: &CompiledPolicy,
    a: &Activity,
    now: u64,
    base: u64,
) -> Verdict {
    let own = c.mark();
    let due = if a.last_tx_ns > own + OWN_DATAGRAM_ECHO_NS {
        let window = p.keep_warm_window();
        Arm {
            at: a.last_tx_ns + p.interval_ns + window,
            early: window,
        }
    } else {
        Arm::exact(own + p.interval_ns)
    };
    if due.reached(now) {
        c.set_mark(base);
        Verdict::Probe(Arm::exact(base + p.interval_ns))
    } else {
        Verdict::Rearm(due)
    }
}

/// The decision for a kernel-probed connection: the kernel sends the probes, so the engine
/// only reads its verdict, once `idle + count * interval` after the last sign of life.
///
/// A socket the kernel closed without a FIN or RST from the peer died of keepalive or of
/// `TCP_USER_TIMEOUT`: that is `Dead`. (Keepalive exhaustion sends a RST of its own, which the
/// eBPF source sees as a local reset; the application cannot have closed it, because a
/// dropped handle is never decided on.) `TCP_INFO` cannot show a peer's RST, so for that
/// source a closed socket only counts as dead if the kernel had probes or retransmissions
/// outstanding.
pub(crate) fn decide_kernel(
    c: &mut ConnState,
    p: &CompiledPolicy,
    a: &Activity,
    info: &libc::tcp_info,
    now: u64,
) -> Verdict {
    use crate::activity::TcpState;

    let state = TcpState::from_raw(info.tcpi_state);
    let peer_closed = a.flags & (flags::PEER_FIN | flags::PEER_RST) != 0;
    let kernel_gave_up = state == TcpState::Close
        && !peer_closed
        && (a.flags & (flags::STATE_CLOSE | flags::LOCAL_RST) != 0
            || info.tcpi_probes > 0
            || info.tcpi_retransmits > 0
            || info.tcpi_backoff > 0);
    if kernel_gave_up {
        c.set_phase(Phase::Inert);
        return Verdict::Dead {
            silent: now.saturating_sub(a.last_rx_ns),
            probes: u32::from(info.tcpi_probes).max(p.count),
            tier: DeadTier::Transport,
            next: None,
        };
    }
    let bits = a.flags | state.close_flags();
    if bits & flags::CLOSED_MASK != 0 {
        c.set_phase(Phase::Inert);
        return Verdict::Closed(CloseReason::from_flags(bits));
    }
    // An ACK of a keepalive probe is the kernel's "answered"; it postpones the verdict just as
    // payload does.
    let last_ack = now.saturating_sub(u64::from(info.tcpi_last_ack_recv) * 1_000_000);
    let last = a.last_rx_ns.max(last_ack);
    Verdict::Rearm(Arm::exact(
        (last + p.kernel_verdict_ns()).max(now) + KERNEL_VERDICT_SLACK_NS,
    ))
}

/// The decision for a tiered connection whose source cannot report the kernel's timeouts
/// (`TCP_INFO`): the kernel's verdict first, from the snapshot; then lull's application tier;
/// and the next look at the kernel's verdict, when that comes before the application tier's
/// next arm.
pub(crate) fn decide_tiered(
    c: &mut ConnState,
    p: &CompiledPolicy,
    a: &Activity,
    info: &libc::tcp_info,
    (now, base): (u64, u64),
    resolution: u64,
) -> Verdict {
    if c.phase() == Phase::Inert {
        return Verdict::Disarm;
    }
    let mut kernel = *c;
    let kernel_look = match decide_kernel(&mut kernel, p, a, info, now) {
        Verdict::Rearm(look) => look,
        verdict => {
            *c = kernel;
            return verdict;
        }
    };
    let sooner = |arm: Arm| {
        if kernel_look.at < arm.at.saturating_sub(arm.early) {
            kernel_look
        } else {
            arm
        }
    };
    let before = *c;
    match decide(c, p, a, now, base, resolution) {
        Verdict::Probe(_) if before.phase() == Phase::Watching && kernel_probing(info) => {
            *c = before;
            Verdict::Rearm(after_kernel_probe(p, info, now))
        }
        Verdict::Rearm(arm) => Verdict::Rearm(sooner(arm)),
        Verdict::Answered { rtt, next } => Verdict::Answered {
            rtt,
            next: sooner(next),
        },
        Verdict::Revived(arm) => Verdict::Revived(sooner(arm)),
        // Probes and dead verdicts come back within an interval, which is sooner.
        verdict => verdict,
    }
}

/// Whether the kernel's keepalive has probes out that the peer has not answered yet.
///
/// A tiered connection's application probe waits while it has: lull's probe would be data in
/// flight, which stops the kernel's keepalive and leaves the verdict to the retransmission
/// timer, up to `TCP_USER_TIMEOUT` after lull's probe instead of `idle + count * interval`
/// after the peer was last heard. A vanished peer would then be found late, by up to
/// `count` intervals.
pub(crate) fn kernel_probing(info: &libc::tcp_info) -> bool {
    info.tcpi_probes > 0
}

/// When to look again at a tiered connection whose application probe waits for the kernel's
/// keepalive ([`kernel_probing`]): soon, because a live peer's kernel answers within a round
/// trip and the probe should not wait long (its verdict is due by `hung_after`), and at the
/// latest when the kernel gives up, whose notice then makes the verdict the transport tier's.
pub(crate) fn after_kernel_probe(p: &CompiledPolicy, info: &libc::tcp_info, now: u64) -> Arm {
    let last_ack = now.saturating_sub(u64::from(info.tcpi_last_ack_recv) * 1_000_000);
    let kernel_verdict = (last_ack + p.kernel_verdict_ns()).max(now) + KERNEL_VERDICT_SLACK_NS;
    Arm::exact(kernel_verdict.min(now + (p.interval_ns / 4).max(KERNEL_PROBE_LOOK_MIN_NS)))
}

/// The shortest wait for a kernel keepalive probe's answer.
const KERNEL_PROBE_LOOK_MIN_NS: u64 = 10_000_000;

/// How long after the kernel could have given up the engine looks: its keepalive timer runs
/// with jiffy resolution and may fire late under load.
const KERNEL_VERDICT_SLACK_NS: u64 = 250_000_000;

#[cfg(test)]
mod datagram_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tiered_tests;
