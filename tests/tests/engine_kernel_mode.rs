//! `Probe::Kernel`: the engine hands probing to the kernel's keepalive and reports its verdict.

use std::time::{Duration, Instant};

use lull::{Engine, Event, Policy, Probe};
use lull_harness::{Behaviour, PeerServer};
use lull_tests::{
    Source, assert_exactly_once, assert_source_kept, both_sources, engine, netns::NetnsPair,
    percentile, serial, watch_n,
};
use socket2::SockRef;

const CONNS: usize = 100;

const ONE_S: Duration = Duration::from_secs(1);

fn policy() -> Policy {
    Policy::detect_dead(ONE_S, ONE_S, 2).with_probe(Probe::Kernel)
}

both_sources!(kernel_mode_sets_the_options_and_reports_a_blackholed_peer_dead);
fn kernel_mode_sets_the_options_and_reports_a_blackholed_peer_dead(source: Source) {
    let _serial = serial();
    let name = "kernel_mode_sets_the_options_and_reports_a_blackholed_peer_dead";
    let Some(pair) = NetnsPair::create(name) else {
        return;
    };
    let Some(engine) = engine(name, source, Engine::builder().capacity(1024)) else {
        return;
    };
    let peer = pair.peer_in_b(Behaviour::Silent);
    let conns = pair.connect_from_a(&peer, CONNS);
    // A hung application on a healthy path, for contrast: the kernel's keepalive is answered
    // by the peer's kernel and sees nothing wrong.
    let hung_peer = PeerServer::start(Behaviour::Silent);
    let policy = policy();
    let mut watched = Vec::new();
    for s in conns {
        watched.push(engine.watch(s, &policy).expect("watch"));
    }
    let hung = watch_n(&engine, &hung_peer, CONNS, &policy);

    for w in &watched {
        let sock = SockRef::from(&**w);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(sock.tcp_keepalive_time().expect("TCP_KEEPIDLE"), ONE_S);
        assert_eq!(sock.tcp_keepalive_interval().expect("TCP_KEEPINTVL"), ONE_S);
        assert_eq!(sock.tcp_keepalive_retries().expect("TCP_KEEPCNT"), 2);
        assert_eq!(
            sock.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(Duration::from_secs(3)),
            "idle + count * interval"
        );
    }

    let start = Instant::now();
    pair.blackhole_b();
    let bound = policy.detection_bound();
    let deadline = start + bound * 3;
    let mut dead = Vec::new();
    let mut latencies = Vec::new();
    // Until every blackholed connection could have been reported, and two of the engine's
    // kernel-mode check periods (250 ms) more, so that a connection reported twice is seen too.
    let mut linger = None;
    loop {
        if linger.is_none() && dead.len() >= CONNS {
            linger = Some(Instant::now() + Duration::from_millis(500));
        }
        let until = linger.unwrap_or(deadline);
        match engine
            .events()
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            Ok(Event::Dead { id, .. }) => {
                dead.push(id);
                latencies.push(start.elapsed());
            }
            Ok(other) => panic!("{source:?}: unexpected event {other:?}"),
            Err(_) => break,
        }
    }
    // Exactly the blackholed ones: not the hung peers on the healthy path, whose kernel
    // answers keepalives.
    let blackholed: std::collections::HashSet<_> = watched.iter().map(|w| w.id()).collect();
    assert_exactly_once(
        &format!(
            "{source:?}: blackholed connections reported dead within {:?}",
            bound * 3
        ),
        dead,
        &blackholed,
    );
    latencies.sort();
    eprintln!(
        "{source:?}: kernel-mode detection after blackhole (bound {bound:?}): p50 {:?} p99 {:?} max {:?}",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().unwrap()
    );
    // The kernel acts on TCP_USER_TIMEOUT only when a retransmission timer fires, and the
    // engine looks at kernel-mode sockets every 250 ms: the same slack the fault tests allow.
    let slack = Duration::from_secs(1);
    assert!(
        *latencies.last().unwrap() <= bound + slack,
        "{source:?}: kernel-mode detection took {:?}, over {bound:?} + {slack:?}",
        latencies.last().unwrap()
    );
    for w in &hung {
        assert_eq!(w.stats().probes_answered, 0);
    }
    assert_eq!(
        engine.stats().dead,
        CONNS as u64,
        "the hung peers' kernel answers keepalives"
    );
    assert_source_kept(&engine, source.kind());
}
