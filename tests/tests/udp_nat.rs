//! A real UDP NAT (issue 14): with lull keeping it warm, a flow idle for 5 x the NAT's mapping
//! timeout still reaches the server through the same mapping (the server sees the same source
//! port); without lull, the mapping expires and the flow comes back on another port.
//!
//! One run holds four flows side by side, so that the control and every observer see the same
//! NAT and the same clock: a connected socket on the eBPF engine (the kernel sees its
//! datagrams), a connected socket on the `TCP_INFO` engine and one peer of an unconnected
//! socket (the handles see them), and an unwatched socket, the control.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lull::{Engine, Observer, Payload, PeerSocket, Policy, Probe};
use lull_harness::udp::{UDP_PROBE, UdpBehaviour, UdpPeer};
use lull_tests::{Source, assert_source_kept, engine, nat::UdpNat, serial};

/// The NAT's mapping timeout: conntrack's UDP timeouts, lowered inside the namespace.
const TIMEOUT: Duration = Duration::from_secs(2);

#[test]
fn keep_warm_holds_a_nat_mapping_that_expires_without_it() {
    let _serial = serial();
    let test = "udp nat keep-warm";
    let Some(nat) = UdpNat::create(test, TIMEOUT) else {
        return;
    };
    let Some(ebpf) = engine(test, Source::Ebpf, Engine::builder().capacity(16)) else {
        return;
    };
    let tcp_info = engine(test, Source::TcpInfo, Engine::builder().capacity(16))
        .expect("the TCP_INFO engine always builds");
    let pair = &nat.pair;
    let server_socket = pair.within(&pair.b, || {
        UdpSocket::bind((pair.addr_b, 0)).expect("a UDP socket in b")
    });
    let server = UdpPeer::start_on(server_socket, UdpBehaviour::silent()).expect("a UDP server");
    let to = server.addr();

    // Every socket is made in `a`, behind the NAT.
    let (kernel_seen, wrapper_seen, control, shared) = pair.within(&pair.a, || {
        let connected = |to: SocketAddr| {
            let socket = UdpSocket::bind("0.0.0.0:0").expect("bind in a");
            socket.connect(to).expect("connect in a");
            socket
        };
        (
            connected(to),
            connected(to),
            connected(to),
            UdpSocket::bind("0.0.0.0:0").expect("bind in a"),
        )
    });
    // Well under the timeout: a mapping never goes a whole timeout without a datagram.
    let policy = Policy::keep_warm(TIMEOUT / 4)
        .with_probe(Probe::Bytes(Payload::datagram(UDP_PROBE).unwrap()));
    let kernel_seen = ebpf.watch(kernel_seen, &policy).expect("watch on eBPF");
    let wrapper_seen = tcp_info
        .watch(wrapper_seen, &policy)
        .expect("watch on TCP_INFO");
    let shared = PeerSocket::new(shared).expect("an unconnected socket");
    let peer_flow = ebpf.watch_peer(&shared, to, &policy).expect("watch a peer");
    assert_eq!(kernel_seen.observer(), Some(Observer::Ebpf));
    assert_eq!(wrapper_seen.observer(), Some(Observer::Wrapper));
    assert_eq!(peer_flow.observer(), Observer::Wrapper);

    let hello = |what: &[u8]| {
        kernel_seen.send(what).expect("send");
        wrapper_seen.send(what).expect("send");
        peer_flow.send(what).expect("send");
        control.send(what).expect("send");
    };
    hello(b"first");
    // Idle, as far as the application goes, for 5 x the timeout.
    std::thread::sleep(TIMEOUT * 5);
    hello(b"second");
    let deadline = Instant::now() + Duration::from_secs(2);
    while server
        .datagrams()
        .iter()
        .filter(|d| d.bytes == b"second")
        .count()
        < 4
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let datagrams = server.datagrams();
    let ports = |what: &[u8]| -> Vec<u16> {
        datagrams
            .iter()
            .filter(|d| d.bytes == what)
            .map(|d| d.from.port())
            .collect()
    };
    let (first, second) = (ports(b"first"), ports(b"second"));
    assert_eq!(first.len(), 4, "every first datagram arrived: {first:?}");
    assert_eq!(second.len(), 4, "every second datagram arrived: {second:?}");
    assert!(
        first.iter().all(|p| (10_000..20_000).contains(p)),
        "the server sees the NAT's ports, not the sockets': {first:?}"
    );
    // Four flows, four mappings: a port seen both times is a flow whose mapping held.
    let kept = second.iter().filter(|p| first.contains(p)).count();
    assert_eq!(
        kept, 3,
        "the three watched flows keep their mappings and the control loses its own \
         (first {first:?}, second {second:?})"
    );
    let keep_warm = datagrams.iter().filter(|d| d.bytes == UDP_PROBE).count();
    assert!(
        keep_warm >= 3 * 15,
        "each watched flow sent a keep-warm datagram per interval: {keep_warm} in all"
    );
    // The control's datagrams are the only ones from a port that changed.
    let control_first: Vec<u16> = first
        .iter()
        .filter(|p| !second.contains(p))
        .copied()
        .collect();
    assert_eq!(control_first.len(), 1, "one mapping expired: the control's");
    assert!(
        !datagrams
            .iter()
            .any(|d| d.bytes == UDP_PROBE && d.from.port() == control_first[0]),
        "the control flow sent no keep-warm datagram"
    );
    assert_source_kept(&ebpf, Source::Ebpf.kind());
    drop((kernel_seen, wrapper_seen, peer_flow));
}
