//! The UDP API's edges (issue 14): what it refuses, each with an error that says what it got
//! and where to go instead, and a callback probe on a UDP flow (the application pings, lull
//! watches for the answer).

use std::{
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use lull::{
    DatagramPolicyError, Engine, Event, OnDead, Payload, PeerSocket, Policy, PolicyError, Probe,
    WatchError,
};
use lull_harness::udp::{UDP_PROBE, UDP_REPLY, UdpBehaviour, UdpPeer};
use lull_tests::{Source, engine, serial, wait_until};

fn ping() -> Probe {
    Probe::Bytes(Payload::datagram(UDP_PROBE).unwrap())
}

#[test]
fn the_udp_api_refuses_what_it_cannot_watch_and_says_why() {
    let _serial = serial();
    let engine = engine(
        "udp refusals",
        Source::TcpInfo,
        Engine::builder().capacity(16),
    )
    .expect("the TCP_INFO engine always builds");
    let keep_warm = Policy::keep_warm(Duration::from_secs(1)).with_probe(ping());
    let peer = UdpPeer::start(UdpBehaviour::silent());

    let unconnected = UdpSocket::bind("127.0.0.1:0").unwrap();
    let err = engine.watch(unconnected, &keep_warm).unwrap_err();
    assert!(matches!(err, WatchError::UnconnectedUdp(_)), "{err}");

    let connected = UdpSocket::bind("127.0.0.1:0").unwrap();
    connected.connect(peer.addr()).unwrap();
    let err = PeerSocket::new(connected).unwrap_err();
    assert!(
        matches!(
            err,
            WatchError::NotPeerSocket {
                what: "a connected UDP socket",
                ..
            }
        ),
        "{err}"
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let err = PeerSocket::new(UdpSocket::from(std::os::fd::OwnedFd::from(tcp))).unwrap_err();
    assert!(
        matches!(
            err,
            WatchError::NotPeerSocket {
                what: "a TCP socket",
                ..
            }
        ),
        "{err}"
    );

    // Detect-dead needs a probe the peer answers, on either kind of flow.
    let silent_probe = Policy::detect_dead(Duration::from_secs(1), Duration::from_millis(200), 3)
        .with_probe(ping());
    let no_reply = PolicyError::Datagram(DatagramPolicyError::NoReplyExpected);
    let connected = UdpSocket::bind("127.0.0.1:0").unwrap();
    connected.connect(peer.addr()).unwrap();
    assert!(matches!(
        engine.watch(connected, &silent_probe),
        Err(WatchError::Policy(e)) if e == no_reply
    ));
    let shared = PeerSocket::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    assert!(matches!(
        engine.watch_peer(&shared, peer.addr(), &silent_probe),
        Err(WatchError::Policy(e)) if e == no_reply
    ));
    // One socket's shutdown would end every peer's flow.
    let shutdown = silent_probe
        .clone()
        .with_expect_reply(Payload::datagram(UDP_REPLY).unwrap())
        .with_on_dead(OnDead::Shutdown);
    assert!(matches!(
        engine.watch_peer(&shared, peer.addr(), &shutdown),
        Err(WatchError::Policy(PolicyError::Datagram(
            DatagramPolicyError::SharedShutdown
        )))
    ));

    // One peer is one flow, however its address is spelled.
    let flow = engine
        .watch_peer(&shared, peer.addr(), &keep_warm)
        .expect("watch a peer");
    let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", peer.addr().port())
        .parse()
        .unwrap();
    for again in [peer.addr(), mapped] {
        assert!(matches!(
            engine.watch_peer(&shared, again, &keep_warm),
            Err(WatchError::PeerAlreadyWatched(p)) if p == peer.addr()
        ));
    }
    assert_eq!(shared.watched_peers(), 1);
    assert!(wait_until(Duration::from_secs(2), || {
        engine.stats().datagram_flows == 1
    }));
    drop(flow);
    assert_eq!(shared.watched_peers(), 0);
    let again = engine
        .watch_peer(&shared, peer.addr(), &keep_warm)
        .expect("free to watch again once the first watch ended");
    drop(again);
    // A datagram-sized probe is not a TCP one.
    let big = Policy::default().with_probe(Probe::Bytes(Payload::datagram(&[1; 100]).unwrap()));
    let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    assert!(matches!(
        engine.watch(tcp, &big),
        Err(WatchError::Policy(PolicyError::StreamPayloadTooLarge {
            len: 100
        }))
    ));
}

#[test]
fn a_callback_probe_on_a_udp_flow_is_the_applications_ping() {
    let _serial = serial();
    let engine = engine(
        "udp callback",
        Source::TcpInfo,
        Engine::builder().capacity(16),
    )
    .expect("the TCP_INFO engine always builds");
    let peer = UdpPeer::start(UdpBehaviour::answering());
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(peer.addr()).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let policy = Policy::detect_dead(Duration::from_millis(300), Duration::from_millis(150), 2)
        .with_probe(Probe::Callback);
    let flow = engine
        .watch(socket, &policy)
        .expect("watch with a callback probe");
    let (mut due, mut dead) = (0, 0);
    let started = Instant::now();
    let mut buf = [0u8; 64];
    while started.elapsed() < Duration::from_secs(2) {
        match engine.events().recv_timeout(Duration::from_millis(10)) {
            Ok(Event::ProbeDue { id }) if id == flow.id() => {
                due += 1;
                flow.send(UDP_PROBE).expect("the application's own ping");
            }
            Ok(Event::Dead { .. }) => dead += 1,
            _ => {}
        }
        // The answer, read through the handle: that is how the wrapper observer sees it.
        let _ = flow.recv(&mut buf);
    }
    assert!(due >= 2, "lull asked for pings: {due}");
    assert_eq!(dead, 0, "the answered pings kept the flow alive");
    assert!(flow.stats().probes_answered >= 1, "{:?}", flow.stats());
}
