//! The egress program is UDP's alone (issue 14, keeping issue 11's promise): a cgroup whose
//! watched sockets are all TCP runs nothing on egress; the first UDP flow watched there with
//! the eBPF source attaches it, and it goes with the last engine that watched UDP there, even
//! while a TCP-only engine keeps using the cgroup.

use std::net::UdpSocket;

use lull::{
    Engine, Observer, Payload, Policy, Probe, SourceChoice,
    activity::{CgroupScope, cgroup_id, pinned_builds},
};
use lull_tests::{cgroups::TestCgroup, ebpf_required, root_or_skip, serial, tcp_pair};

/// Where lull's links are, for this process's build: (cgroups with ingress, with egress).
fn links() -> (Vec<u64>, Vec<u64>) {
    let me = std::process::id();
    pinned_builds()
        .into_iter()
        .find(|b| b.users.iter().any(|u| u.pid == me))
        .map(|b| (b.links.iter().map(|l| l.0).collect(), b.egress))
        .unwrap_or_default()
}

fn engine_in(cgroup: &TestCgroup) -> Option<Engine> {
    match Engine::builder()
        .capacity(16)
        .source(SourceChoice::Ebpf)
        .cgroup(CgroupScope::Path(cgroup.path().into()))
        .build()
    {
        Ok(engine) => Some(engine),
        Err(err) => {
            assert!(!ebpf_required(), "eBPF is required: {err}");
            eprintln!("SKIPPED udp egress: eBPF unavailable ({err})");
            None
        }
    }
}

#[test]
fn egress_is_attached_for_udp_flows_only_and_leaves_with_the_last_of_them() {
    let _serial = serial();
    if !root_or_skip("udp egress") {
        return;
    }
    let cgroup = TestCgroup::new("udp-egress");
    let id = cgroup_id(cgroup.path()).expect("the test cgroup's id");
    let Some(tcp_engine) = engine_in(&cgroup) else {
        return;
    };
    cgroup.enter();
    let (ours, _peer) = tcp_pair();
    let tcp = tcp_engine
        .watch(ours, &Policy::default())
        .expect("watch a TCP connection");
    let (ingress, egress) = links();
    assert!(ingress.contains(&id), "ingress attached to the test cgroup");
    assert!(
        !egress.contains(&id),
        "TCP alone attached the egress program"
    );

    let udp_engine = engine_in(&cgroup).expect("a second engine on the same pins");
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(peer.local_addr().unwrap()).unwrap();
    cgroup.leave();
    let policy = Policy::keep_warm(std::time::Duration::from_secs(5))
        .with_probe(Probe::Bytes(Payload::datagram(b"k").unwrap()));
    let flow = udp_engine.watch(socket, &policy).expect("watch a UDP flow");
    assert_eq!(flow.observer(), Some(Observer::Ebpf));
    assert!(links().1.contains(&id), "the UDP flow attached egress");

    drop(flow);
    drop(udp_engine);
    let (ingress, egress) = links();
    assert!(
        !egress.contains(&id),
        "egress outlived the last engine that watched UDP in the cgroup"
    );
    assert!(
        ingress.contains(&id),
        "the TCP engine still has its ingress"
    );
    drop(tcp);
    drop(tcp_engine);
}
