//! Faults, each with an exact expected outcome (issue: reliability and security).

use std::{
    collections::HashSet,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use lull::{
    ActivityMode, CloseReason, ConnId, Engine, Event, Payload, Policy, Probe,
    activity::{PIN_ROOT, SourceKind, cgroup2_root},
};
use lull_harness::{Behaviour, PeerServer, peer::PONG};
use lull_tests::{
    Source, assert_exactly_once, assert_source_kept, both_sources,
    cli::{lull_bin, lull_programs, lull_programs_of, spawn_long_ebpf_demo},
    engine,
    netns::NetnsPair,
    percentile,
    pins::{KillOnDrop, leases_of, lock_holder, pinned_links, user_records},
    root_or_skip, serial, wait_until, watch_n,
};

const IDLE: Duration = Duration::from_millis(1_000);
const INTERVAL: Duration = Duration::from_millis(500);

fn policy() -> Policy {
    Policy::detect_dead(IDLE, INTERVAL, 3).with_probe(Probe::Bytes(Payload::redis_ping()))
}

/// Waits for `n` events matching `want`, panicking on any other, then listens for one more
/// `INTERVAL` so that a connection reported twice, or one too many, is seen too. Returns the
/// connection of each matching event and when it arrived.
fn expect_events(
    engine: &Engine,
    n: usize,
    within: Duration,
    want: impl Fn(&Event) -> bool,
) -> Vec<(ConnId, Instant)> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut linger = None;
    loop {
        if linger.is_none() && got.len() >= n {
            linger = Some(Instant::now() + INTERVAL);
        }
        let until = linger.unwrap_or(deadline);
        match engine
            .events()
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            Ok(e) if want(&e) => got.push((e.id(), Instant::now())),
            Ok(other) => panic!("unexpected event {other:?}"),
            Err(_) if linger.is_some() => return got,
            Err(_) => panic!(
                "only {} of {n} expected events within {within:?}",
                got.len()
            ),
        }
    }
}

/// The ids of `watched`.
fn ids<T: std::os::fd::AsFd>(watched: &[lull::Watched<T>]) -> HashSet<ConnId> {
    watched.iter().map(lull::Watched::id).collect()
}

/// A peer in its own process (`lull peer`), so it can be frozen with SIGSTOP while its kernel
/// keeps answering at the TCP level. Returns the child and its answering port.
fn peer_process() -> (std::process::Child, u16) {
    let script =
        r#"{"busy_every_ms":1000,"hang_ms":[3600000,3600000],"close_ms":[3600000,3600000]}"#;
    let mut child = Command::new(lull_bin())
        .args(["peer", "--script", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start a peer process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("the answering port");
    (child, port)
}

both_sources!(a_frozen_peer_process_is_dead_within_the_bound);
fn a_frozen_peer_process_is_dead_within_the_bound(source: Source) {
    let _serial = serial();
    let Some(engine) = engine("frozen peer", source, Engine::builder().capacity(1024)) else {
        return;
    };
    let (mut peer, port) = peer_process();
    let watched: Vec<_> = (0..200)
        .map(|_| {
            engine
                .watch(TcpStream::connect(("127.0.0.1", port)).unwrap(), &policy())
                .unwrap()
        })
        .collect();
    // Let one probe round be answered, then freeze the peer application.
    assert!(wait_until(Duration::from_secs(5), || watched
        .iter()
        .all(|w| w.stats().probes_answered >= 1)));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(peer.id() as libc::pid_t, libc::SIGSTOP) };
    let frozen = Instant::now();
    let bound = policy().detection_bound();
    let dead = expect_events(&engine, watched.len(), bound * 2, |e| {
        matches!(e, Event::Dead { .. })
    });
    assert_exactly_once(
        &format!("{source:?}: connections to the frozen peer reported dead"),
        dead.iter().map(|(id, _)| *id),
        &ids(&watched),
    );
    let mut latency: Vec<Duration> = dead.iter().map(|(_, t)| t.duration_since(frozen)).collect();
    latency.sort();
    eprintln!(
        "{source:?}: SIGSTOP -> dead: p50 {:?} p99 {:?} max {:?} (bound {bound:?})",
        percentile(&latency, 50.0),
        percentile(&latency, 99.0),
        latency.last().unwrap()
    );
    assert!(*latency.last().unwrap() <= bound + Duration::from_millis(50));
    // SAFETY: as above.
    unsafe { libc::kill(peer.id() as libc::pid_t, libc::SIGCONT) };
    let _ = peer.kill();
    let _ = peer.wait();
    assert_source_kept(&engine, source.kind());
}

/// A blackholed path with unacknowledged data in flight: `mode` picks what counts as activity.
fn blackhole(source: Source, activity: ActivityMode, kernel: bool) {
    let _serial = serial();
    let name = "blackhole with unacked data";
    let Some(pair) = NetnsPair::create(name) else {
        return;
    };
    let Some(engine) = engine(name, source, Engine::builder().capacity(1024)) else {
        return;
    };
    let peer = pair.peer_in_b(Behaviour::Answer(PONG));
    let mut policy = policy().with_activity(activity);
    if kernel {
        policy = Policy::detect_dead(Duration::from_secs(1), Duration::from_secs(1), 2)
            .with_probe(Probe::Kernel);
    }
    let mut watched: Vec<_> = pair
        .connect_from_a(&peer, 50)
        .into_iter()
        .map(|s| engine.watch(s, &policy).unwrap())
        .collect();
    if !kernel {
        assert!(wait_until(Duration::from_secs(5), || watched
            .iter()
            .all(|w| w.stats().probes_answered >= 1)));
    }
    pair.blackhole_b();
    let blackholed = Instant::now();
    // The application writes as the path dies: that data is never acknowledged, so it is
    // retransmitted, and kernel keepalive would not even start while it is in flight.
    for w in &mut watched {
        w.set_nonblocking(true).unwrap();
        let wrote = w.write(&[b'x'; 32 * 1024]);
        assert!(
            wrote.as_ref().is_ok_and(|&n| n > 0),
            "unacknowledged data must be in flight: {wrote:?}"
        );
    }
    let bound = policy.detection_bound();
    // Kernel mode: the kernel's own timers (jiffies) and the engine's 250 ms check slack.
    let slack = if kernel {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(50)
    };
    let dead = expect_events(&engine, watched.len(), bound * 3, |e| {
        if std::env::var_os("LULL_TEST_DEBUG").is_some() {
            eprintln!("{:?} {e:?}", blackholed.elapsed());
        }
        matches!(e, Event::Dead { .. })
    });
    assert_exactly_once(
        &format!("{source:?} {activity:?} kernel={kernel}: blackholed connections reported dead"),
        dead.iter().map(|(id, _)| *id),
        &ids(&watched),
    );
    let worst = dead
        .iter()
        .map(|(_, t)| t.duration_since(blackholed))
        .max()
        .unwrap();
    eprintln!(
        "{source:?} {activity:?} kernel={kernel}: blackhole -> dead, worst {worst:?} (bound {bound:?}); {:?}",
        engine.stats()
    );
    assert!(
        worst <= bound + slack,
        "{source:?}: detection stalled: {worst:?} > {bound:?} + {slack:?}"
    );
    assert_source_kept(&engine, source.kind());
}

both_sources!(blackhole_with_unacked_data_rx_mode);
fn blackhole_with_unacked_data_rx_mode(source: Source) {
    blackhole(source, ActivityMode::RxOnly, false);
}

both_sources!(blackhole_with_unacked_data_rx_or_tx_mode);
fn blackhole_with_unacked_data_rx_or_tx_mode(source: Source) {
    // Retransmissions are not activity: they must not keep a dead path looking busy.
    blackhole(source, ActivityMode::RxOrTx, false);
}

both_sources!(blackhole_with_unacked_data_kernel_mode);
fn blackhole_with_unacked_data_kernel_mode(source: Source) {
    // Keepalive never starts with data in flight; TCP_USER_TIMEOUT bounds it instead.
    blackhole(source, ActivityMode::RxOnly, true);
}

both_sources!(local_half_close_is_closed_not_dead);
fn local_half_close_is_closed_not_dead(source: Source) {
    let _serial = serial();
    let Some(engine) = engine("local half-close", source, Engine::builder().capacity(64)) else {
        return;
    };
    let peer = PeerServer::start(Behaviour::Silent);
    let watched = watch_n(&engine, &peer, 20, &policy());
    for w in &watched {
        w.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let closed = expect_events(&engine, 20, IDLE * 2, |e| {
        matches!(
            e,
            Event::Closed {
                reason: CloseReason::LocalClose,
                ..
            }
        )
    });
    assert_exactly_once(
        &format!("{source:?}: half-closed connections reported closed"),
        closed.iter().map(|(id, _)| *id),
        &ids(&watched),
    );
    assert_eq!(
        engine.stats().probes_sent,
        0,
        "a closing connection is not probed"
    );
    assert_source_kept(&engine, source.kind());
}

/// Records everything logged, so a test can count lines (the engine logs from its own thread,
/// so this must be the process-wide subscriber).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        tracing_subscriber::fmt()
            .with_writer(move || SharedWriter(writer.clone()))
            .with_ansi(false)
            .init();
        buf
    })
    .clone()
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);
impl Write for SharedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn detached_programs_switch_the_engine_to_tcp_info_without_losing_a_connection() {
    let _serial = serial();
    let logs = logs();
    let name = "detached programs";
    let Some(engine) = engine(name, Source::Ebpf, Engine::builder().capacity(1024)) else {
        return;
    };
    let answering = PeerServer::start(Behaviour::Answer(PONG));
    let silent = PeerServer::start(Behaviour::Silent);
    let alive = watch_n(&engine, &answering, 200, &policy());
    // One link per program: cgroup_skb ingress and sock_ops.
    let links = engine.source().link_ids();
    assert_eq!(links.len(), 2);

    // Another process detaches every link (as `bpftool link detach` would).
    // SAFETY: the child only makes raw system calls and exits; it touches no locks.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        for id in &links {
            let mut attr = [0u32; 4];
            attr[0] = *id;
            // SAFETY: BPF_LINK_GET_FD_BY_ID (30) and BPF_LINK_DETACH (34) with valid attrs.
            unsafe {
                let fd = libc::syscall(libc::SYS_bpf, 30, attr.as_mut_ptr(), 16);
                let mut detach = [fd as u32, 0, 0, 0];
                libc::syscall(libc::SYS_bpf, 34, detach.as_mut_ptr(), 16);
            }
        }
        // SAFETY: ending the child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };

    assert!(
        wait_until(Duration::from_secs(3), || engine.source_kind()
            == SourceKind::TcpInfo),
        "the engine must notice"
    );
    // Connections watched before still work, and the fallback still finds dead peers.
    let dead = watch_n(&engine, &silent, 20, &policy());
    let before: u32 = alive.iter().map(|w| w.stats().probes_answered).sum();
    let reported = expect_events(&engine, 20, policy().detection_bound() * 3, |e| {
        matches!(e, Event::Dead { .. })
    });
    assert_exactly_once(
        "connections to the silent peer, watched after the fallback, reported dead",
        reported.iter().map(|(id, _)| *id),
        &ids(&dead),
    );
    let after: u32 = alive.iter().map(|w| w.stats().probes_answered).sum();
    assert!(
        after > before,
        "answering connections are still probed and answered"
    );
    assert_eq!(engine.stats().watched, 220, "no connection was lost");
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert_eq!(
        text.matches("switching this engine to the TCP_INFO")
            .count(),
        1,
        "logged once: {text}"
    );
    // The one test that must end on the fallback.
    assert_source_kept(&engine, SourceKind::TcpInfo);
}

#[test]
fn sigkill_leaves_pins_that_the_next_start_reuses_and_reclaims() {
    let _serial = serial();
    if !root_or_skip("sigkill_leaves_pins_that_the_next_start_reuses_and_reclaims") {
        return;
    }
    let mut killed = KillOnDrop::new(spawn_long_ebpf_demo(300));
    let pid = killed.id();
    let (mut programs, mut records, mut leases) = (HashSet::new(), Vec::new(), Vec::new());
    assert!(
        wait_until(Duration::from_secs(10), || {
            programs = lull_programs_of(pid);
            records = user_records(pid);
            leases = records
                .first()
                .map(|r| leases_of(&build_run_dir(r), pid))
                .unwrap_or_default();
            programs.len() == 3 && records.len() == 1 && !leases.is_empty()
        }),
        "lull {pid} holds its three programs ({programs:?}), one user record ({records:?}) and an \
         extent of the table ({leases:?})"
    );
    let record = records[0].clone();
    let run = build_run_dir(&record);
    let pins = Path::new(PIN_ROOT).join(run.file_name().unwrap());
    let cgroup = cgroup2_root().unwrap().join(format!("lull-{pid}"));
    let cgroup_id = lull::activity::cgroup_id(&cgroup).expect("lull runs in a cgroup of its own");
    let its_links = [
        format!("{cgroup_id}-ingress"),
        format!("{cgroup_id}-sock_ops"),
    ];

    killed.kill();
    // A SIGKILL leaves the pins (programs loaded, links attached), and a record and leases
    // that nobody holds any more.
    assert!(
        lull_programs().is_superset(&programs),
        "the pinned programs outlive their user"
    );
    let links = pinned_links(&pins);
    assert!(
        its_links.iter().all(|l| links.contains(l)),
        "{links:?} lacks {its_links:?}"
    );
    assert!(
        record.exists(),
        "nothing removed the dead user's record yet"
    );
    assert_eq!(
        lock_holder(&record),
        None,
        "a dead user's record is not locked"
    );
    for lease in &leases {
        assert_eq!(lock_holder(&lease.path), None, "{lease:?} is still held");
    }

    // The next start reuses the pins (the very same programs) and reclaims what was left.
    let next = KillOnDrop::new(spawn_long_ebpf_demo(300));
    let mut held = HashSet::new();
    let mut reused = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            held = lull_programs_of(next.id());
            reused = leases_of(&run, next.id());
            held.len() == 3 && !reused.is_empty()
        }),
        "the next lull holds {held:?} and leases {reused:?}"
    );
    assert_eq!(held, programs, "the next start opened the pinned programs");
    assert!(!record.exists(), "the dead user's record was removed");
    // Extents are leased first free first: the dead one's come back, in a new epoch.
    let dead = &leases[0];
    let again = reused.iter().find(|l| l.path == dead.path);
    assert!(
        again.is_some_and(|l| l.epoch > dead.epoch),
        "the dead user's extent {dead:?} was not leased again: {reused:?}"
    );
    assert!(!cgroup.exists(), "the dead lull's own cgroup was removed");
    next.signal(libc::SIGINT);
    let out = next.into_inner().wait_with_output().expect("wait for lull");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("activity source") && l.contains(" ebpf (")),
        "the run after the kill ran on eBPF to its end: {stdout}"
    );
    assert!(TcpListener::bind("127.0.0.1:0").is_ok());
}

/// `/run/lull/<build>` of a user record `/run/lull/<build>/users/<pid>.<n>`.
fn build_run_dir(record: &Path) -> PathBuf {
    record
        .parent()
        .and_then(Path::parent)
        .expect("a record lives in <build>/users")
        .to_path_buf()
}
