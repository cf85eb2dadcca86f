//! Keep-warm for UDP flows: a datagram only after a whole interval with nothing sent.

use std::time::Duration;

use super::*;
use crate::{runtime::flow::Observer, wheel::TimingWheel};

const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;

fn keep_warm() -> CompiledPolicy {
    CompiledPolicy::new(
        &Policy::keep_warm(Duration::from_secs(1)),
        0,
        FlowKind::Datagram {
            observer: Observer::Ebpf,
            addressed: false,
        },
    )
}

fn watched_at(t: u64) -> ConnState {
    let key = TimingWheel::new().insert(0, 0);
    let mut c = ConnState::new(3, key, 0, Phase::Watching);
    c.set_mark(t);
    c
}

fn sent(at: u64) -> Activity {
    Activity {
        last_rx_ns: 0,
        last_tx_ns: at,
        flags: 0,
    }
}

/// Fires `c`'s timer `fires` times, each at the earliest moment its arm allows (the worst case
/// for a datagram sent too early), with the application sending every `every` ns from 0 (or
/// never); returns when each probe was decided.
fn run(c: &mut ConnState, p: &CompiledPolicy, every: Option<u64>, until: u64) -> Vec<u64> {
    let mut arm = p.keep_warm_arm(c.mark());
    let mut probes = Vec::new();
    loop {
        let now = arm.at - arm.early;
        if now > until {
            return probes;
        }
        let last_app = every.map_or(0, |e| now / e * e);
        // Our own datagram is seen leaving a moment after it was decided.
        let last_tx = match probes.last() {
            Some(&probe) if probe + 2 * MS <= now => last_app.max(probe + 2 * MS),
            _ => last_app,
        };
        arm = match decide(c, p, &sent(last_tx), now, now, 0) {
            Verdict::Probe(next) => {
                probes.push(now);
                next
            }
            Verdict::Rearm(next) => next,
            other => panic!("keep-warm decided {other:?}"),
        };
    }
}

#[test]
fn traffic_just_inside_the_interval_draws_no_datagram() {
    let p = keep_warm();
    for every in [S / 2, 900 * MS, 950 * MS, 990 * MS] {
        let mut c = watched_at(0);
        let probes = run(&mut c, &p, Some(every), 200 * S);
        assert!(
            probes.is_empty(),
            "traffic every {every} ns drew {probes:?}"
        );
    }
}

#[test]
fn a_silent_flow_gets_one_datagram_per_interval_exactly() {
    let p = keep_warm();
    let mut c = watched_at(0);
    let probes = run(&mut c, &p, None, 100 * S + 50 * MS);
    assert_eq!(probes.len(), 100, "{probes:?}");
    assert_eq!(probes[0], S, "the first a whole interval after the watch");
    assert!(
        probes.windows(2).all(|w| w[1] - w[0] == S),
        "then one per interval, its own echo postponing nothing: {probes:?}"
    );
}

#[test]
fn the_first_datagram_after_traffic_waits_a_whole_interval_from_it() {
    let p = keep_warm();
    let mut c = watched_at(0);
    // The application sent at 10 s, a while after our datagram of 9.9 s.
    c.set_mark(9_900 * MS);
    let app = 10 * S;
    match decide(&mut c, &p, &sent(app), 10_900 * MS, 10_900 * MS, 0) {
        Verdict::Rearm(arm) => {
            assert_eq!(arm.at - arm.early, app + S, "never before a whole interval");
            assert!(
                arm.early > 0,
                "a late window spreads flows that went quiet together"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        decide(&mut c, &p, &sent(app), app + S, app + S, 0),
        Verdict::Probe(_)
    ));
}
