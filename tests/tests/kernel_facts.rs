//! Every fact the engine reads from the kernel side still arrives with the lean programs (an
//! ingress program and sock_ops, nothing on egress): payload received, our payload
//! acknowledged, FIN and RST both ways, the close, and the kernel giving up; and a
//! retransmission nobody acknowledges is never activity (issue: the kernel half must pay for
//! itself). Each close is also posted as a notice, which is how the engine hears of it at once.

use std::{
    collections::HashSet,
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    os::fd::AsFd,
    time::{Duration, Instant},
};

use lull::activity::{Activity, ActivitySource, ActivityTable, Slot, flags};
use lull_harness::{Behaviour, peer::PONG};
use lull_tests::{ebpf_table, netns::NetnsPair, serial, tcp_pair, transfer, wait_until};
use socket2::{SockRef, TcpKeepalive};

const WAIT: Duration = Duration::from_secs(2);

/// The close notices posted since the last call, as slot indices.
fn notices(table: &ActivityTable) -> HashSet<u32> {
    let mut closed = Vec::new();
    table.take_notices(0..table.capacity(), &mut closed);
    closed.into_iter().collect()
}

/// Waits until `slot`'s flags are exactly `want`, and its close notice has been posted.
#[track_caller]
fn expect_close(table: &ActivityTable, slot: Slot, want: u32, what: &str) {
    let mut seen = HashSet::new();
    let arrived = wait_until(WAIT, || {
        seen.extend(notices(table));
        table.read(slot).flags == want && seen.contains(&slot.index)
    });
    assert!(
        arrived,
        "{what}: flags {:#x}, want {want:#x}; notice posted: {}",
        table.read(slot).flags,
        seen.contains(&slot.index)
    );
}

fn linger_zero(socket: &TcpStream) {
    SockRef::from(socket)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
}

#[test]
fn payload_received_moves_only_last_rx() {
    let _serial = serial();
    let Some(table) = ebpf_table("payload_received_moves_only_last_rx", 8) else {
        return;
    };
    let (mut ours, mut peer) = tcp_pair();
    let slot = table.register(ours.as_fd()).expect("register");
    for round in 0..3 {
        let before = table.read(slot);
        std::thread::sleep(Duration::from_millis(15)); // past a jiffy: a new stamp is due
        transfer(&mut peer, &mut ours, b"payload");
        assert!(
            wait_until(WAIT, || table.read(slot).last_rx_ns > before.last_rx_ns),
            "round {round}: rx was not stamped"
        );
        // Every segment of the peer's carries an ACK flag, but it acknowledges nothing new of
        // ours: that is not tx.
        let after = table.read(slot);
        assert_eq!(
            (after.last_tx_ns, after.flags),
            (0, 0),
            "round {round}: {after:?}"
        );
    }
    assert!(notices(&table).is_empty(), "no close, no notice");
}

#[test]
fn payload_sent_moves_last_tx_when_the_peer_acknowledges_it() {
    let _serial = serial();
    let Some(table) = ebpf_table("payload_sent_moves_last_tx", 8) else {
        return;
    };
    let (mut ours, mut peer) = tcp_pair();
    let slot = table.register(ours.as_fd()).expect("register");
    for round in 0..3 {
        let before = table.read(slot);
        std::thread::sleep(Duration::from_millis(15));
        let sent = lull::clock::monotonic_ns();
        transfer(&mut ours, &mut peer, b"payload");
        assert!(
            wait_until(WAIT, || table.read(slot).last_tx_ns > before.last_tx_ns),
            "round {round}: the acknowledgement was not stamped as tx"
        );
        let after = table.read(slot);
        assert!(
            after.last_tx_ns >= sent.saturating_sub(lull::activity::EBPF_RESOLUTION_NS),
            "round {round}: the stamp is the acknowledgement's time"
        );
        assert_eq!(
            (after.last_rx_ns, after.flags),
            (0, 0),
            "round {round}: the peer's pure ACKs are not rx: {after:?}"
        );
    }
}

#[test]
fn fins_and_resets_both_ways_and_the_close_are_flagged_and_noticed() {
    let _serial = serial();
    let Some(table) = ebpf_table("fins_and_resets", 16) else {
        return;
    };
    // Established after the programs attached, so sock_ops follows their states.
    let (ours, peer) = tcp_pair();
    let slot = table.register(ours.as_fd()).expect("register");
    peer.shutdown(Shutdown::Write).expect("the peer's FIN");
    expect_close(&table, slot, flags::PEER_FIN, "the peer's FIN");

    let (ours, peer) = tcp_pair();
    let slot = table.register(ours.as_fd()).expect("register");
    linger_zero(&peer);
    drop(peer);
    expect_close(
        &table,
        slot,
        flags::PEER_RST | flags::STATE_CLOSE,
        "the peer's RST",
    );

    let (ours, _peer) = tcp_pair();
    let slot = table.register(ours.as_fd()).expect("register");
    ours.shutdown(Shutdown::Write).expect("our FIN");
    expect_close(&table, slot, flags::LOCAL_FIN, "our FIN");

    let (ours, _peer) = tcp_pair();
    let slot = table.register(ours.as_fd()).expect("register");
    linger_zero(&ours);
    drop(ours); // the socket and its storage go; the row stays registered
    expect_close(
        &table,
        slot,
        flags::LOCAL_RST | flags::STATE_CLOSE,
        "our RST",
    );

    // The orderly end: the peer's FIN, then ours; the socket closes on the peer's last ACK.
    let (ours, peer) = tcp_pair();
    let slot = table.register(ours.as_fd()).expect("register");
    peer.shutdown(Shutdown::Write).expect("the peer's FIN");
    expect_close(&table, slot, flags::PEER_FIN, "the peer's FIN before ours");
    ours.shutdown(Shutdown::Write).expect("our FIN");
    expect_close(
        &table,
        slot,
        flags::PEER_FIN | flags::LOCAL_FIN | flags::STATE_CLOSE,
        "the close",
    );
    drop(peer);
}

/// A pair of namespaces with an answering peer in `b`, and `table` attached where this
/// process's sockets live; `None` when the test is skipped.
fn blackhole_setup(name: &str) -> Option<(NetnsPair, ActivityTable, lull_harness::PeerServer)> {
    let pair = NetnsPair::create(name)?;
    // Before any socket: the table's cgroup is this process's (or one it moves into).
    let table = ebpf_table(name, 8)?;
    let peer = pair.peer_in_b(Behaviour::Answer(PONG));
    Some((pair, table, peer))
}

#[test]
fn kernel_keepalive_giving_up_is_timed_out_with_keepalive_expired() {
    let _serial = serial();
    let name = "kernel_keepalive_giving_up_is_timed_out";
    let Some((pair, table, peer)) = blackhole_setup(name) else {
        return;
    };
    let ours = pair.connect_from_a(&peer, 1).pop().expect("a connection");
    SockRef::from(&ours)
        .set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(Duration::from_secs(1))
                .with_interval(Duration::from_secs(1))
                .with_retries(2),
        )
        .expect("keepalive");
    let slot = table.register(ours.as_fd()).expect("register");
    pair.blackhole_b();
    let blackholed = Instant::now();
    // idle 1 s + 2 probes 1 s apart, on the kernel's timers; a notice at once when it gives up.
    let mut seen = HashSet::new();
    let closed = wait_until(Duration::from_secs(8), || {
        seen.extend(notices(&table));
        seen.contains(&slot.index)
    });
    let a = table.read(slot);
    assert!(
        closed,
        "no close notice {:?} after the blackhole: {a:?}",
        blackholed.elapsed()
    );
    assert_eq!(
        a.flags,
        flags::TIMED_OUT | flags::KEEPALIVE_EXPIRED | flags::STATE_CLOSE,
        "keepalive gave up: {a:?}"
    );
    assert!(
        blackholed.elapsed() >= Duration::from_secs(2),
        "too early for keepalive"
    );
}

#[test]
fn unacknowledged_retransmissions_never_move_last_tx() {
    let _serial = serial();
    let name = "unacknowledged_retransmissions_never_move_last_tx";
    let Some((pair, table, peer)) = blackhole_setup(name) else {
        return;
    };
    let mut ours = pair.connect_from_a(&peer, 1).pop().expect("a connection");
    SockRef::from(&ours)
        .set_tcp_user_timeout(Some(Duration::from_secs(2)))
        .expect("TCP_USER_TIMEOUT");
    let slot = table.register(ours.as_fd()).expect("register");
    // One exchange on a healthy path: our payload acknowledged, the answer received.
    ours.write_all(b"PING\r\n").expect("write");
    let mut answer = [0; PONG.len()];
    ours.read_exact(&mut answer).expect("the answer");
    assert!(wait_until(WAIT, || {
        let a = table.read(slot);
        a.last_tx_ns != 0 && a.last_rx_ns != 0
    }));
    let healthy: Activity = table.read(slot);

    pair.blackhole_b();
    ours.set_nonblocking(true).expect("non-blocking");
    let wrote = ours
        .write(&[b'x'; 32 * 1024])
        .expect("data into the black hole");
    assert!(wrote > 0);
    // Retransmitted (RTO 200 ms and doubling) until TCP_USER_TIMEOUT gives up after 2 s.
    let mut seen = HashSet::new();
    let mut moved = None;
    let closed = wait_until(Duration::from_secs(8), || {
        let a = table.read(slot);
        if a.last_tx_ns != healthy.last_tx_ns || a.last_rx_ns != healthy.last_rx_ns {
            moved.get_or_insert(a);
        }
        seen.extend(notices(&table));
        seen.contains(&slot.index)
    });
    assert_eq!(
        moved, None,
        "retransmissions moved the stamps (before: {healthy:?})"
    );
    let a = table.read(slot);
    assert!(closed, "the kernel never gave up: {a:?}");
    assert_eq!(
        a.flags,
        flags::TIMED_OUT | flags::STATE_CLOSE,
        "a retransmission timeout, not keepalive's: {a:?}"
    );
}

/// The engine hears of a close from its notice, at once, not at the connection's next timer.
#[test]
fn a_peers_fin_or_rst_is_reported_at_once_not_at_the_next_timer() {
    use lull::{CloseReason, Engine, Event, Policy};
    use lull_tests::{Source, assert_exactly_once, assert_source_kept, engine, watch_n};

    let _serial = serial();
    let name = "a_peers_fin_or_rst_is_reported_at_once";
    let Some(engine) = engine(name, Source::Ebpf, Engine::builder().capacity(1024)) else {
        return;
    };
    const N: usize = 100;
    const CLOSE_AFTER: Duration = Duration::from_millis(500);
    // The first timer of each connection is 28.5 s away at the earliest.
    let policy = Policy::detect_dead(Duration::from_secs(30), Duration::from_secs(5), 3);
    let fin = lull_harness::PeerServer::start(Behaviour::Close {
        after: CLOSE_AFTER,
        reset: false,
    });
    let rst = lull_harness::PeerServer::start(Behaviour::Close {
        after: CLOSE_AFTER,
        reset: true,
    });
    let watched_at = Instant::now();
    let by_fin = watch_n(&engine, &fin, N, &policy);
    let by_rst = watch_n(&engine, &rst, N, &policy);
    // Each peer closes CLOSE_AFTER after its accept; a notice is read on the engine's next
    // turn. Collect for two seconds at most: nothing like the 28.5 s timer.
    let deadline = watched_at + CLOSE_AFTER + Duration::from_secs(2);
    let mut closed = Vec::new();
    while closed.len() < 2 * N {
        let left = deadline.saturating_duration_since(Instant::now());
        match engine.events().recv_timeout(left) {
            Ok(Event::Closed { id, reason }) => closed.push((id, reason, watched_at.elapsed())),
            Ok(other) => panic!("unexpected event {other:?}"),
            Err(_) => break,
        }
    }
    // One more moment, for a connection reported twice.
    std::thread::sleep(Duration::from_millis(200));
    closed.extend(engine.events().try_iter().map(|e| match e {
        Event::Closed { id, reason } => (id, reason, watched_at.elapsed()),
        other => panic!("unexpected event {other:?}"),
    }));
    let expected = |watched: &[lull::Watched<TcpStream>]| watched.iter().map(|w| w.id()).collect();
    let reported = |want: CloseReason| {
        closed
            .iter()
            .filter(move |(_, reason, _)| *reason == want)
            .map(|(id, ..)| *id)
    };
    assert_exactly_once(
        "closed by a FIN, reported at once",
        reported(CloseReason::PeerFin),
        &expected(&by_fin),
    );
    assert_exactly_once(
        "closed by a RST, reported at once",
        reported(CloseReason::PeerReset),
        &expected(&by_rst),
    );
    let slowest = closed.iter().map(|(.., at)| *at).max().unwrap_or_default();
    let stats = engine.stats();
    assert_eq!(
        stats.wakeups_noticed,
        2 * N as u64,
        "each close woke the engine through its notice: {stats:?}"
    );
    assert_eq!(stats.probes_sent, 0, "{stats:?}");
    eprintln!("the slowest close was reported {slowest:?} after the watch");
    // The peers close CLOSE_AFTER after their accept; the engine reads notices at least every
    // 50 ms while it watches anything.
    assert!(
        slowest <= CLOSE_AFTER + Duration::from_millis(400),
        "a close was reported {slowest:?} after the watch, {:?} after the peer closed",
        slowest.saturating_sub(CLOSE_AFTER)
    );
    assert_source_kept(&engine, lull::activity::SourceKind::Ebpf);
}
