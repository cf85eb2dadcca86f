//! UDP flows on real sockets (issue 14): keep-warm datagrams only for flows that are silent,
//! dead peers found within the bound and answering ones never, through both observers: the
//! eBPF programs (a connected socket, whatever sends its datagrams) and the handles' own calls
//! (a connected socket on the `TCP_INFO` engine, and the peers of an unconnected socket).

use std::{
    collections::HashSet,
    net::{SocketAddr, UdpSocket},
    ops::Deref,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lull::{ConnId, Engine, Event, Observer, Payload, PeerSocket, Policy, Watched};
use lull_harness::udp::{UDP_PROBE, UDP_REPLY, UdpBehaviour, UdpPeer};
use lull_tests::{Source, assert_exactly_once, assert_source_kept, both_sources, engine, serial};

const INTERVAL: Duration = Duration::from_millis(300);

fn keep_warm() -> Policy {
    Policy::keep_warm(INTERVAL).with_probe(lull::Probe::Bytes(
        Payload::datagram(UDP_PROBE).expect("a small payload"),
    ))
}

fn detect_dead() -> Policy {
    Policy::detect_dead(Duration::from_millis(400), Duration::from_millis(150), 3)
        .with_probe(lull::Probe::Bytes(Payload::datagram(UDP_PROBE).unwrap()))
        .with_expect_reply(Payload::datagram(UDP_REPLY).unwrap())
}

fn connected(to: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.connect(to).expect("connect a UDP socket");
    socket
}

fn port(socket: &UdpSocket) -> u16 {
    socket.local_addr().expect("local address").port()
}

/// The observer a connected socket gets on this source.
fn observer_of(source: Source) -> Observer {
    match source {
        Source::Ebpf => Observer::Ebpf,
        Source::TcpInfo => Observer::Wrapper,
    }
}

both_sources!(steady_traffic_draws_no_keep_warm_datagram);
/// A flow that sends more often than the interval gets no keep-warm datagram at all, counted
/// at the peer; a silent one gets one per interval, as a fixed-period sender would. With eBPF
/// the application sends through the bare socket (the kernel sees it); without, through the
/// handle (the wrapper sees it).
fn steady_traffic_draws_no_keep_warm_datagram(source: Source) {
    let _serial = serial();
    let Some(engine) = engine("udp steady traffic", source, Engine::builder().capacity(64)) else {
        return;
    };
    let peer = UdpPeer::start(UdpBehaviour::silent());
    let busy = engine
        .watch(connected(peer.addr()), &keep_warm())
        .expect("watch a connected UDP socket");
    let idle = engine
        .watch(connected(peer.addr()), &keep_warm())
        .expect("watch a connected UDP socket");
    assert_eq!(busy.observer(), Some(observer_of(source)));
    // The peers of one unconnected socket: the wrapper, on either source.
    let shared = PeerSocket::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    let busy_peer_flow = UdpPeer::start(UdpBehaviour::silent());
    let idle_peer_flow = UdpPeer::start(UdpBehaviour::silent());
    let busy_flow = engine
        .watch_peer(&shared, busy_peer_flow.addr(), &keep_warm())
        .expect("watch a peer");
    let idle_flow = engine
        .watch_peer(&shared, idle_peer_flow.addr(), &keep_warm())
        .expect("watch a peer");
    assert_eq!(busy_flow.observer(), Observer::Wrapper);

    let run = INTERVAL * 10;
    let started = Instant::now();
    while started.elapsed() < run {
        match source {
            // The bare socket: only the kernel can see this.
            Source::Ebpf => busy.deref().send(b"app").map(drop),
            Source::TcpInfo => busy.send(b"app").map(drop),
        }
        .expect("send on the busy flow");
        busy_flow.send(b"app").expect("send to the busy peer");
        std::thread::sleep(INTERVAL / 3);
    }
    let shared_port = port(&shared);
    let stats = engine.stats();
    drop((busy, idle, busy_flow, idle_flow));

    let (busy_probes, idle_probes) = (
        peer.count_from(port_of_flow(&peer, b"app"), UDP_PROBE),
        idle_count(&peer),
    );
    assert_eq!(
        busy_probes, 0,
        "the busy connected flow drew keep-warm datagrams"
    );
    assert_eq!(
        busy_peer_flow.count_from(shared_port, UDP_PROBE),
        0,
        "the busy peer flow drew keep-warm datagrams"
    );
    // 10 intervals: the first datagram comes after 1 to 1.1 intervals, then one per interval.
    for (what, n) in [
        ("connected", idle_probes),
        (
            "per-peer",
            idle_peer_flow.count_from(shared_port, UDP_PROBE),
        ),
    ] {
        assert!(
            (7..=10).contains(&n),
            "the idle {what} flow got {n} keep-warm datagrams in 10 intervals"
        );
    }
    assert_eq!(stats.datagram_flows, 4);
    assert_eq!(
        stats.datagram_flows_wrapper,
        if source == Source::Ebpf { 2 } else { 4 }
    );
    assert_source_kept(&engine, source.kind());
}

/// The source port that sent `marker` to `peer` (the busy flow's).
fn port_of_flow(peer: &UdpPeer, marker: &[u8]) -> u16 {
    peer.datagrams()
        .iter()
        .find(|d| d.bytes.starts_with(marker))
        .expect("the busy flow's traffic arrived")
        .from
        .port()
}

/// Keep-warm datagrams from the flow that sent nothing else.
fn idle_count(peer: &UdpPeer) -> usize {
    let busy: HashSet<u16> = peer
        .datagrams()
        .iter()
        .filter(|d| d.bytes.starts_with(b"app"))
        .map(|d| d.from.port())
        .collect();
    peer.datagrams()
        .iter()
        .filter(|d| !busy.contains(&d.from.port()) && d.bytes.starts_with(UDP_PROBE))
        .count()
}

/// Reads every watched connected socket, through the handle, until `stop`: what an
/// application does, and what the wrapper observer needs to see answers.
fn reader(
    flows: Arc<Vec<Watched<UdpSocket>>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    for flow in flows.iter() {
        flow.set_nonblocking(true).expect("non-blocking");
    }
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            for flow in flows.iter() {
                while flow.recv(&mut buf).is_ok() {}
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

both_sources!(a_silent_peer_is_dead_within_the_bound_and_an_answering_one_never);
/// Flows to a peer that stops answering are reported dead within the policy's bound of the
/// moment it stopped; flows to a peer that answers are never reported. Each flow is reported
/// once, by id.
fn a_silent_peer_is_dead_within_the_bound_and_an_answering_one_never(source: Source) {
    let _serial = serial();
    let Some(engine) = engine("udp dead peers", source, Engine::builder().capacity(128)) else {
        return;
    };
    let policy = detect_dead();
    let answering = UdpPeer::start(UdpBehaviour::answering());
    let hanging = UdpPeer::start(UdpBehaviour::answering());
    let n = 16;
    let mut flows = Vec::new();
    let mut doomed = HashSet::new();
    let mut alive = HashSet::new();
    for i in 0..2 * n {
        let to = if i < n {
            answering.addr()
        } else {
            hanging.addr()
        };
        let flow = engine.watch(connected(to), &policy).expect("watch");
        assert_eq!(flow.observer(), Some(observer_of(source)));
        if i < n { &mut alive } else { &mut doomed }.insert(flow.id());
        flows.push(flow);
    }
    // Per-peer flows on one unconnected socket: two answering peers, two that hang.
    let shared = PeerSocket::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    shared
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let peer_servers: Vec<UdpPeer> = (0..4)
        .map(|_| UdpPeer::start(UdpBehaviour::answering()))
        .collect();
    let mut peer_flows = Vec::new();
    for (i, server) in peer_servers.iter().enumerate() {
        let flow = engine
            .watch_peer(&shared, server.addr(), &policy)
            .expect("watch a peer");
        if i < 2 { &mut alive } else { &mut doomed }.insert(flow.id());
        peer_flows.push(flow);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flows = Arc::new(flows);
    let read_connected = reader(flows.clone(), stop.clone());
    let read_shared = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                let _ = shared.recv_from(&mut buf);
            }
        })
    };

    // Two idle periods of answered probes, then half the peers hang.
    std::thread::sleep(Duration::from_millis(1_200));
    let hung_at = Instant::now();
    hanging.hang();
    peer_servers[2].hang();
    peer_servers[3].hang();
    let bound = policy.detection_bound();
    let mut dead: Vec<(ConnId, Duration)> = Vec::new();
    let deadline = hung_at + bound * 3;
    while Instant::now() < deadline {
        if let Ok(Event::Dead { id, .. }) = engine.events().recv_timeout(Duration::from_millis(50))
        {
            dead.push((id, hung_at.elapsed()));
        }
    }
    stop.store(true, Ordering::Relaxed);
    read_connected.join().unwrap();
    read_shared.join().unwrap();

    assert_exactly_once("dead UDP flows", dead.iter().map(|(id, _)| *id), &doomed);
    assert!(
        dead.iter().all(|(id, _)| !alive.contains(id)),
        "an answering flow was reported dead"
    );
    let slowest = dead
        .iter()
        .map(|(_, after)| *after)
        .max()
        .unwrap_or_default();
    assert!(
        slowest <= bound + Duration::from_millis(100),
        "a dead peer was found {slowest:?} after it hung; the bound is {bound:?}"
    );
    let answered: u32 = peer_flows[..2]
        .iter()
        .map(|f| f.stats().probes_answered)
        .sum();
    assert!(
        answered >= 4,
        "the answering peers' probes were answered ({answered})"
    );
    assert_source_kept(&engine, source.kind());
    drop(peer_flows);
    assert_eq!(shared.watched_peers(), 0);
}
