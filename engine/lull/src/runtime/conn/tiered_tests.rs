//! Tiered policies: the kernel's keepalive watches the transport, lull's own probes only the
//! application, and each verdict says which tier made it.

use std::time::Duration;

use super::{
    tests::{MS, S, act, conn, policy, tcp_info},
    *,
};

/// A tiered policy: kernel keepalive after 10 s, every 2 s, 3 probes (dead bound 16 s); lull's
/// own probes only after 60 s less 3 intervals of silence, in a 10% window ending there.
fn tiered() -> CompiledPolicy {
    CompiledPolicy::new(
        &Policy::detect_dead(Duration::from_secs(10), Duration::from_secs(2), 3)
            .with_hung_after(Duration::from_secs(60)),
        0,
        FlowKind::Stream,
    )
}

#[test]
fn tiered_policies_split_the_verdicts_by_tier() {
    let p = tiered();
    // The application tier's window: [54 - 5.4, 54] s after the last rx.
    let cases = [
        (
            "quiet for less than the application tier's window: nothing to send",
            Phase::Watching,
            act(100 * S, 0),
            140 * S,
            Verdict::Rearm(Arm {
                at: 154 * S,
                early: 5_400 * MS,
            }),
        ),
        (
            "quiet into the window: the application tier probes",
            Phase::Watching,
            act(100 * S, 0),
            149 * S,
            Verdict::Probe(Arm::exact(151 * S)),
        ),
        (
            "the kernel gave up (its timeout, reported by the source): transport tier",
            Phase::Probing,
            Activity {
                flags: flags::STATE_CLOSE | flags::TIMED_OUT | flags::KEEPALIVE_EXPIRED,
                ..act(100 * S, 0)
            },
            117 * S,
            Verdict::Dead {
                silent: 17 * S,
                probes: 3,
                tier: DeadTier::Transport,
                next: None,
            },
        ),
        (
            "the application tier's probes not even acknowledged: the transport is gone",
            Phase::Probing,
            act(100 * S, 100 * S),
            158 * S,
            Verdict::Dead {
                silent: 58 * S,
                probes: 3,
                tier: DeadTier::Transport,
                next: Some(Arm::exact(160 * S)),
            },
        ),
        (
            "acknowledged by the peer's kernel, answered by nobody: the application is hung",
            Phase::Probing,
            act(100 * S, 153 * S),
            158 * S,
            Verdict::Dead {
                silent: 58 * S,
                probes: 3,
                tier: DeadTier::Application,
                next: Some(Arm::exact(160 * S)),
            },
        ),
        (
            "an orderly close is a close, not a death",
            Phase::Watching,
            Activity {
                flags: flags::PEER_FIN | flags::STATE_CLOSE,
                ..act(100 * S, 0)
            },
            117 * S,
            Verdict::Closed(CloseReason::PeerFin),
        ),
    ];
    for (name, phase, seen, now, want) in cases {
        let probing = phase == Phase::Probing;
        // Probing: three probes out, the last at 156 s, the first at 152 s.
        let mut c = conn(
            phase,
            if probing { 3 } else { 0 },
            if probing { 156 * S } else { 0 },
        );
        assert_eq!(decide(&mut c, &p, &seen, now, now, 0), want, "{name}");
    }
    // Reported dead by the application tier, then closed by the kernel: one death, a close.
    let mut c = conn(Phase::Dead, 0, 156 * S);
    let timed_out = Activity {
        flags: flags::STATE_CLOSE | flags::TIMED_OUT,
        ..act(100 * S, 0)
    };
    assert_eq!(
        decide(&mut c, &p, &timed_out, 170 * S, 170 * S, 0),
        Verdict::Closed(CloseReason::Closed)
    );
    // Not tiered, the same timeout is a plain close, as it always was.
    let mut c = conn(Phase::Watching, 0, 0);
    let seen = Activity {
        flags: flags::STATE_CLOSE | flags::TIMED_OUT,
        ..act(100 * S, 0)
    };
    let plain = policy(Mode::DetectDead, ActivityMode::RxOnly);
    assert_eq!(
        decide(&mut c, &plain, &seen, 117 * S, 117 * S, 0),
        Verdict::Closed(CloseReason::Closed)
    );
}

#[test]
fn tiered_on_tcp_info_looks_at_the_kernels_verdict_first_and_again_in_time() {
    let p = tiered();
    let now = 120 * S;
    // Alive: the kernel's next possible verdict (last ACK 1 s ago, + 16 s) comes before the
    // application tier's window (rx at 100 s: 148.6 s).
    let mut c = conn(Phase::Watching, 0, 0);
    assert_eq!(
        decide_tiered(
            &mut c,
            &p,
            &act(100 * S, 0),
            &tcp_info(1, 0, 1_000),
            (now, now),
            0
        ),
        Verdict::Rearm(Arm::exact(135 * S + 250 * MS))
    );
    // Keepalive gave up: dead at the transport tier, whatever the application tier thought.
    let mut c = conn(Phase::Probing, 1, 118 * S);
    assert!(matches!(
        decide_tiered(
            &mut c,
            &p,
            &act(100 * S, 0),
            &tcp_info(7, 3, 0),
            (now, now),
            0
        ),
        Verdict::Dead {
            tier: DeadTier::Transport,
            ..
        }
    ));
    assert_eq!(c.phase(), Phase::Inert);
}

/// lull's first application probe waits while the kernel's keepalive has probes out: sent
/// then, it would stop the keepalive and leave a vanished peer to the retransmission timer,
/// up to `TCP_USER_TIMEOUT` after lull's probe. It waits a quarter interval at a time, and no
/// longer than the kernel's own verdict.
#[test]
fn tiered_application_probe_waits_for_the_kernels_keepalive_probes() {
    let p = tiered();
    // Due: silent since 100 s, the application tier's window ends at 154 s.
    let now = 154 * S;
    let rx = act(100 * S, 0);
    let cases = [
        (
            "no keepalive probe out: the probe goes",
            tcp_info(1, 0, 3_000),
            None,
        ),
        (
            "one keepalive probe out (last ACK 11 s ago): look again in a quarter interval",
            tcp_info(1, 1, 11_000),
            Some(Arm::exact(now + 500 * MS)),
        ),
        (
            "the kernel gives up sooner than that (last ACK 15.9 s ago): look just after",
            tcp_info(1, 2, 15_900),
            Some(Arm::exact(now + 100 * MS + 250 * MS)),
        ),
    ];
    for (what, info, wait) in cases {
        let mut c = conn(Phase::Watching, 0, 0);
        let verdict = decide_tiered(&mut c, &p, &rx, &info, (now, now), 0);
        match wait {
            None => {
                assert!(matches!(verdict, Verdict::Probe(_)), "{what}: {verdict:?}");
                assert_eq!(c.phase(), Phase::Probing, "{what}");
            }
            Some(arm) => {
                assert_eq!(verdict, Verdict::Rearm(arm), "{what}");
                assert_eq!(
                    (c.phase(), c.outstanding(), c.mark()),
                    (Phase::Watching, 0, 0),
                    "{what}: the state is untouched"
                );
            }
        }
    }
}
