//! A socket lull does not watch, in a cgroup lull is not attached to, costs nothing: no program
//! of lull's runs for its packets, and it has no socket storage (issue: the kernel half must pay
//! for itself).

use std::os::fd::AsFd;

use lull::activity::{CgroupScope, cgroup_id};
use lull_tests::{
    bpf::{StatsOn, has_storage, run_count, slots_map},
    cgroups::TestCgroup,
    ebpf_table_in,
    pins::pinned_links,
    root_or_skip, serial, tcp_pair, transfer,
};

/// Round trips of one byte each way per pair: at least two ingress packets each.
const ROUNDS: u64 = 200;

#[test]
fn a_socket_in_another_cgroup_runs_no_lull_program_and_has_no_storage() {
    let _serial = serial();
    let name = "a_socket_in_another_cgroup_runs_no_lull_program_and_has_no_storage";
    if !root_or_skip(name) {
        return;
    }
    let attached = TestCgroup::new("attached");
    let outside = TestCgroup::new("outside");
    let Some(table) = ebpf_table_in(name, 8, CgroupScope::Path(attached.path().into())) else {
        return;
    };
    let [Some(ingress), Some(_)] = table.program_ids() else {
        panic!("both programs have ids: {:?}", table.program_ids());
    };
    // Both ends of each pair in one cgroup: an accepted socket belongs to its listener's.
    attached.enter();
    let (mut watched, mut watched_peer) = tcp_pair();
    let (mut bystander, mut bystander_peer) = tcp_pair();
    attached.leave();
    outside.enter();
    let (mut far, mut far_peer) = tcp_pair();
    outside.leave();
    let slot = table.register(watched.as_fd()).expect("register");

    // The programs run in `attached` and nowhere else: one pinned link per program, its own.
    let id = cgroup_id(attached.path()).expect("the cgroup's id");
    assert_eq!(
        pinned_links(&table.pin_dir()),
        vec![format!("{id}-ingress"), format!("{id}-sock_ops")],
        "lull's programs are attached to the test's cgroup only"
    );

    let _stats = StatsOn::new();
    let start = run_count(ingress);
    for _ in 0..ROUNDS {
        transfer(&mut far, &mut far_peer, b"x");
        transfer(&mut far_peer, &mut far, b"y");
    }
    let after_far = run_count(ingress);
    assert_eq!(
        after_far - start,
        0,
        "{} packets outside the cgroup ran lull's ingress program",
        after_far - start
    );

    // The same traffic inside the cgroup runs it once per packet received, registered or not.
    for _ in 0..ROUNDS {
        transfer(&mut bystander, &mut bystander_peer, b"x");
        transfer(&mut bystander_peer, &mut bystander, b"y");
    }
    let after_bystander = run_count(ingress);
    for _ in 0..ROUNDS {
        transfer(&mut watched, &mut watched_peer, b"x");
        transfer(&mut watched_peer, &mut watched, b"y");
    }
    let after_watched = run_count(ingress);
    assert!(
        after_bystander - after_far >= 2 * ROUNDS,
        "an unregistered socket in the cgroup ran the program {} times for {} packets in",
        after_bystander - after_far,
        2 * ROUNDS
    );
    assert!(
        after_watched - after_bystander >= 2 * ROUNDS,
        "the registered pair ran the program {} times for {} packets in",
        after_watched - after_bystander,
        2 * ROUNDS
    );
    assert_ne!(
        table.read(slot).last_rx_ns,
        0,
        "the watched socket was stamped"
    );

    // Only the registered socket has storage: the program looks storage up, it never makes it.
    let slots = slots_map(&table.pin_dir());
    assert!(has_storage(&slots, &watched), "the registered socket");
    for (what, socket) in [
        ("the registered socket's peer", &watched_peer),
        ("an unregistered socket in the cgroup", &bystander),
        ("its peer", &bystander_peer),
        ("the socket outside the cgroup", &far),
        ("its peer", &far_peer),
    ] {
        assert!(!has_storage(&slots, socket), "{what} has socket storage");
    }
}
