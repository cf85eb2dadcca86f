//! Host mode over a daemon's life: connections that exist at start are picked up; SIGHUP
//! applies a changed rule to new connections (and a bad rule file changes nothing); after
//! SIGKILL, policy stays applied and a restart reports the verdicts of connections that
//! died while lull was down.
//!
//! The server is an unmodified redis-server in a cgroup and network namespace the test
//! makes; clients connect from another namespace the test makes.

use std::{
    collections::HashSet,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lull_tests::{
    host::{HostDaemon, NsServer, TestCgroup, connect, iptables_in, peer_port_of, server_opts},
    netns::NetnsPair,
    serial,
};

const PORT: u16 = 6379;

fn rules(cgroup: &std::path::Path, idle: u32) -> String {
    format!(
        "[[rule]]\nname = \"redis\"\ncgroup = \"{}\"\nlocal_ports = [{PORT}]\n\
         idle = \"{idle}s\"\ninterval = \"1s\"\ncount = 3\n",
        cgroup.display()
    )
}

fn ping(s: &mut TcpStream) {
    s.write_all(b"PING\r\n").expect("send PING");
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).expect("read +PONG");
}

fn port_of(s: &TcpStream) -> u16 {
    s.local_addr().expect("local address").port()
}

struct Setup {
    ns: NetnsPair,
    redis: NsServer,
    cgroup: TestCgroup,
}

fn setup(test: &str) -> Option<Setup> {
    let ns = NetnsPair::create(test)?;
    let cgroup = TestCgroup::create(test, "redis")?;
    let redis = NsServer::redis(test, &cgroup, &ns.b, PORT)?;
    let setup = Setup { ns, redis, cgroup };
    drop(setup.client());
    Some(setup)
}

impl Setup {
    fn client(&self) -> TcpStream {
        let addr = SocketAddr::new(IpAddr::V4(self.ns.addr_b), PORT);
        let mut s = self.ns.within(&self.ns.a, || connect(addr));
        ping(&mut s);
        s
    }

    fn idle_of(&self, c: &TcpStream) -> i32 {
        server_opts(self.redis.pid(), port_of(c)).idle
    }
}

#[test]
fn connections_that_exist_at_start_are_picked_up() {
    const TEST: &str = "host_pickup";
    let _serial = serial();
    let Some(s) = setup(TEST) else { return };
    let before: Vec<TcpStream> = (0..3).map(|_| s.client()).collect();
    assert_eq!(s.idle_of(&before[0]), 7200, "untouched before lull starts");
    let Some(daemon) = HostDaemon::start(TEST, &rules(&s.cgroup.path, 3)) else {
        return;
    };
    let log = daemon.log_text();
    assert!(
        log.contains("picked up 3 (redis: 3)"),
        "the start report counts them:\n{log}"
    );
    for c in &before {
        assert_eq!(s.idle_of(c), 3, "picked up: the rule's options are set");
    }
    let rows = daemon.ls();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r["picked_up"] == true), "{rows:?}");
    // A picked-up connection gets a verdict too (its state callbacks were turned on).
    let mut before = before.into_iter();
    let c = before.next().expect("three");
    let port = port_of(&c);
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(c);
    let v = daemon
        .wait_verdict(port, Duration::from_secs(5))
        .expect("a verdict for the picked-up connection");
    assert_eq!(v["verdict"], "reset_by_peer", "{v}");
    assert_eq!(v["picked_up"], true, "{v}");
}

#[test]
fn sighup_applies_a_changed_rule_to_new_connections_and_refuses_a_bad_file() {
    const TEST: &str = "host_sighup";
    let _serial = serial();
    let Some(s) = setup(TEST) else { return };
    let Some(mut daemon) = HostDaemon::start(TEST, &rules(&s.cgroup.path, 2)) else {
        return;
    };
    let old = s.client();
    assert_eq!(s.idle_of(&old), 2);

    std::fs::write(&daemon.config, rules(&s.cgroup.path, 7)).expect("rewrite the rules");
    daemon.signal(libc::SIGHUP);
    assert!(
        daemon.wait_log(Duration::from_secs(10), "reloaded"),
        "{}",
        daemon.log_text()
    );
    let new = s.client();
    assert_eq!(
        s.idle_of(&new),
        7,
        "the changed rule applies to new connections"
    );
    assert_eq!(
        s.idle_of(&old),
        2,
        "established connections keep their options"
    );
    assert_eq!(daemon.ls().len(), 2, "no state was dropped");

    // A bad file on SIGHUP: refused with file, line and reason; the running rules stay.
    let bad = format!("{}colour = \"blue\"\n", rules(&s.cgroup.path, 9));
    std::fs::write(&daemon.config, bad).expect("rewrite the rules");
    daemon.signal(libc::SIGHUP);
    assert!(
        daemon.wait_log(Duration::from_secs(10), "reload refused"),
        "{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    let line = format!("{}:8:1: unknown field `colour`", daemon.config.display());
    assert!(log.contains(&line), "wanted `{line}` in:\n{log}");
    let third = s.client();
    assert_eq!(s.idle_of(&third), 7, "the running rules stayed in force");
}

#[test]
fn after_sigkill_policy_stays_and_a_restart_reports_what_died_meanwhile() {
    const TEST: &str = "host_restart";
    let _serial = serial();
    let Some(s) = setup(TEST) else { return };
    let Some(mut daemon) = HostDaemon::start(TEST, &rules(&s.cgroup.path, 2)) else {
        return;
    };
    let (reset, closed, vanished) = (s.client(), s.client(), s.client());
    let ports = [port_of(&reset), port_of(&closed), port_of(&vanished)];
    let cookies: HashSet<u64> = daemon
        .ls()
        .iter()
        .filter_map(|r| r["cookie"].as_u64())
        .collect();
    assert_eq!(cookies.len(), 3);

    daemon.kill9();
    // While lull is down: one peer resets, one closes, one vanishes, and a new connection
    // is made, which must still get the rule (the programs stay attached).
    socket2::SockRef::from(&reset)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(reset);
    drop(closed);
    let port = ports[2].to_string();
    for (chain, dir) in [("OUTPUT", "--sport"), ("INPUT", "--dport")] {
        iptables_in(
            &s.ns.a,
            &["-A", chain, "-p", "tcp", dir, &port, "-j", "DROP"],
        );
    }
    let during = s.client();
    assert_eq!(
        s.idle_of(&during),
        2,
        "policy stays applied while lull is down"
    );
    // Let the vanished one die (2 + 3 × 1 s) before lull comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && s.redis_has(ports[2]) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        daemon.events().is_empty(),
        "nothing was read while lull was down"
    );

    assert!(daemon.spawn(), "restart: {}", daemon.log_text());
    let want = [
        (ports[0], "reset_by_peer"),
        (ports[1], "closed"),
        (ports[2], "keepalive_timeout"),
    ];
    for (port, verdict) in want {
        let v = daemon
            .wait_verdict(port, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no verdict for {port} after the restart"));
        assert_eq!(v["verdict"], verdict, "{v}");
        assert!(
            cookies.contains(&v["cookie"].as_u64().expect("cookie")),
            "{v}"
        );
    }
    let got: HashSet<u16> = daemon.events().iter().filter_map(peer_port_of).collect();
    assert_eq!(got, ports.into_iter().collect(), "exactly these three died");
    assert!(
        daemon.log_text().contains("restarted on the pinned state"),
        "{}",
        daemon.log_text()
    );
    drop((during, vanished));
}

#[test]
fn a_rule_follows_its_cgroup_when_the_service_restarts() {
    const TEST: &str = "host_cgroup_again";
    let _serial = serial();
    let Some(s) = setup(TEST) else { return };
    let Some(mut daemon) = HostDaemon::start(TEST, &rules(&s.cgroup.path, 4)) else {
        return;
    };
    let before = s.client();
    assert_eq!(s.idle_of(&before), 4);
    drop(before);
    // systemd restarts a unit by removing its cgroup and making it again: a new cgroup id,
    // and the old link is defunct.
    let Setup { ns, redis, cgroup } = s;
    drop(redis);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(&cgroup.path).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::create_dir(&cgroup.path).expect("make the cgroup again");
    assert!(
        daemon.wait_log(Duration::from_secs(10), "cgroup changed"),
        "{}",
        daemon.log_text()
    );
    let Some(redis) = NsServer::redis(TEST, &cgroup, &ns.b, PORT) else {
        return;
    };
    let s = Setup { ns, redis, cgroup };
    let after = s.client();
    assert_eq!(s.idle_of(&after), 4, "the rule applies in the new cgroup");
    assert!(
        daemon
            .ls()
            .iter()
            .any(|r| peer_port_of(r) == Some(port_of(&after)))
    );
}

impl Setup {
    /// Whether redis still has an ESTABLISHED socket to `peer_port` (in its namespace).
    fn redis_has(&self, peer_port: u16) -> bool {
        let text = std::fs::read_to_string(format!("/proc/{}/net/tcp", self.redis.pid()))
            .unwrap_or_default();
        text.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = f
                .get(2)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            port == Some(peer_port) && f.get(3) == Some(&"01")
        })
    }
}
