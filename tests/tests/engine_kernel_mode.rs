//! `Probe::Kernel`: the engine hands probing to the kernel's keepalive and reports its verdict.

use std::{
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use lull::{Engine, Event, Policy, Probe};
use lull_tests::{
    Source, both_sources, engine,
    netns::NetnsPair,
    peers::{Behaviour, PeerServer},
    percentile, serial,
};

const CONNS: usize = 100;

fn policy() -> Policy {
    Policy::detect_dead(Duration::from_secs(1), Duration::from_secs(1), 2).with_probe(Probe::Kernel)
}

fn getsockopt(fd: i32, level: i32, name: i32) -> i32 {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the declared size.
    let ret = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) };
    assert_eq!(ret, 0, "getsockopt: {}", std::io::Error::last_os_error());
    value
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
    let listener = pair.within(&pair.b, || {
        TcpListener::bind((pair.addr_b, 0)).expect("bind in b")
    });
    let peer = PeerServer::start_on(listener, Behaviour::Silent);
    let addr = peer.addr();
    let conns: Vec<TcpStream> = pair.within(&pair.a, || {
        (0..CONNS)
            .map(|_| TcpStream::connect(addr).expect("connect across the veth"))
            .collect()
    });
    // A hung application on a healthy path, for contrast: the kernel's keepalive is answered
    // by the peer's kernel and sees nothing wrong.
    let hung_peer = PeerServer::start(Behaviour::Silent);
    let policy = policy();
    let mut watched = Vec::new();
    for s in conns {
        watched.push(engine.watch(s, &policy).expect("watch"));
    }
    let hung: Vec<_> = hung_peer
        .connect(CONNS)
        .into_iter()
        .map(|(s, _)| engine.watch(s, &policy).expect("watch"))
        .collect();

    for w in &watched {
        let fd = w.as_raw_fd();
        assert_eq!(getsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 1);
        assert_eq!(getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 1);
        assert_eq!(getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 2);
        assert_eq!(
            getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
            3_000
        );
    }

    let start = Instant::now();
    pair.blackhole_b();
    let bound = policy.detection_bound();
    let deadline = start + bound * 3;
    let mut latencies = Vec::new();
    let blackholed: std::collections::HashSet<_> = watched.iter().map(|w| w.id()).collect();
    while latencies.len() < CONNS && Instant::now() < deadline {
        match engine.events().recv_timeout(deadline - Instant::now()) {
            Ok(Event::Dead { id, .. }) => {
                assert!(
                    blackholed.contains(&id),
                    "a connection on a healthy path was reported dead"
                );
                latencies.push(start.elapsed());
            }
            Ok(other) => panic!("{source:?}: unexpected event {other:?}"),
            Err(_) => break,
        }
    }
    assert_eq!(
        latencies.len(),
        CONNS,
        "{source:?}: every blackholed connection is dead within {:?}",
        bound * 3
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
}
