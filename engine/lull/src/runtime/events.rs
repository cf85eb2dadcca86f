//! What comes out of an engine: events, and statistics per connection and in total.

use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use lull_common::flags;

use crate::activity::{Slot, SourceKind};

/// A watched connection's identity, unique within its engine group for as long as it is
/// watched (its slot and the slot's generation). Shown as `slot.generation`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl std::fmt::Debug for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConnId({self})")
    }
}

impl ConnId {
    pub(crate) fn from_slot(slot: Slot) -> Self {
        Self((u64::from(slot.generation) << 32) | u64::from(slot.index))
    }

    pub(crate) fn slot(self) -> Slot {
        Slot {
            index: self.0 as u32,
            generation: (self.0 >> 32) as u32,
        }
    }

    /// The id as one integer (for logs and metrics labels).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slot = self.slot();
        write!(f, "{}.{}", slot.index, slot.generation)
    }
}

/// Why a connection stopped being watched actively.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The peer sent FIN (it may still read: a half-close).
    PeerFin,
    /// The peer sent RST.
    PeerReset,
    /// This side closed or reset the connection.
    LocalClose,
    /// The socket reached `TCP_CLOSE` without a FIN or RST on the wire lull saw.
    Closed,
    /// A probe could not be sent: the errno of the failed `send`.
    SendFailed(i32),
}

impl CloseReason {
    pub(crate) fn from_flags(bits: u32) -> Self {
        if bits & flags::PEER_RST != 0 {
            Self::PeerReset
        } else if bits & flags::PEER_FIN != 0 {
            Self::PeerFin
        } else if bits & (flags::LOCAL_FIN | flags::LOCAL_RST) != 0 {
            Self::LocalClose
        } else {
            Self::Closed
        }
    }
}

/// Which tier of a policy found a peer dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeadTier {
    /// The peer's transport: the kernel's keepalive (or `TCP_USER_TIMEOUT`) gave up, so the
    /// peer host is gone or unreachable. Kernel-probed and tiered policies report these.
    Transport,
    /// The peer's application: its kernel may still answer, but the application answered none
    /// of lull's probes. Policies with lull's own probes report these.
    Application,
}

impl DeadTier {
    /// A short lowercase name, as used in reports and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Transport => "transport",
            Self::Application => "application",
        }
    }
}

/// Something an engine noticed about a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// None of the probes was answered: the peer is dead (or unreachable, or hung).
    Dead {
        /// The connection.
        id: ConnId,
        /// How long the peer had been silent when the verdict fell.
        after: Duration,
        /// Probes sent without an answer.
        probes: u32,
        /// Which tier found it dead.
        tier: DeadTier,
    },
    /// A connection reported dead (with [`OnDead::Report`](crate::OnDead)) received payload
    /// again.
    Revived {
        /// The connection.
        id: ConnId,
    },
    /// The connection closed; the engine stops probing it.
    Closed {
        /// The connection.
        id: ConnId,
        /// What was seen.
        reason: CloseReason,
    },
    /// A [`Probe::Callback`](crate::Probe) connection is due a probe: the application should
    /// send its own ping now. Payload received after this event answers it.
    ProbeDue {
        /// The connection.
        id: ConnId,
    },
}

impl Event {
    /// The connection the event is about.
    pub fn id(&self) -> ConnId {
        match *self {
            Self::Dead { id, .. }
            | Self::Revived { id }
            | Self::Closed { id, .. }
            | Self::ProbeDue { id } => id,
        }
    }
}

/// Probe statistics of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Probes written (or, for callback probes, requested).
    pub probes_sent: u32,
    /// Probes answered by payload from the peer.
    pub probes_answered: u32,
    /// Time from the last answered probe to the payload that answered it.
    pub last_rtt: Option<Duration>,
}

/// Per-slot statistics shared with handles: the engine writes, anyone reads.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct ConnStatsCell {
    sent: AtomicU32,
    answered: AtomicU32,
    /// Microseconds + 1 (0 = never measured).
    rtt_us: AtomicU32,
}

impl ConnStatsCell {
    pub(crate) fn reset(&self) {
        self.sent.store(0, Ordering::Relaxed);
        self.answered.store(0, Ordering::Relaxed);
        self.rtt_us.store(0, Ordering::Relaxed);
    }

    // Only the engine thread writes a cell: a load and a store, not a locked add (see
    // `add_single_writer`).
    pub(crate) fn add_sent(&self) {
        let sent = self.sent.load(Ordering::Relaxed);
        self.sent.store(sent.wrapping_add(1), Ordering::Relaxed);
    }

    pub(crate) fn add_answered(&self, rtt_ns: u64) {
        let answered = self.answered.load(Ordering::Relaxed);
        self.answered
            .store(answered.wrapping_add(1), Ordering::Relaxed);
        let us = (rtt_ns / 1_000).min(u64::from(u32::MAX - 1)) as u32;
        self.rtt_us.store(us + 1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ConnStats {
        let rtt = self.rtt_us.load(Ordering::Relaxed);
        ConnStats {
            probes_sent: self.sent.load(Ordering::Relaxed),
            probes_answered: self.answered.load(Ordering::Relaxed),
            last_rtt: (rtt != 0).then(|| Duration::from_micros(u64::from(rtt - 1))),
        }
    }
}

/// Totals of one engine (or, summed, of a group).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Connections watched now.
    pub watched: u64,
    /// Connections being probed now (at least one probe unanswered).
    pub probing: u64,
    /// Connections reported dead and still watched.
    pub dead_now: u64,
    /// Connections closed (or dead and shut down by the policy) and still watched: the engine
    /// does nothing more for them until their handles are dropped.
    pub inert_now: u64,
    /// Probes sent.
    pub probes_sent: u64,
    /// Probes answered.
    pub probes_answered: u64,
    /// Probes not sent because the socket's send buffer was full (so it was not idle).
    pub probes_deferred: u64,
    /// Timer expiries in total.
    pub wakeups: u64,
    /// Timer expiries that found traffic since the last arm and only re-armed.
    pub wakeups_rearmed: u64,
    /// Firings caused by the source noticing a close rather than by a timer (also counted in
    /// `wakeups`).
    pub wakeups_noticed: u64,
    /// Dead verdicts.
    pub dead: u64,
    /// Dead verdicts of the transport tier (the kernel gave up).
    pub dead_transport: u64,
    /// Dead verdicts of the application tier (lull's probes went unanswered).
    pub dead_application: u64,
    /// Reads submitted to drain what a peer sent (policies with `drain`).
    pub drains: u64,
    /// Firings of a draining policy that submitted no read, because nothing had arrived since
    /// the connection's last probe.
    pub drains_skipped: u64,
    /// Revivals after a dead verdict.
    pub revived: u64,
    /// Connections found closed.
    pub closed: u64,
    /// Events dropped because the event channel was full.
    pub events_dropped: u64,
    /// The longest single loop iteration of the engine thread, wall time, in microseconds
    /// (includes time the scheduler gave to other threads).
    pub max_loop_us: u64,
    /// The most CPU time one loop iteration took, in microseconds: the engine's own stall.
    pub max_loop_cpu_us: u64,
    /// The most probes sent in one tick (bounded by `max_probes_per_tick`).
    pub max_probes_per_tick: u64,
    /// UDP flows watched now (also counted in `watched`).
    pub datagram_flows: u64,
    /// Of those, the flows seen through their handles' calls ([`Observer::Wrapper`]); the
    /// rest are seen by the eBPF programs.
    ///
    /// [`Observer::Wrapper`]: crate::Observer::Wrapper
    pub datagram_flows_wrapper: u64,
    /// Probes (keep-warm or liveness datagrams) sent to UDP flows (also counted in
    /// `probes_sent`).
    pub datagram_probes_sent: u64,
    /// The activity source in use.
    pub source: Option<SourceKind>,
}

impl EngineStats {
    /// Adds another engine's totals to these (for groups).
    pub fn merge(&mut self, other: &EngineStats) {
        self.watched += other.watched;
        self.probing += other.probing;
        self.dead_now += other.dead_now;
        self.inert_now += other.inert_now;
        self.probes_sent += other.probes_sent;
        self.probes_answered += other.probes_answered;
        self.probes_deferred += other.probes_deferred;
        self.wakeups += other.wakeups;
        self.wakeups_rearmed += other.wakeups_rearmed;
        self.wakeups_noticed += other.wakeups_noticed;
        self.dead += other.dead;
        self.dead_transport += other.dead_transport;
        self.dead_application += other.dead_application;
        self.drains += other.drains;
        self.drains_skipped += other.drains_skipped;
        self.revived += other.revived;
        self.closed += other.closed;
        self.events_dropped += other.events_dropped;
        self.max_loop_us = self.max_loop_us.max(other.max_loop_us);
        self.max_loop_cpu_us = self.max_loop_cpu_us.max(other.max_loop_cpu_us);
        self.max_probes_per_tick = self.max_probes_per_tick.max(other.max_probes_per_tick);
        self.datagram_flows += other.datagram_flows;
        self.datagram_flows_wrapper += other.datagram_flows_wrapper;
        self.datagram_probes_sent += other.datagram_probes_sent;
        self.source = self.source.or(other.source);
    }
}

/// Adds `n` to a counter that only the engine thread writes, with a load and a store rather
/// than a locked read-modify-write: readers still see whole values, and a locked RMW on a
/// cache line that missed stalls the engine for the whole miss, where a store does not.
#[inline]
pub(crate) fn add_single_writer(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// [`add_single_writer`] by one.
#[inline]
pub(crate) fn bump(counter: &AtomicU64) {
    add_single_writer(counter, 1);
}

/// Takes one from a gauge that only the engine thread writes (see [`add_single_writer`]).
#[inline]
pub(crate) fn drop_one(gauge: &AtomicU64) {
    gauge.store(
        gauge.load(Ordering::Relaxed).wrapping_sub(1),
        Ordering::Relaxed,
    );
}

/// Raises a maximum that only the engine thread writes (see [`add_single_writer`]).
#[inline]
pub(crate) fn raise_to(max: &AtomicU64, value: u64) {
    if value > max.load(Ordering::Relaxed) {
        max.store(value, Ordering::Relaxed);
    }
}

/// The engine's counters, written by its thread alone (see [`add_single_writer`]) and read
/// by anyone.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) watched: AtomicU64,
    pub(crate) probing: AtomicU64,
    pub(crate) dead_now: AtomicU64,
    pub(crate) inert_now: AtomicU64,
    pub(crate) probes_sent: AtomicU64,
    pub(crate) probes_answered: AtomicU64,
    pub(crate) probes_deferred: AtomicU64,
    pub(crate) wakeups: AtomicU64,
    pub(crate) wakeups_rearmed: AtomicU64,
    pub(crate) wakeups_noticed: AtomicU64,
    pub(crate) dead: AtomicU64,
    pub(crate) dead_transport: AtomicU64,
    pub(crate) dead_application: AtomicU64,
    pub(crate) drains: AtomicU64,
    pub(crate) drains_skipped: AtomicU64,
    pub(crate) revived: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) events_dropped: AtomicU64,
    pub(crate) max_loop_us: AtomicU64,
    pub(crate) max_loop_cpu_us: AtomicU64,
    pub(crate) max_probes_per_tick: AtomicU64,
    pub(crate) datagram_flows: AtomicU64,
    pub(crate) datagram_flows_wrapper: AtomicU64,
    pub(crate) datagram_probes_sent: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self, source: SourceKind) -> EngineStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EngineStats {
            watched: get(&self.watched),
            probing: get(&self.probing),
            dead_now: get(&self.dead_now),
            inert_now: get(&self.inert_now),
            probes_sent: get(&self.probes_sent),
            probes_answered: get(&self.probes_answered),
            probes_deferred: get(&self.probes_deferred),
            wakeups: get(&self.wakeups),
            wakeups_rearmed: get(&self.wakeups_rearmed),
            wakeups_noticed: get(&self.wakeups_noticed),
            dead: get(&self.dead),
            dead_transport: get(&self.dead_transport),
            dead_application: get(&self.dead_application),
            drains: get(&self.drains),
            drains_skipped: get(&self.drains_skipped),
            revived: get(&self.revived),
            closed: get(&self.closed),
            events_dropped: get(&self.events_dropped),
            max_loop_us: get(&self.max_loop_us),
            max_loop_cpu_us: get(&self.max_loop_cpu_us),
            max_probes_per_tick: get(&self.max_probes_per_tick),
            datagram_flows: get(&self.datagram_flows),
            datagram_flows_wrapper: get(&self.datagram_flows_wrapper),
            datagram_probes_sent: get(&self.datagram_probes_sent),
            source: Some(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_id_round_trips_its_slot() {
        let slot = Slot {
            index: 0xdead_beef,
            generation: 0x1234_5678,
        };
        assert_eq!(ConnId::from_slot(slot).slot(), slot);
    }

    #[test]
    fn close_reason_prefers_what_the_peer_did() {
        let cases = [
            (flags::PEER_RST | flags::PEER_FIN, CloseReason::PeerReset),
            (flags::PEER_FIN | flags::LOCAL_FIN, CloseReason::PeerFin),
            (flags::LOCAL_RST, CloseReason::LocalClose),
            (flags::STATE_CLOSE, CloseReason::Closed),
        ];
        for (bits, want) in cases {
            assert_eq!(CloseReason::from_flags(bits), want, "{bits:#x}");
        }
    }

    #[test]
    fn rtt_is_kept_in_microseconds() {
        let cell = ConnStatsCell::default();
        assert_eq!(cell.snapshot().last_rtt, None);
        cell.add_sent();
        cell.add_answered(1_234_567);
        let s = cell.snapshot();
        assert_eq!((s.probes_sent, s.probes_answered), (1, 1));
        assert_eq!(s.last_rtt, Some(Duration::from_micros(1_234)));
        cell.add_answered(0);
        assert_eq!(cell.snapshot().last_rtt, Some(Duration::ZERO));
    }
}
