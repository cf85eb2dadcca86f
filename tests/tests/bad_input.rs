//! Bad things handed to the engine: typed errors, never panics, and the engine keeps serving
//! the connections it has (issue: reliability and security).

use std::{
    net::{TcpListener, UdpSocket},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    time::Duration,
};

use lull::{Engine, Policy, PolicyError, WatchError, activity::ActivityError};
use lull_harness::{Behaviour, PeerServer, peer::PONG};
use lull_tests::{
    Source, assert_source_kept, both_sources, ebpf_table, engine, serial, tcp_pair, transfer,
    wait_until, watch_n,
};

fn policy() -> Policy {
    Policy::detect_dead(Duration::from_millis(200), Duration::from_millis(100), 3)
}

/// An fd number that is not open. Handing it out as `AsFd` breaks I/O safety on purpose: this
/// is exactly the mistake the engine must survive.
struct ClosedFd(RawFd);
impl AsFd for ClosedFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: deliberately invalid; `watch` only passes it to fstat, which reports EBADF.
        unsafe { BorrowedFd::borrow_raw(self.0) }
    }
}

both_sources!(bad_streams_are_refused_with_typed_errors);
fn bad_streams_are_refused_with_typed_errors(source: Source) {
    let _serial = serial();
    let Some(engine) = engine("bad streams", source, Engine::builder().capacity(64)) else {
        return;
    };
    let p = policy();

    let closed = {
        let fd = OwnedFd::from(UdpSocket::bind("127.0.0.1:0").unwrap());
        let n = fd.as_raw_fd();
        drop(fd);
        n
    };
    assert!(
        matches!(engine.watch(ClosedFd(closed), &p), Err(WatchError::ClosedFd(n)) if n == closed)
    );

    let file = std::fs::File::open("/proc/self/status").unwrap();
    assert!(matches!(
        engine.watch(file, &p),
        Err(WatchError::NotSocket(_))
    ));
    let (pipe_r, _pipe_w) = std::io::pipe().unwrap();
    assert!(matches!(
        engine.watch(pipe_r, &p),
        Err(WatchError::NotSocket(_))
    ));

    // UDP is watched per flow: an unconnected socket has no peer of its own.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let err = engine.watch(udp, &p).unwrap_err();
    assert!(matches!(err, WatchError::UnconnectedUdp(_)), "{err:?}");
    assert!(
        err.to_string().contains("unconnected UDP") && err.to_string().contains("watch_peer"),
        "the message says what it got and points at the per-peer API: {err}"
    );

    let (unix, _) = UnixStream::pair().unwrap();
    assert!(matches!(
        engine.watch(unix, &p),
        Err(WatchError::NotTcp { kind: "Unix", .. })
    ));

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(matches!(
        engine.watch(listener, &p),
        Err(WatchError::Listening(_))
    ));

    let unconnected =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    assert!(matches!(
        engine.watch(unconnected, &p),
        Err(WatchError::NotConnected { .. })
    ));

    let (ours, _peer) = tcp_pair();
    let bad = Policy {
        count: 0,
        ..policy()
    };
    assert!(matches!(
        engine.watch(ours.try_clone().unwrap(), &bad),
        Err(WatchError::Policy(PolicyError::Count(0)))
    ));

    // One socket, two engines (or the same engine twice): refused while it is watched.
    let Some(other) = lull_tests::engine("bad streams", source, Engine::builder().capacity(8))
    else {
        return;
    };
    let watched = engine
        .watch(ours.try_clone().unwrap(), &p)
        .expect("a good socket");
    assert!(matches!(
        other.watch(ours.try_clone().unwrap(), &p),
        Err(WatchError::AlreadyWatched(_))
    ));
    assert!(matches!(
        engine.watch(ours.try_clone().unwrap(), &p),
        Err(WatchError::AlreadyWatched(_))
    ));
    drop(watched);
    let again = other
        .watch(ours, &p)
        .expect("free to watch again once the first watch ended");
    drop(again);
    assert_eq!(
        engine.stats().watched + other.stats().watched,
        0,
        "nothing refused was registered"
    );
    assert_source_kept(&engine, source.kind());
    assert_source_kept(&other, source.kind());
}

both_sources!(a_full_engine_refuses_new_streams_and_keeps_serving_its_own);
fn a_full_engine_refuses_new_streams_and_keeps_serving_its_own(source: Source) {
    let _serial = serial();
    let Some(engine) = engine("full engine", source, Engine::builder().capacity(8)) else {
        return;
    };
    let peer = PeerServer::start(Behaviour::Answer(PONG));
    let mut watched = watch_n(&engine, &peer, 8, &policy());
    let (extra, _) = peer.connect_one();
    let err = engine
        .watch(extra.try_clone().unwrap(), &policy())
        .unwrap_err();
    assert!(matches!(err, WatchError::Full { capacity: 8 }), "{err:?}");
    assert!(
        wait_until(Duration::from_secs(3), || watched
            .iter()
            .all(|w| w.stats().probes_answered >= 2)),
        "the eight still get probed and answered"
    );
    // Room again once one is dropped (after the engine processes the drop).
    watched.pop();
    assert!(wait_until(Duration::from_secs(3), || engine
        .watch(extra.try_clone().unwrap(), &policy())
        .is_ok()));
    assert_source_kept(&engine, source.kind());
}

#[test]
fn a_full_bpf_table_refuses_new_sockets_and_keeps_stamping_the_others() {
    let Some(table) = ebpf_table("full bpf table", 2) else {
        return;
    };
    let (mut a, mut a_peer) = tcp_pair();
    let (b, _b_peer) = tcp_pair();
    let (c, _c_peer) = tcp_pair();
    let slot_a = table.register(a.as_fd()).unwrap();
    let _slot_b = table.register(b.as_fd()).unwrap();
    assert!(matches!(
        table.register(c.as_fd()),
        Err(ActivityError::Full { capacity: 2 })
    ));
    transfer(&mut a_peer, &mut a, b"still here");
    assert!(wait_until(Duration::from_secs(2), || table
        .read(slot_a)
        .last_rx_ns
        != 0));
}
