//! `lull run --connect` against real servers from Debian's packages: connections held past the
//! server's own idle limit (and the same connections dropped without lull, in the same test),
//! and a frozen server reported dead where the kernel's keepalive sees nothing wrong.

use std::{
    io::Read,
    net::TcpStream,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use lull::activity::{TcpState, tcp_info};
use lull_tests::{
    cli::{lull_report, report, scratch, spawn_lull},
    serial,
    servers::{Server, mqtt_connect},
};

/// Opens `n` plain connections (no lull) and runs `hello` on each.
fn plain(addr: &str, n: usize, hello: impl Fn(&mut TcpStream)) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect without lull");
            hello(&mut s);
            s
        })
        .collect()
}

/// How many of `conns` the server has closed (EOF or reset), looking without blocking.
fn closed_by_server(conns: &[TcpStream]) -> usize {
    conns
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 256];
            let mut r = *s;
            loop {
                match r.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                    Err(_) => return true,
                }
            }
        })
        .count()
}

/// `lull run --connect addr` holding `n` connections for `duration`, probing each after 1 s
/// of silence with `probe` (the `--probe` flag and any it needs); checks that none was
/// closed or found dead and that each answered at least four probes.
fn assert_lull_holds(addr: &str, n: u64, probe: &[&str], duration: &str, server: &str) {
    let conns = n.to_string();
    let mut args = vec!["run", "--connect", addr, "--conns", &conns];
    args.extend_from_slice(probe);
    args.extend(["--idle", "1s", "--interval", "500ms"]);
    args.extend(["--duration", duration, "--quiet"]);
    let r = lull_report(&args, &scratch(&format!("{server}-hold.json")));
    assert_eq!(r["connections"], n);
    assert_eq!(
        r["closed"]["found"], 0,
        "{server} closed connections lull was keeping alive"
    );
    assert_eq!(r["dead"]["found"], 0);
    assert!(
        r["probes_answered"].as_u64().unwrap() >= n * 4,
        "{server} answered too few probes: {}",
        r["probes_answered"]
    );
}

#[test]
fn redis_connections_outlive_the_server_timeout() {
    let _serial = serial();
    // The server closes any client idle for 2 s; lull holds them 4x as long.
    let Some(redis) = Server::redis("redis_connections_outlive_the_server_timeout", 2) else {
        return;
    };
    let without = plain(&redis.addr(), 50, |_| {});
    assert_lull_holds(&redis.addr(), 50, &["--probe", "redis"], "8s", "redis");
    assert_eq!(
        closed_by_server(&without),
        50,
        "without lull, redis drops idle clients after 2 s"
    );
}

#[test]
fn mosquitto_connections_outlive_the_keepalive_rule() {
    let _serial = serial();
    let Some(broker) = Server::mosquitto("mosquitto_connections_outlive_the_keepalive_rule") else {
        return;
    };
    // MQTT keepalive 2 s: the broker drops a client silent for 1.5x that.
    let connect = |s: &mut TcpStream, id: &str| mqtt_connect(s, id, 2);
    let counter = std::cell::Cell::new(0);
    let without = plain(&broker.addr(), 30, |s| {
        counter.set(counter.get() + 1);
        connect(s, &format!("plain-{}", counter.get()));
    });
    let probe = ["--mqtt-keepalive", "2", "--probe", "mqtt"];
    assert_lull_holds(&broker.addr(), 30, &probe, "9s", "mosquitto");
    assert_eq!(
        closed_by_server(&without),
        30,
        "without lull, the broker drops clients after 3 s"
    );
}

#[test]
fn a_frozen_server_is_dead_within_the_bound_while_kernel_keepalive_sees_nothing() {
    let _serial = serial();
    let Some(redis) = Server::redis("a_frozen_server_is_dead", 0) else {
        return;
    };
    // The kernel's keepalive, as aggressive as it gets, on a connection to the same server.
    let kernel_only = TcpStream::connect(redis.addr()).unwrap();
    let sock = socket2::SockRef::from(&kernel_only);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(1))
            .with_interval(Duration::from_secs(1))
            .with_retries(2),
    )
    .unwrap();

    let json = scratch("redis-frozen.json");
    let child = spawn_lull(&[
        "run",
        "--connect",
        &redis.addr(),
        "--conns",
        "20",
        "--probe",
        "redis",
        "--idle",
        "1s",
        "--interval",
        "500ms",
        "--count",
        "3",
        "--duration",
        "8s",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ]);
    std::thread::sleep(Duration::from_millis(2_500));
    let frozen = Instant::now();
    redis.signal(libc::SIGSTOP);
    let out = child.wait_with_output().expect("wait for lull");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r = report(&json);
    assert_eq!(
        r["dead"]["found"], 20,
        "every connection to the frozen server is dead"
    );
    assert_eq!(r["closed"]["found"], 0);
    let latency = &r["detection_latency"];
    let bound = latency["bound_ms"].as_f64().unwrap();
    assert_eq!(
        bound, 2_550.0,
        "the far edge of the jitter window, 1 s x (1 + 10% / 2), + 3 x 500 ms"
    );
    assert!(
        latency["max_ms"].as_f64().unwrap() <= bound + 50.0,
        "{latency}"
    );
    // "connection <id> to <addr> is dead: ...", once for each of the 20 connections.
    let dead: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(" is dead"))
        .filter_map(|l| l.split("connection ").nth(1)?.split(' ').next())
        .collect();
    let distinct: std::collections::HashSet<&str> = dead.iter().copied().collect();
    assert_eq!(
        (dead.len(), distinct.len()),
        (20, 20),
        "each connection is reported dead exactly once: {stderr}"
    );

    // Frozen for over 5 s by now: kernel keepalive (1 s + 2 x 1 s) would have given up on a
    // dead path, but the frozen server's kernel answers every probe.
    assert!(frozen.elapsed() > Duration::from_secs(4));
    let info = tcp_info(std::os::fd::AsFd::as_fd(&kernel_only)).unwrap();
    assert_eq!(
        TcpState::from_raw(info.tcpi_state),
        TcpState::Established,
        "kernel keepalive saw nothing wrong"
    );
    assert!(kernel_only.as_raw_fd() >= 0);
}
