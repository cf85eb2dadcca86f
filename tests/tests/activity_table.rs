//! The eBPF activity tracker on real loopback sockets (issue: foundation).

use std::{io::Write, net::Shutdown, os::fd::AsFd, time::Duration};

use lull::activity::{CgroupScope, EXTENT_ROWS, flags, tcp_info};
use lull_tests::{cgroups::TestCgroup, ebpf_table, ebpf_table_in, tcp_pair, transfer, wait_until};
use socket2::SockRef;

const WAIT: Duration = Duration::from_secs(2);

#[test]
fn rx_only_traffic_moves_only_last_rx() {
    let Some(table) = ebpf_table("rx_only_traffic_moves_only_last_rx", 64) else {
        return;
    };
    let (mut ours, mut peer) = tcp_pair();
    let slot = table.register(ours.as_fd()).expect("register");
    let before = table.read(slot);
    assert_eq!(
        (before.last_rx_ns, before.last_tx_ns),
        (0, 0),
        "fresh slot is empty"
    );

    transfer(&mut peer, &mut ours, b"hello");
    assert!(
        wait_until(WAIT, || table.read(slot).last_rx_ns != 0),
        "rx was not stamped"
    );
    let after = table.read(slot);
    assert_eq!(
        after.last_tx_ns, 0,
        "receiving (and ACKing) must not move last_tx"
    );
    assert_eq!(after.flags, 0);

    // A later rx moves the stamp forward.
    std::thread::sleep(Duration::from_millis(5));
    transfer(&mut peer, &mut ours, b"again");
    assert!(wait_until(WAIT, || table.read(slot).last_rx_ns > after.last_rx_ns));
    assert_eq!(table.read(slot).last_tx_ns, 0);
}

#[test]
fn tx_only_traffic_moves_only_last_tx() {
    let Some(table) = ebpf_table("tx_only_traffic_moves_only_last_tx", 64) else {
        return;
    };
    let (mut ours, mut peer) = tcp_pair();
    let slot = table.register(ours.as_fd()).expect("register");
    transfer(&mut ours, &mut peer, b"hello");
    assert!(
        wait_until(WAIT, || table.read(slot).last_tx_ns != 0),
        "tx was not stamped"
    );
    let after = table.read(slot);
    assert_eq!(after.last_rx_ns, 0, "the peer's ACKs must not move last_rx");
    let now = lull::clock::monotonic_ns();
    assert!(
        after.last_tx_ns <= now && now - after.last_tx_ns < 2_000_000_000,
        "stamp is CLOCK_MONOTONIC"
    );
}

#[test]
fn unregistered_socket_is_never_recorded() {
    let Some(table) = ebpf_table("unregistered_socket_is_never_recorded", 8) else {
        return;
    };
    let (mut watched, mut watched_peer) = tcp_pair();
    let (mut other, mut other_peer) = tcp_pair();
    let slot = table.register(watched.as_fd()).expect("register");
    // The host's table is shared: only the extent this table leased is ours to look at, and
    // earlier lessees may have left stamps in its free rows (generation 0). Nothing may change.
    let ours = table.row_of(slot).expect("a registered slot has a row");
    let extent = ours / EXTENT_ROWS * EXTENT_ROWS..(ours / EXTENT_ROWS + 1) * EXTENT_ROWS;
    let before: Vec<_> = extent
        .clone()
        .map(|row| table.row(row).expect("row in range"))
        .collect();
    for _ in 0..50 {
        transfer(&mut other, &mut other_peer, b"x");
        transfer(&mut other_peer, &mut other, b"y");
    }
    for (row, was) in extent.zip(before) {
        let now = table.row(row).expect("row in range");
        if row != ours {
            assert_eq!(now, was, "row {row} was written");
            assert_eq!(now.0, 0, "row {row} is registered");
        }
    }
    assert_eq!(
        table.read(slot),
        Default::default(),
        "the watched socket carried nothing"
    );
    transfer(&mut watched_peer, &mut watched, b"z");
    assert!(wait_until(WAIT, || table.read(slot).last_rx_ns != 0));
}

#[test]
fn socket_opened_before_attach_is_tracked_once_registered() {
    // The programs see sockets of the cgroup they attach to: open the pair in a cgroup the
    // table will attach to later.
    let cgroup = TestCgroup::new("before-attach");
    cgroup.enter();
    let (mut ours, mut peer) = tcp_pair();
    cgroup.leave();
    transfer(&mut peer, &mut ours, b"before the program existed");
    let Some(table) = ebpf_table_in(
        "socket_opened_before_attach_is_tracked_once_registered",
        8,
        CgroupScope::Path(cgroup.path().into()),
    ) else {
        return;
    };
    let slot = table.register(ours.as_fd()).expect("register");
    transfer(&mut peer, &mut ours, b"after");
    assert!(
        wait_until(WAIT, || table.read(slot).last_rx_ns != 0),
        "rx was not stamped"
    );
    transfer(&mut ours, &mut peer, b"after");
    assert!(
        wait_until(WAIT, || table.read(slot).last_tx_ns != 0),
        "tx was not stamped"
    );
}

#[test]
fn peer_fin_shows_as_closed() {
    let Some(table) = ebpf_table("peer_fin_shows_as_closed", 8) else {
        return;
    };
    let (ours, peer) = tcp_pair();
    let slot = table.register(ours.as_fd()).expect("register");
    assert!(!table.read(slot).closed());
    peer.shutdown(Shutdown::Write).expect("peer FIN");
    assert!(
        wait_until(WAIT, || table.read(slot).closed()),
        "FIN not seen"
    );
    assert_ne!(table.read(slot).flags & flags::PEER_FIN, 0);
}

#[test]
fn peer_reset_shows_as_closed_and_state_close() {
    let Some(table) = ebpf_table("peer_reset_shows_as_closed_and_state_close", 8) else {
        return;
    };
    // Established after the attach, so sock_ops also sees the state change.
    let (ours, peer) = tcp_pair();
    let slot = table.register(ours.as_fd()).expect("register");
    SockRef::from(&peer)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(peer);
    assert!(
        wait_until(WAIT, || {
            let f = table.read(slot).flags;
            f & flags::PEER_RST != 0 && f & flags::STATE_CLOSE != 0
        }),
        "RST not seen: flags {:#x}",
        table.read(slot).flags
    );
}

#[test]
fn reused_slot_never_shows_old_stamps() {
    // One slot, so every registration after the first must reuse it.
    let Some(table) = ebpf_table("reused_slot_never_shows_old_stamps", 1) else {
        return;
    };
    let (mut old, mut old_peer) = tcp_pair();
    let first = table.register(old.as_fd()).expect("register");
    transfer(&mut old_peer, &mut old, b"old");
    transfer(&mut old, &mut old_peer, b"old");
    assert!(wait_until(WAIT, || {
        let a = table.read(first);
        a.last_rx_ns != 0 && a.last_tx_ns != 0
    }));

    // The peer acknowledges "old" before the next registration: tx counts acknowledgements,
    // and one arriving late would rightly stamp whoever holds the row then.
    assert!(wait_until(WAIT, || tcp_info(old.as_fd())
        .unwrap()
        .tcpi_unacked
        == 0));

    // Unregister without dropping the socket's storage: the old socket keeps a stale link to
    // the slot, and only the generation check keeps its packets out of the new owner's row.
    table.unregister(first);
    let (mut new, mut new_peer) = tcp_pair();
    let second = table
        .register(new.as_fd())
        .expect("register reuses the slot");
    assert_eq!(second.index, first.index);
    assert_ne!(second.generation, first.generation);
    assert_eq!(
        table.read(second),
        Default::default(),
        "reused slot shows old stamps"
    );

    for _ in 0..20 {
        transfer(&mut old_peer, &mut old, b"stale");
        transfer(&mut old, &mut old_peer, b"stale");
        old_peer.write_all(b"").expect("write");
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        table.read(second),
        Default::default(),
        "old socket wrote the new owner's row"
    );
    assert_eq!(
        table.read(first),
        Default::default(),
        "a stale slot reads as empty"
    );

    transfer(&mut new_peer, &mut new, b"new");
    assert!(wait_until(WAIT, || table.read(second).last_rx_ns != 0));
    assert_eq!(table.read(second).last_tx_ns, 0);

    // Unregistering with the socket drops its storage; re-registering the old socket (whose
    // storage is stale) takes the slot over cleanly.
    table.unregister_socket(second, new.as_fd());
    assert!(wait_until(WAIT, || tcp_info(old.as_fd())
        .unwrap()
        .tcpi_unacked
        == 0));
    let third = table
        .register(old.as_fd())
        .expect("re-register the old socket");
    assert_eq!(third.index, first.index);
    assert_eq!(table.read(third), Default::default());
    transfer(&mut new_peer, &mut new, b"unwatched now");
    transfer(&mut old_peer, &mut old, b"watched again");
    assert!(wait_until(WAIT, || table.read(third).last_rx_ns != 0));
    assert_eq!(
        table.read(third).last_tx_ns,
        0,
        "only rx happened on the old socket since"
    );
}
