//! The engine on real loopback sockets, against both activity sources (issue: engine core).
//!
//! Every scenario runs once on the eBPF table and once on the TCP_INFO fallback, with 2,000
//! connections, and checks exact outcomes: which connections were probed, when, and what was
//! reported.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use lull::{CloseReason, ConnId, Engine, Event, Payload, Policy, Probe, Watched};
use lull_harness::{Behaviour, PeerServer, peer::PONG};
use lull_tests::{
    Source, assert_exactly_once, assert_source_kept, both_sources, engine, percentile, serial,
};

const N: usize = 2_000;
const IDLE: Duration = Duration::from_millis(300);
const INTERVAL: Duration = Duration::from_millis(100);
const COUNT: u32 = 3;
const TICK: Duration = Duration::from_millis(1);
/// Scheduling noise allowed on this 2-core machine on top of one tick.
const SLACK: Duration = Duration::from_millis(25);

fn policy() -> Policy {
    Policy::detect_dead(IDLE, INTERVAL, COUNT).with_probe(Probe::Bytes(Payload::redis_ping()))
}

fn builder() -> lull::EngineBuilder {
    Engine::builder().capacity(4 * N as u32).tick(TICK)
}

/// Opens `n` connections to `peer` and watches each as soon as it is open; returns handles
/// with their client port and the time watched.
fn watch_all(
    engine: &Engine,
    peer: &PeerServer,
    n: usize,
    policy: &Policy,
) -> Vec<(Watched<std::net::TcpStream>, u16, Instant)> {
    (0..n)
        .map(|_| {
            let (s, port) = peer.connect_one();
            (
                engine.watch(s, policy).expect("watch"),
                port,
                Instant::now(),
            )
        })
        .collect()
}

/// Collects events until `done` says so or `timeout` passes, then for one more `INTERVAL * 2`,
/// so that an event reported twice (a dead connection's timer keeps firing every interval) or
/// one too many is seen too.
fn collect(
    engine: &Engine,
    timeout: Duration,
    mut done: impl FnMut(&[(Instant, Event)]) -> bool,
) -> Vec<(Instant, Event)> {
    let mut deadline = Instant::now() + timeout;
    let mut events = Vec::new();
    let mut lingering = false;
    loop {
        if !lingering && done(&events) {
            lingering = true;
            deadline = Instant::now() + INTERVAL * 2;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if let Ok(e) = engine.events().recv_timeout(deadline - now) {
            events.push((Instant::now(), e));
        }
    }
    events
}

both_sources!(busy_connections_receive_zero_probes);
fn busy_connections_receive_zero_probes(source: Source) {
    let _serial = serial();
    let name = "busy_connections_receive_zero_probes";
    let Some(engine) = engine(name, source, builder()) else {
        return;
    };
    let peer = PeerServer::start(Behaviour::Busy { every: IDLE / 4 });
    let watched = watch_all(&engine, &peer, N, &policy());
    std::thread::sleep(IDLE * 4);
    let stats = engine.stats();
    let probed: u32 = watched.iter().map(|(w, ..)| w.stats().probes_sent).sum();
    assert_eq!(probed, 0, "busy connections were probed ({source:?})");
    assert_eq!(stats.probes_sent, 0);
    assert!(
        stats.wakeups_rearmed >= N as u64,
        "timers must have fired and found traffic: {stats:?}"
    );
    let events: Vec<_> = engine.events().try_iter().collect();
    assert!(
        events.is_empty(),
        "busy connections produced events: {:?}",
        &events[..events.len().min(5)]
    );
    assert_eq!(stats.watched, N as u64);
    assert_source_kept(&engine, source.kind());
}

both_sources!(idle_answering_peers_are_probed_every_idle_and_never_dead);
fn idle_answering_peers_are_probed_every_idle_and_never_dead(source: Source) {
    let _serial = serial();
    let name = "idle_answering_peers_are_probed_every_idle_and_never_dead";
    let Some(engine) = engine(name, source, builder()) else {
        return;
    };
    let peer = PeerServer::start(Behaviour::Answer(PONG));
    let policy = policy();
    let watched = watch_all(&engine, &peer, N, &policy);
    std::thread::sleep(IDLE * 3 + IDLE / 3);

    // The jitter window is centred on `idle`: idle x (1 -/+ jitter / 2).
    let half_jitter = IDLE.mul_f64(policy.jitter / 2.0);
    // A period starts at the answer as the source stamped it, so a coarse source (TCP_INFO:
    // milliseconds and jiffies) may start it a little early.
    let resolution = Duration::from_nanos(engine.source().resolution_ns());
    let (low, high) = (
        IDLE - half_jitter - TICK - resolution,
        IDLE + half_jitter + TICK + SLACK,
    );
    let mut gaps = Vec::new();

    for (w, port, watched_at) in &watched {
        let log = peer.log(*port).expect("the peer saw every connection");
        let times: Vec<Instant> = log.reads.iter().map(|(t, _)| *t).collect();
        assert!(
            times.len() >= 3,
            "port {port}: {} probes in 3.3 idle periods",
            times.len()
        );
        let mut previous = *watched_at;
        for t in &times {
            // After the first probe the period starts at the answer (one loopback RTT later).
            gaps.push(t.duration_since(previous));
            previous = *t;
        }
        let s = w.stats();
        assert!(
            s.probes_sent >= 3 && s.probes_answered + 1 >= s.probes_sent,
            "{port}: {s:?}"
        );
    }
    gaps.sort();
    eprintln!(
        "{source:?}: probe period p1 {:?} p50 {:?} p99 {:?} max {:?} (window {low:?}..{high:?})",
        percentile(&gaps, 1.0),
        percentile(&gaps, 50.0),
        percentile(&gaps, 99.0),
        gaps.last().unwrap()
    );
    window_check(
        &format!("{source:?} probe periods"),
        &gaps,
        low,
        high + Duration::from_millis(2),
    );
    let dead: Vec<_> = engine
        .events()
        .try_iter()
        .filter(|e| matches!(e, Event::Dead { .. }))
        .collect();
    assert!(dead.is_empty(), "answering peers reported dead: {dead:?}");
    assert_source_kept(&engine, source.kind());
}

both_sources!(silent_peers_are_dead_within_the_bound);
fn silent_peers_are_dead_within_the_bound(source: Source) {
    let _serial = serial();
    let name = "silent_peers_are_dead_within_the_bound";
    let Some(engine) = engine(name, source, builder()) else {
        return;
    };
    let peer = PeerServer::start(Behaviour::Silent);
    let policy = policy();
    let watched = watch_all(&engine, &peer, N, &policy);
    let since: HashMap<ConnId, Instant> = watched.iter().map(|(w, _, t)| (w.id(), *t)).collect();
    let bound = policy.detection_bound();
    let events = collect(&engine, bound * 3, |events| events.len() >= N);

    let mut latencies = Vec::new();
    for (at, event) in &events {
        match event {
            Event::Dead { id, probes, .. } => {
                assert_eq!(*probes, COUNT, "dead after {probes} probes");
                if let Some(since) = since.get(id) {
                    latencies.push(at.duration_since(*since));
                }
            }
            other => panic!("unexpected event for a silent peer: {other:?}"),
        }
    }
    let silent: HashSet<ConnId> = since.keys().copied().collect();
    assert_exactly_once(
        &format!("{source:?}: silent peers reported dead"),
        events.iter().map(|(_, e)| e.id()),
        &silent,
    );
    latencies.sort();
    let (p50, p99, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        *latencies.last().unwrap(),
    );
    eprintln!(
        "{source:?}: detection latency (bound {bound:?}): p50 {p50:?} p99 {p99:?} max {max:?}"
    );
    assert!(
        max <= bound + Duration::from_millis(50),
        "{source:?}: slowest detection {max:?} > {bound:?} + 50 ms"
    );
    // The first probe may go out at the near edge of the jitter window, and each of the
    // `COUNT` intervals after it counts from the start of the tick it was armed in.
    let earliest = bound - IDLE.mul_f64(policy.jitter) - TICK * COUNT;
    assert!(
        latencies[0] >= earliest,
        "{source:?}: detected after {:?}, before the policy allows",
        latencies[0]
    );
    for (w, ..) in &watched {
        assert_eq!(w.stats().probes_sent, COUNT);
        assert_eq!(w.stats().probes_answered, 0);
    }
    assert_eq!(peer.total_bytes(), 0, "the silent peer never reads");
    assert_source_kept(&engine, source.kind());
}

both_sources!(closing_peers_yield_closed_not_dead);
fn closing_peers_yield_closed_not_dead(source: Source) {
    let _serial = serial();
    let name = "closing_peers_yield_closed_not_dead";
    let Some(engine) = engine(name, source, builder()) else {
        return;
    };
    let fin = PeerServer::start(Behaviour::Close {
        after: Duration::from_millis(50),
        reset: false,
    });
    let rst = PeerServer::start(Behaviour::Close {
        after: Duration::from_millis(50),
        reset: true,
    });
    let policy = policy();
    let fin_watched = watch_all(&engine, &fin, N / 2, &policy);
    let rst_watched = watch_all(&engine, &rst, N / 2, &policy);
    let events = collect(&engine, policy.detection_bound() * 2, |events| {
        events.len() >= N
    });
    let closing: HashSet<ConnId> = fin_watched
        .iter()
        .chain(&rst_watched)
        .map(|(w, ..)| w.id())
        .collect();
    let mut reasons: HashMap<ConnId, CloseReason> = HashMap::new();
    for (_, event) in &events {
        match event {
            Event::Closed { id, reason } => {
                reasons.insert(*id, *reason);
            }
            other => panic!("a closing peer must yield Closed, got {other:?}"),
        }
    }
    assert_exactly_once(
        &format!("{source:?}: closing peers reported closed"),
        events.iter().map(|(_, e)| e.id()),
        &closing,
    );
    for (w, ..) in &fin_watched {
        assert_eq!(
            reasons.get(&w.id()),
            Some(&CloseReason::PeerFin),
            "{source:?}"
        );
    }
    for (w, ..) in &rst_watched {
        let reason = reasons.get(&w.id());
        // TCP_INFO cannot tell a reset from any other close.
        let ok = match source {
            Source::Ebpf => reason == Some(&CloseReason::PeerReset),
            Source::TcpInfo => matches!(reason, Some(CloseReason::PeerReset | CloseReason::Closed)),
        };
        assert!(ok, "{source:?}: reset peer gave {reason:?}");
    }
    assert_eq!(engine.stats().dead, 0);
    assert_source_kept(&engine, source.kind());
}

both_sources!(keep_warm_sends_one_probe_per_interval_of_tx_silence);
fn keep_warm_sends_one_probe_per_interval_of_tx_silence(source: Source) {
    let _serial = serial();
    let name = "keep_warm_sends_one_probe_per_interval_of_tx_silence";
    let Some(engine) = engine(name, source, builder()) else {
        return;
    };
    let interval = Duration::from_millis(100);
    let policy = Policy::keep_warm(interval).with_probe(Probe::Bytes(Payload::mqtt_pingreq()));
    // The peer reads and never answers: keep-warm must not care.
    let peer = PeerServer::start(Behaviour::Count);
    let watched = watch_all(&engine, &peer, N, &policy);
    std::thread::sleep(interval * 10 + interval / 2);
    let end = Instant::now();
    let jitter = interval.mul_f64(policy.jitter);
    let (low, high) = (interval - jitter - TICK, interval + TICK + SLACK);
    let (mut bad_counts, mut gaps, mut total) = (Vec::new(), Vec::new(), 0);
    for (_, port, watched_at) in &watched {
        let log = peer.log(*port).expect("the peer saw every connection");
        let probes = log.bytes() / Payload::mqtt_pingreq().as_bytes().len();
        total += probes;
        // One probe per interval of tx silence since the watch began: between elapsed/interval
        // (every arm as late as possible) and elapsed/(interval - jitter), give or take the
        // one in flight at the end.
        let elapsed = end.duration_since(*watched_at);
        let fewest = (elapsed.as_secs_f64() / high.as_secs_f64()).floor() as usize;
        let most = (elapsed.as_secs_f64() / low.as_secs_f64()).ceil() as usize;
        if probes < fewest.saturating_sub(1) || probes > most {
            bad_counts.push((*port, probes, fewest, most));
        }
        let reads: Vec<Instant> = log.reads.iter().map(|(t, _)| *t).collect();
        gaps.extend(unshifted_gaps(&reads, low));
    }
    let late = window_check(&format!("{source:?} keep-warm"), &gaps, low, high);
    eprintln!(
        "{source:?}: keep-warm: {total} probes over {N} connections; {late} of {} gaps late; \
         connections with a count out of range: {}",
        gaps.len(),
        bad_counts.len()
    );
    assert!(
        bad_counts.is_empty(),
        "{source:?}: probes per connection out of range (port, got, fewest, most): {:?}",
        &bad_counts[..bad_counts.len().min(5)]
    );
    assert_eq!(engine.stats().dead, 0, "keep-warm never reports dead");
    assert_source_kept(&engine, source.kind());
}

/// Bytes waiting in a socket's receive queue (`FIONREAD`).
fn unread(fd: i32) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to a valid pointer.
    let ret = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    assert_eq!(ret, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n
}

both_sources!(drain_discards_what_the_peer_sends);
fn drain_discards_what_the_peer_sends(source: Source) {
    use std::os::fd::AsRawFd;
    let _serial = serial();
    let name = "drain_discards_what_the_peer_sends";
    let Some(engine) = engine(name, source, builder()) else {
        return;
    };
    let peer = PeerServer::start(Behaviour::Answer(PONG));
    let n = 200;
    let drained = watch_all(&engine, &peer, n, &policy().with_drain(true));
    let kept = watch_all(&engine, &peer, n, &policy());
    std::thread::sleep(IDLE * 3);
    let reply = PONG.len() as i32;
    for (w, ..) in &drained {
        let s = w.stats();
        assert!(
            s.probes_sent >= 2 && s.probes_answered >= 1,
            "{source:?}: {s:?}"
        );
        // Drained at every expiry; the answer to the latest probe may not be drained yet.
        let left = unread(w.as_raw_fd());
        assert!(
            left <= reply,
            "{source:?}: a drained socket kept {left} bytes of replies"
        );
    }
    for (w, ..) in &kept {
        let left = unread(w.as_raw_fd());
        assert!(
            left >= 2 * reply,
            "{source:?}: an undrained socket must keep every reply, has {left}"
        );
    }
    assert_source_kept(&engine, source.kind());
}

/// The gaps between unanswered probes as the peer read them, with each read the peer logged
/// late put back in place.
///
/// The peer's thread shares two busy cores with the engine and the test: a read it logs late
/// lengthens one gap and shortens the next by as much, although both probes went out on time
/// (nothing answers, so nothing the engine does depends on when the peer read). Such a pair,
/// a gap under `low` right after a longer one that makes up for it, counts as two gaps of
/// its mean. Probes really sent early leave short gaps that nothing makes up for, and still
/// fail the window.
fn unshifted_gaps(reads: &[Instant], low: Duration) -> Vec<Duration> {
    let mut gaps: Vec<Duration> = reads.windows(2).map(|p| p[1] - p[0]).collect();
    for k in 1..gaps.len() {
        let (before, this) = (gaps[k - 1], gaps[k]);
        if this < low && before + this >= low * 2 {
            let mean = (before + this) / 2;
            gaps[k - 1] = mean;
            gaps[k] = mean;
        }
    }
    gaps
}

/// Checks probe gaps against their window. Never early: a gap below `low` is an engine bug,
/// always. Late is what a busy two-core machine does to any thread now and then, so up to 1%
/// of gaps may be late, by at most one more period; more than that is a failure. Returns how
/// many were late.
fn window_check(what: &str, gaps: &[Duration], low: Duration, high: Duration) -> usize {
    let early: Vec<_> = gaps.iter().filter(|g| **g < low).collect();
    assert!(
        early.is_empty(),
        "{what}: {} gaps shorter than {low:?}: {:?}",
        early.len(),
        &early[..early.len().min(10)]
    );
    let late: Vec<_> = gaps.iter().filter(|g| **g > high).collect();
    assert!(
        late.len() * 100 <= gaps.len(),
        "{what}: {} of {} gaps longer than {high:?}",
        late.len(),
        gaps.len()
    );
    let worst = late.iter().max().copied().copied().unwrap_or_default();
    assert!(
        worst <= high * 2,
        "{what}: a gap of {worst:?}, over twice {high:?}"
    );
    late.len()
}
