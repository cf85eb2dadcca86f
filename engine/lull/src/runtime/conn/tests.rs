use std::time::Duration;

use lull_common::flags;

use super::*;
use crate::wheel::TimingWheel;

pub(super) const MS: u64 = 1_000_000;
pub(super) const S: u64 = 1_000 * MS;

pub(super) fn policy(mode: Mode, activity: ActivityMode) -> CompiledPolicy {
    let base = match mode {
        Mode::DetectDead => Policy::detect_dead(Duration::from_secs(30), Duration::from_secs(5), 3),
        Mode::KeepWarm => Policy::keep_warm(Duration::from_secs(25)),
    };
    CompiledPolicy::new(&base.with_activity(activity), 0, FlowKind::Stream)
}

pub(super) fn conn(phase: Phase, outstanding: u32, mark: u64) -> ConnState {
    let key = TimingWheel::new().insert(0, 0);
    let mut c = ConnState::new(3, key, 0, phase);
    c.set_outstanding(outstanding);
    c.set_mark(mark);
    c
}

pub(super) fn act(rx: u64, tx: u64) -> Activity {
    Activity {
        last_rx_ns: rx,
        last_tx_ns: tx,
        flags: 0,
    }
}

#[test]
fn state_packs_phase_outstanding_and_mark() {
    let mut c = conn(Phase::Watching, 0, 0);
    for phase in [
        Phase::Watching,
        Phase::Probing,
        Phase::Dead,
        Phase::Inert,
        Phase::Kernel,
    ] {
        for n in [0, 1, 17, 31] {
            c.set_phase(phase);
            c.set_outstanding(n);
            assert_eq!((c.phase(), c.outstanding()), (phase, n));
        }
    }
    for mark in [0, 1, u64::from(u32::MAX) + 1, u64::MAX - 1] {
        c.set_mark(mark);
        assert_eq!(c.mark(), mark);
    }
}

/// One row: the connection before, what the source shows, when the timer fires, and what
/// must come out (verdict, then phase and outstanding probes after).
struct Case {
    name: &'static str,
    mode: Mode,
    activity: ActivityMode,
    before: (Phase, u32, u64),
    seen: Activity,
    now: u64,
    want: Verdict,
    after: (Phase, u32),
}

/// An idle arm: its window, the default 10% jitter (3 s) wide, is centred on `idle` after the
/// last activity, so it ends 31.5 s after it.
fn idle_arm(at: u64) -> Arm {
    Arm { at, early: 3 * S }
}

/// 31.5 s: where an idle arm's window ends, after the last activity.
const IDLE_EDGE: u64 = 31_500 * MS;

/// A keep-warm arm for a 25 s interval: 10% jitter, 2.5 s of slack.
fn warm_arm(at: u64) -> Arm {
    Arm {
        at,
        early: 2_500 * MS,
    }
}

#[test]
fn decisions_follow_the_policy() {
    use ActivityMode::{RxOnly, RxOrTx};
    use Mode::{DetectDead, KeepWarm};
    use Phase::{Dead, Inert, Kernel, Probing, Watching};
    let cases = [
        Case {
            name: "traffic since the arm: re-arm at last rx + idle, no probe",
            mode: DetectDead,
            activity: RxOnly,
            before: (Watching, 0, 0),
            seen: act(100 * S, 0),
            now: 110 * S,
            want: Verdict::Rearm(idle_arm(100 * S + IDLE_EDGE)),
            after: (Watching, 0),
        },
        Case {
            name: "rx-only mode ignores our own sends",
            mode: DetectDead,
            activity: RxOnly,
            before: (Watching, 0, 0),
            seen: act(100 * S, 129 * S),
            now: 130 * S,
            want: Verdict::Probe(Arm::exact(135 * S)),
            after: (Probing, 1),
        },
        Case {
            name: "rx-or-tx mode counts sends as activity",
            mode: DetectDead,
            activity: RxOrTx,
            before: (Watching, 0, 0),
            seen: act(100 * S, 129 * S),
            now: 130 * S,
            want: Verdict::Rearm(idle_arm(129 * S + IDLE_EDGE)),
            after: (Watching, 0),
        },
        Case {
            name: "silent for idle: first probe",
            mode: DetectDead,
            activity: RxOnly,
            before: (Watching, 0, 0),
            seen: act(100 * S, 100 * S),
            now: 130 * S,
            want: Verdict::Probe(Arm::exact(135 * S)),
            after: (Probing, 1),
        },
        Case {
            name: "inside the jitter window counts as idle: the window is centred on idle",
            mode: DetectDead,
            activity: RxOnly,
            before: (Watching, 0, 0),
            seen: act(100 * S, 0),
            now: 128_500 * MS,
            want: Verdict::Probe(Arm::exact(133_500 * MS)),
            after: (Probing, 1),
        },
        Case {
            name: "just before the jitter window: not yet",
            mode: DetectDead,
            activity: RxOnly,
            before: (Watching, 0, 0),
            seen: act(100 * S, 0),
            now: 128_500 * MS - 1,
            want: Verdict::Rearm(idle_arm(100 * S + IDLE_EDGE)),
            after: (Watching, 0),
        },
        Case {
            name: "answer after the probe: back to watching, rtt measured",
            mode: DetectDead,
            activity: RxOnly,
            before: (Probing, 1, 130 * S),
            seen: act(130 * S + 40 * MS, 130 * S),
            now: 135 * S,
            want: Verdict::Answered {
                rtt: 40 * MS,
                next: idle_arm(130 * S + 40 * MS + IDLE_EDGE),
            },
            after: (Watching, 0),
        },
        Case {
            name: "no answer: next probe, exactly an interval on",
            mode: DetectDead,
            activity: RxOnly,
            before: (Probing, 1, 130 * S),
            seen: act(100 * S, 130 * S),
            now: 135 * S,
            want: Verdict::Probe(Arm::exact(140 * S)),
            after: (Probing, 2),
        },
        Case {
            name: "count probes unanswered: dead, silence measured from last rx",
            mode: DetectDead,
            activity: RxOnly,
            before: (Probing, 3, 140 * S),
            seen: act(100 * S, 140 * S),
            now: 145 * S,
            want: Verdict::Dead {
                silent: 45 * S,
                probes: 3,
                tier: DeadTier::Application,
                next: Some(Arm::exact(150 * S)),
            },
            after: (Dead, 0),
        },
        Case {
            name: "dead and still silent: keep watching for a revival",
            mode: DetectDead,
            activity: RxOnly,
            before: (Dead, 0, 140 * S),
            seen: act(100 * S, 140 * S),
            now: 150 * S,
            want: Verdict::Rearm(Arm::exact(155 * S)),
            after: (Dead, 0),
        },
        Case {
            name: "dead, then payload: revived",
            mode: DetectDead,
            activity: RxOnly,
            before: (Dead, 0, 140 * S),
            seen: act(151 * S, 140 * S),
            now: 155 * S,
            want: Verdict::Revived(idle_arm(151 * S + IDLE_EDGE)),
            after: (Watching, 0),
        },
        Case {
            name: "closed wins over everything",
            mode: DetectDead,
            activity: RxOnly,
            before: (Probing, 2, 130 * S),
            seen: Activity {
                flags: flags::PEER_RST,
                ..act(100 * S, 0)
            },
            now: 135 * S,
            want: Verdict::Closed(CloseReason::PeerReset),
            after: (Inert, 2),
        },
        Case {
            name: "inert: nothing to do, not even a close to report again",
            mode: DetectDead,
            activity: RxOnly,
            before: (Inert, 0, 130 * S),
            seen: Activity {
                flags: flags::PEER_RST,
                ..act(100 * S, 0)
            },
            now: 135 * S,
            want: Verdict::Disarm,
            after: (Inert, 0),
        },
        Case {
            name: "kernel-probed, its timeouts reported by the source: look again when the \
                   kernel could first have given up, should the notice not come",
            mode: DetectDead,
            activity: RxOnly,
            before: (Kernel, 0, 0),
            seen: act(100 * S, 0),
            now: 130 * S,
            want: Verdict::Rearm(Arm::exact(145 * S + 250 * MS)),
            after: (Kernel, 0),
        },
        Case {
            name: "keep-warm: tx within interval, re-arm",
            mode: KeepWarm,
            activity: RxOnly,
            before: (Watching, 0, 0),
            seen: act(0, 100 * S),
            now: 110 * S,
            want: Verdict::Rearm(warm_arm(125 * S)),
            after: (Watching, 0),
        },
        Case {
            name: "keep-warm: rx does not count, tx silence does",
            mode: KeepWarm,
            activity: RxOnly,
            before: (Watching, 0, 0),
            seen: act(124 * S, 100 * S),
            now: 125 * S,
            want: Verdict::Probe(Arm::exact(150 * S)),
            after: (Watching, 0),
        },
        Case {
            name: "keep-warm: our own last probe counts as tx",
            mode: KeepWarm,
            activity: RxOnly,
            before: (Watching, 0, 125 * S),
            seen: act(0, 100 * S),
            now: 126 * S,
            want: Verdict::Rearm(warm_arm(150 * S)),
            after: (Watching, 0),
        },
    ];
    for case in cases {
        let p = policy(case.mode, case.activity);
        let (phase, outstanding, mark) = case.before;
        let mut c = conn(phase, outstanding, mark);
        let got = decide(&mut c, &p, &case.seen, case.now, case.now, 0);
        assert_eq!(got, case.want, "{}", case.name);
        assert_eq!((c.phase(), c.outstanding()), case.after, "{}", case.name);
    }
}

#[test]
fn intervals_count_from_the_start_of_the_tick() {
    // Probes fired together on one tick are checked together on one later tick, however late
    // in the tick each was handled.
    let p = policy(Mode::DetectDead, ActivityMode::RxOnly);
    let mut c = conn(Phase::Watching, 0, 0);
    let got = decide(&mut c, &p, &act(100 * S, 0), 130 * S + 700_000, 130 * S, 0);
    assert_eq!(got, Verdict::Probe(Arm::exact(135 * S)));
    assert_eq!(c.mark(), 130 * S + 700_000, "the probe's own time is exact");
}

#[test]
fn min_probe_spacing_defers_the_next_round() {
    let p = CompiledPolicy::new(
        &Policy::detect_dead(Duration::from_secs(30), Duration::from_secs(10), 3)
            .with_min_probe_spacing(Duration::from_secs(10)),
        0,
        FlowKind::Stream,
    );
    let mut c = conn(Phase::Watching, 0, 125 * S);
    let got = decide(&mut c, &p, &act(100 * S, 0), 130 * S, 130 * S, 0);
    assert_eq!(
        got,
        Verdict::Rearm(Arm::exact(135 * S)),
        "last probe was 5 s ago"
    );
    assert_eq!(c.phase(), Phase::Watching);
    let got = decide(&mut c, &p, &act(100 * S, 0), 135 * S, 135 * S, 0);
    assert_eq!(got, Verdict::Probe(Arm::exact(145 * S)));
}

#[test]
fn coarse_sources_count_an_answer_stamped_just_before_the_probe() {
    let p = policy(Mode::DetectDead, ActivityMode::RxOnly);
    // TCP_INFO rounds to milliseconds and jiffies: an answer 1 ms after the probe may read as
    // 3 ms before it.
    let mut c = conn(Phase::Probing, 1, 130 * S);
    let seen = act(130 * S - 3 * MS, 0);
    assert!(matches!(
        decide(&mut c, &p, &seen, 135 * S, 135 * S, 0),
        Verdict::Probe(_)
    ));
    let mut c = conn(Phase::Probing, 1, 130 * S);
    assert!(matches!(
        decide(&mut c, &p, &seen, 135 * S, 135 * S, 11 * MS),
        Verdict::Answered { .. }
    ));
}

pub(super) fn tcp_info(state: u8, probes: u8, last_ack_ms: u32) -> libc::tcp_info {
    // SAFETY: `tcp_info` is plain integers, for which all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    info.tcpi_state = state;
    info.tcpi_probes = probes;
    info.tcpi_last_ack_recv = last_ack_ms;
    info
}

#[test]
fn kernel_mode_reports_the_kernels_verdict() {
    let p = CompiledPolicy::new(
        &Policy::detect_dead(Duration::from_secs(10), Duration::from_secs(2), 3)
            .with_probe(Probe::Kernel),
        0,
        FlowKind::Stream,
    );
    let now = 200 * S;
    let cases = [
        // (flags seen, tcp_info, verdict)
        (
            0,
            tcp_info(1, 0, 1_000),
            Verdict::Rearm(Arm::exact(215 * S + 250 * MS)),
        ),
        (
            flags::STATE_CLOSE,
            tcp_info(7, 3, 0),
            Verdict::Dead {
                silent: 100 * S,
                probes: 3,
                tier: DeadTier::Transport,
                next: None,
            },
        ),
        (
            flags::LOCAL_RST | flags::STATE_CLOSE,
            tcp_info(7, 0, 0),
            Verdict::Dead {
                silent: 100 * S,
                probes: 3,
                tier: DeadTier::Transport,
                next: None,
            },
        ),
        (
            flags::PEER_RST,
            tcp_info(7, 0, 0),
            Verdict::Closed(CloseReason::PeerReset),
        ),
        (0, tcp_info(8, 0, 0), Verdict::Closed(CloseReason::PeerFin)),
    ];
    for (bits, info, want) in cases {
        let mut c = conn(Phase::Kernel, 0, 0);
        let seen = Activity {
            flags: bits,
            ..act(100 * S, 0)
        };
        assert_eq!(
            decide_kernel(&mut c, &p, &seen, &info, now),
            want,
            "{bits:#x} {}",
            info.tcpi_state
        );
    }
}
