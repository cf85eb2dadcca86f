//! Host mode against real, unmodified servers: redis-server and mosquitto in a cgroup the
//! test makes, in a network namespace the test makes, with clients in another namespace.
//!
//! - A client that vanishes (iptables DROP in its namespace) gets `keepalive_timeout` on the
//!   server's socket within idle + count × interval + 1 s; one that sends a RST gets
//!   `reset_by_peer`; one that closes gets `closed`. Each is asserted per connection (by
//!   its cookie, as `lull ls` listed it), not by counting events.
//! - The sockets of a server in another cgroup keep their options (getsockopt on the
//!   server's own fds) and `ss -o` shows no keepalive timer on them.
//! - IPv6 connections match and get verdicts too.

use std::{
    collections::{HashMap, HashSet},
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lull_tests::{
    host::{
        HostDaemon, KeepaliveOpts, NsServer, TestCgroup, connect, iptables_in, peer_port_of,
        server_opts, ss_timers,
    },
    netns::NetnsPair,
    serial,
    servers::mqtt_connect,
};
use serde_json::Value;

const REDIS: u16 = 6379;
const MQTT: u16 = 1883;
const REDIS_UNWATCHED: u16 = 6380;
/// The rules' timings: a vanished peer is declared dead within 2 + 3 × 1 + 1 = 6 s.
const IDLE: u64 = 2;
const INTERVAL: u64 = 1;
const COUNT: u64 = 3;

fn redis_ping(s: &mut TcpStream) {
    s.write_all(b"PING\r\n").expect("send PING");
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).expect("read +PONG");
    assert_eq!(&buf, b"+PONG\r\n");
}

fn set_linger_zero(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
}

/// How the test ends a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Vanish,
    Reset,
    Close,
}

impl End {
    fn verdict(self) -> &'static str {
        match self {
            Self::Vanish => "keepalive_timeout",
            Self::Reset => "reset_by_peer",
            Self::Close => "closed",
        }
    }
}

#[test]
fn redis_and_mosquitto_connections_get_their_verdicts_and_other_cgroups_are_untouched() {
    const TEST: &str = "host_verdicts";
    let _serial = serial();
    let Some(ns) = NetnsPair::create(TEST) else {
        return;
    };
    let Some(watched) = TestCgroup::create(TEST, "watched") else {
        return;
    };
    let Some(other) = TestCgroup::create(TEST, "other") else {
        return;
    };
    let Some(redis) = NsServer::redis(TEST, &watched, &ns.b, REDIS) else {
        return;
    };
    let Some(mqtt) = NsServer::mosquitto(TEST, &watched, &ns.b, MQTT) else {
        return;
    };
    let Some(redis_other) = NsServer::redis(TEST, &other, &ns.b, REDIS_UNWATCHED) else {
        return;
    };
    let server = |port| SocketAddr::new(IpAddr::V4(ns.addr_b), port);
    // The servers are up once they answer (connections made before the daemon starts would
    // be picked up, which another test covers: close these).
    ns.within(&ns.a, || {
        for port in [REDIS, MQTT, REDIS_UNWATCHED] {
            drop(connect(server(port)));
        }
    });
    let rules = format!(
        "[[rule]]\nname = \"redis\"\ncgroup = \"{cg}\"\nlocal_ports = [{REDIS}]\n\
         idle = \"{IDLE}s\"\ninterval = \"{INTERVAL}s\"\ncount = {COUNT}\n\n\
         [[rule]]\nname = \"mqtt\"\ncgroup = \"{cg}\"\nlocal_ports = [{MQTT}]\n\
         remote_cidrs = [\"{a}/32\", \"::1\"]\n\
         idle = \"{IDLE}s\"\ninterval = \"{INTERVAL}s\"\ncount = {COUNT}\n",
        cg = watched.path.display(),
        a = ns.addr_a,
    );
    let Some(daemon) = HostDaemon::start(TEST, &rules) else {
        return;
    };

    // Clients: three per watched server from namespace a, an IPv6 one per watched server
    // over namespace b's loopback, and two to the server in the other cgroup.
    let ends = [End::Vanish, End::Reset, End::Close];
    let mut clients: Vec<(&str, End, TcpStream)> = ns.within(&ns.a, || {
        let mut v = Vec::new();
        for (i, end) in ends.iter().enumerate() {
            let mut r = connect(server(REDIS));
            redis_ping(&mut r);
            v.push(("redis", *end, r));
            let mut m = connect(server(MQTT));
            mqtt_connect(&mut m, &format!("lull-test-{i}"), 0);
            v.push(("mqtt", *end, m));
        }
        v
    });
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0);
    ns.within(&ns.b, || {
        let mut r = connect(SocketAddr::new(v6.ip(), REDIS));
        redis_ping(&mut r);
        clients.push(("redis", End::Close, r));
        let mut m = connect(SocketAddr::new(v6.ip(), MQTT));
        mqtt_connect(&mut m, "lull-test-v6", 0);
        clients.push(("mqtt", End::Close, m));
    });
    let unwatched: Vec<TcpStream> = ns.within(&ns.a, || {
        (0..2)
            .map(|_| {
                let mut s = connect(server(REDIS_UNWATCHED));
                redis_ping(&mut s);
                s
            })
            .collect()
    });
    let port_of = |s: &TcpStream| s.local_addr().expect("local address").port();

    // Options, as each server's own getsockopt sees them.
    let lull_opts = KeepaliveOpts {
        keepalive: 1,
        idle: IDLE as i32,
        interval: INTERVAL as i32,
        count: COUNT as i32,
        user_timeout: 0,
    };
    for (server, _, c) in &clients {
        let pid = if *server == "redis" {
            redis.pid()
        } else {
            mqtt.pid()
        };
        assert_eq!(
            server_opts(pid, port_of(c)),
            lull_opts,
            "{server} client {}",
            port_of(c)
        );
    }
    let defaults = KeepaliveOpts {
        keepalive: 0,
        idle: 7200,
        interval: 75,
        count: 9,
        user_timeout: 0,
    };
    for c in &unwatched {
        assert_eq!(
            server_opts(redis_other.pid(), port_of(c)),
            defaults,
            "a socket in another cgroup keeps the kernel's defaults"
        );
    }
    let ss = ss_timers(&ns.b);
    for line in ss.lines() {
        let local_port = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.rsplit(':').next());
        match local_port.and_then(|p| p.parse::<u16>().ok()) {
            Some(REDIS_UNWATCHED) => assert!(!line.contains("keepalive"), "ss -o: {line}"),
            Some(REDIS | MQTT) => assert!(line.contains("timer:(keepalive"), "ss -o: {line}"),
            _ => {}
        }
    }

    // `lull ls` lists exactly the watched connections, with cookies to follow them by.
    let rows = daemon.ls();
    let listed: HashMap<u16, &Value> = rows
        .iter()
        .filter_map(|r| Some((peer_port_of(r)?, r)))
        .collect();
    for (server, _, c) in &clients {
        let row = listed
            .get(&port_of(c))
            .unwrap_or_else(|| panic!("lull ls lacks {server} client {}: {rows:?}", port_of(c)));
        assert_eq!(row["rule"], *server);
        assert_eq!(row["state"], "ESTABLISHED");
        for key in ["cookie", "local", "idle_rx_s", "idle_tx_s"] {
            assert!(!row[key].is_null(), "{key} in {row}");
        }
    }
    for c in &unwatched {
        assert!(
            !listed.contains_key(&port_of(c)),
            "an unwatched connection is listed"
        );
    }
    assert_eq!(rows.len(), clients.len(), "{rows:?}");

    // End them: vanish, reset, close.
    let vanished_at = Instant::now();
    let mut expected = Vec::new();
    let mut silent = Vec::new();
    for (server, end, c) in clients {
        let port = port_of(&c);
        let cookie = listed[&port]["cookie"].as_u64().expect("a numeric cookie");
        expected.push((server, end, port, cookie));
        match end {
            End::Vanish => {
                for (chain, dir) in [("OUTPUT", "--sport"), ("INPUT", "--dport")] {
                    let port = port.to_string();
                    iptables_in(&ns.a, &["-A", chain, "-p", "tcp", dir, &port, "-j", "DROP"]);
                }
                // The socket stays open, and silent: the host is gone, not the process.
                silent.push(c);
            }
            End::Reset => {
                set_linger_zero(&c);
                drop(c);
            }
            End::Close => drop(c),
        }
    }
    // Poll the events file, noting when each connection's verdict first appears.
    let bound = Duration::from_secs(IDLE + COUNT * INTERVAL + 1);
    let deadline = vanished_at + bound + Duration::from_secs(5);
    let mut seen: HashMap<u16, (Value, Duration)> = HashMap::new();
    while seen.len() < expected.len() && Instant::now() < deadline {
        for e in daemon.events() {
            if let Some(port) = peer_port_of(&e) {
                seen.entry(port).or_insert((e, vanished_at.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut cookies = HashSet::new();
    for (server, end, port, cookie) in expected {
        let (verdict, after) = seen
            .get(&port)
            .unwrap_or_else(|| panic!("no verdict for {server} client {port} ({end:?})"));
        eprintln!(
            "{server} client {port} ({end:?}): {} after {after:?}",
            verdict["verdict"]
        );
        if end == End::Vanish {
            assert!(
                *after <= bound,
                "{server}: keepalive_timeout after {after:?}, over the bound {bound:?}"
            );
        }
        assert_eq!(
            verdict["verdict"],
            end.verdict(),
            "{server} {end:?}: {verdict}"
        );
        assert_eq!(verdict["rule"], server);
        assert_eq!(verdict["cookie"].as_u64(), Some(cookie), "{verdict}");
        assert!(
            verdict["age_s"].as_f64().is_some_and(|a| a > 0.0),
            "{verdict}"
        );
        assert!(
            cookies.insert(cookie),
            "one verdict per connection: {verdict}"
        );
    }
    let all = daemon.events();
    let per_cookie: HashSet<u64> = all.iter().filter_map(|e| e["cookie"].as_u64()).collect();
    assert_eq!(
        per_cookie.len(),
        all.len(),
        "no connection got two verdicts: {all:?}"
    );
    drop((unwatched, silent));
}
