//! Host mode from the library: a gateway applies keepalive policy to its own sockets, without
//! touching them itself, and receives the kernel's verdicts as a stream.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON). It makes a cgroup of its own, a rule for
//! it, and a listener; a client connects and is reset, another closes; the verdicts print;
//! then everything is uninstalled.
//!
//! ```sh
//! cargo run --example host_policy
//! ```

use std::{
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lull::{
    activity::OwnCgroup,
    host::{Action, Host, HostPaths, Keepalive, Rule, Rules, uninstall},
};

fn main() -> Result<()> {
    // Sockets belong to the cgroup of the process that makes them: make them in our own.
    let own = OwnCgroup::shared().context("making a cgroup of our own (run as root)")?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let rules = Rules::new(vec![Rule {
        name: "gateway".into(),
        cgroup: own.path().to_path_buf(),
        local_ports: vec![port..=port],
        remote_ports: vec![],
        remote_cidrs: vec![],
        action: Action::Keepalive(Keepalive {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(5),
            count: 3,
            user_timeout: Some(Duration::from_secs(45)),
        }),
        line: 0,
    }])?;
    let paths = HostPaths::new(&format!("example-{}", std::process::id()));
    let (mut host, report) = Host::start(rules, &paths)?;
    println!(
        "policy applied (HZ {}), {} existing connection(s) picked up",
        report.hz,
        report.pickup.picked_total()
    );

    // Two clients: one resets, one closes. The server ends are the watched ones.
    for reset in [true, false] {
        let client = TcpStream::connect(("127.0.0.1", port))?;
        let (server, _) = listener.accept()?;
        if reset {
            socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO))?;
        }
        drop(client);
        // Let the FIN (or RST) arrive before this end closes, so the verdict tells them apart.
        std::thread::sleep(Duration::from_millis(50));
        drop(server);
    }

    // The verdicts, as a stream (`host` is also an `AsFd` for epoll or an async runtime).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = 0;
    while seen < 2 && Instant::now() < deadline {
        host.wait(Duration::from_millis(200))?;
        seen += host.drain(|v| {
            println!(
                "{} {} -> {}: {} after {:?}",
                v.rule, v.local, v.peer, v.kind, v.age
            );
            true
        });
    }
    drop(host);
    uninstall(&paths)?;
    Ok(())
}
