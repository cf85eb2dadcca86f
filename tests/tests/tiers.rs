//! Tiered probing and the lean probe cycle (issue: catch hung applications at close to kernel
//! keepalive's cost), against both activity sources.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use lull::{ConnId, DeadTier, Engine, Event, Payload, Policy, Probe};
use lull_harness::{Behaviour, PeerServer, peer::PONG};
use lull_tests::{
    Source, assert_exactly_once, assert_source_kept, both_sources, engine, netns::NetnsPair,
    serial, watch_n,
};

/// Connections per population.
const N: usize = 20;
const IDLE: Duration = Duration::from_secs(1);
const INTERVAL: Duration = Duration::from_secs(1);
const COUNT: u32 = 2;
/// Well above the transport's bound (3 s): the application tier's first probe goes out after
/// about 5.4 s of silence, long after the kernel's keepalive has judged a vanished peer.
const HUNG_AFTER: Duration = Duration::from_secs(8);
/// The kernel's timers run in jiffies and late under load, and the engine looks at a tiered
/// connection's kernel verdict with a 250 ms margin: what the issue allows on top of a bound.
const SLACK: Duration = Duration::from_secs(1);

fn tiered() -> Policy {
    Policy::detect_dead(IDLE, INTERVAL, COUNT)
        .with_probe(Probe::Bytes(Payload::redis_ping()))
        .with_hung_after(HUNG_AFTER)
}

both_sources!(each_tier_reports_its_own_dead_peers_and_a_busy_peer_is_never_reported);
fn each_tier_reports_its_own_dead_peers_and_a_busy_peer_is_never_reported(source: Source) {
    let _serial = serial();
    let name = "each_tier_reports_its_own_dead_peers";
    let Some(pair) = NetnsPair::create(name) else {
        return;
    };
    // Before any socket: with eBPF, the process's sockets must be in the attached cgroup.
    let Some(engine) = engine(name, source, Engine::builder().capacity(256)) else {
        return;
    };
    let policy = tiered();
    let (transport_bound, hung_bound) = (policy.transport_bound(), policy.hung_bound());
    assert_eq!(transport_bound, IDLE + INTERVAL * COUNT);
    assert_eq!(hung_bound, HUNG_AFTER);

    // Vanishing: a healthy peer in the other namespace, until its host drops off the path.
    let far = pair.peer_in_b(Behaviour::Answer(PONG));
    let vanishing: Vec<_> = pair
        .connect_from_a(&far, N)
        .into_iter()
        .map(|s| engine.watch(s, &policy).expect("watch"))
        .collect();
    // Hung: its kernel ACKs everything, its application never answers.
    let hung_peer = PeerServer::start(Behaviour::Silent);
    let hung = watch_n(&engine, &hung_peer, N, &policy);
    let hung_since = Instant::now();
    // Busy: traffic three times a second.
    let busy_peer = PeerServer::start(Behaviour::Busy {
        every: Duration::from_millis(300),
    });
    let busy = watch_n(&engine, &busy_peer, N, &policy);
    pair.blackhole_b();
    let vanished_at = Instant::now();

    let ids = |w: &[lull::Watched<std::net::TcpStream>]| -> HashSet<ConnId> {
        w.iter().map(lull::Watched::id).collect()
    };
    let (vanished, hung_ids, busy_ids) = (ids(&vanishing), ids(&hung), ids(&busy));
    // Until both bounds (and their slack) have passed, plus an interval in which a connection
    // reported twice would show.
    let until =
        (vanished_at + transport_bound).max(hung_since + hung_bound + INTERVAL) + SLACK + INTERVAL;
    let mut dead: HashMap<DeadTier, Vec<(ConnId, Instant)>> = HashMap::new();
    while let Ok(event) = engine
        .events()
        .recv_timeout(until.saturating_duration_since(Instant::now()))
    {
        match event {
            Event::Dead { id, tier, .. } => {
                dead.entry(tier).or_default().push((id, Instant::now()));
            }
            other => panic!("{source:?}: unexpected event {other:?}"),
        }
    }
    let by = |tier| dead.get(&tier).cloned().unwrap_or_default();
    let (transport, application) = (by(DeadTier::Transport), by(DeadTier::Application));
    assert_exactly_once(
        &format!("{source:?}: vanished peers, by the transport tier"),
        transport.iter().map(|(id, _)| *id),
        &vanished,
    );
    assert_exactly_once(
        &format!("{source:?}: hung peers, by the application tier"),
        application.iter().map(|(id, _)| *id),
        &hung_ids,
    );
    let reported: HashSet<ConnId> = transport.iter().chain(&application).map(|d| d.0).collect();
    assert!(
        reported.is_disjoint(&busy_ids),
        "{source:?}: busy peers were reported dead"
    );
    let slowest = |reports: &[(ConnId, Instant)], since: Instant| {
        reports
            .iter()
            .map(|(_, at)| at.duration_since(since))
            .max()
            .unwrap_or_default()
    };
    let (transport_worst, application_worst) = (
        slowest(&transport, vanished_at),
        slowest(&application, hung_since),
    );
    eprintln!(
        "{source:?}: vanished -> dead (transport) worst {transport_worst:?} (bound \
         {transport_bound:?}); hung -> dead (application) worst {application_worst:?} (bound \
         {hung_bound:?} + an interval)"
    );
    assert!(
        transport_worst <= transport_bound + SLACK,
        "{source:?}: the transport tier took {transport_worst:?}"
    );
    assert!(
        application_worst <= hung_bound + INTERVAL + SLACK,
        "{source:?}: the application tier took {application_worst:?}"
    );
    let stats = engine.stats();
    assert_eq!(
        (stats.dead_transport, stats.dead_application),
        (N as u64, N as u64),
        "{stats:?}"
    );
    for w in &busy {
        assert_eq!(
            w.stats().probes_sent,
            0,
            "{source:?}: a busy peer was probed"
        );
    }
    assert_source_kept(&engine, source.kind());
}

const DRAIN_IDLE: Duration = Duration::from_millis(300);
const DRAIN_INTERVAL: Duration = Duration::from_millis(150);

/// `n` connections to a peer with `behaviour`, on an engine of their own (so that its counters
/// are theirs alone), watched for `IDLE * 5` by a policy that drains.
fn drained(source: Source, behaviour: Behaviour) -> Option<(lull::EngineStats, u64)> {
    let name = "drains";
    let engine = engine(name, source, Engine::builder().capacity(256))?;
    let peer = PeerServer::start(behaviour);
    let policy = Policy::detect_dead(DRAIN_IDLE, DRAIN_INTERVAL, COUNT)
        .with_probe(Probe::Bytes(Payload::redis_ping()))
        .with_drain(true);
    // TCP_INFO dates a socket's last receive from its handshake until payload arrives, in
    // jiffies: a socket watched within a jiffy of its handshake would look as if something
    // had arrived after it was watched. Let the handshakes age past the source's resolution.
    let sockets = peer.connect(N);
    std::thread::sleep(Duration::from_nanos(engine.source().resolution_ns()) * 2);
    let watched: Vec<_> = sockets
        .into_iter()
        .map(|(s, _)| engine.watch(s, &policy).expect("watch"))
        .collect();
    std::thread::sleep(DRAIN_IDLE * 5);
    let stats = engine.stats();
    let answered: u64 = watched
        .iter()
        .map(|w| u64::from(w.stats().probes_answered))
        .sum();
    assert_source_kept(&engine, source.kind());
    Some((stats, answered))
}

both_sources!(no_read_is_submitted_on_a_firing_that_found_nothing_new);
fn no_read_is_submitted_on_a_firing_that_found_nothing_new(source: Source) {
    let _serial = serial();
    // Silent peers never send: no firing of theirs may read.
    let Some((silent, _)) = drained(source, Behaviour::Silent) else {
        return;
    };
    assert!(
        silent.wakeups >= (N as u64) * u64::from(COUNT + 1),
        "{source:?}: each connection fired for its probes and its verdict: {silent:?}"
    );
    assert_eq!(silent.drains, 0, "{source:?}: {silent:?}");
    assert_eq!(
        silent.drains_skipped, silent.wakeups,
        "{source:?}: every firing had nothing to read: {silent:?}"
    );

    // Answering peers: every firing that finds an answer reads it; the first firing of each
    // connection, before any probe, has nothing to read.
    let Some((answering, answered)) = drained(source, Behaviour::Answer(PONG)) else {
        return;
    };
    assert!(answered >= 2 * N as u64, "{source:?}: {answering:?}");
    assert_eq!(
        answering.drains + answering.drains_skipped,
        answering.wakeups,
        "{source:?}: each firing either read or skipped: {answering:?}"
    );
    assert!(
        answering.drains >= answered,
        "{source:?}: each answer was read, {answered} answers: {answering:?}"
    );
    assert!(
        answering.drains_skipped >= N as u64,
        "{source:?}: the first firings had nothing: {answering:?}"
    );
    // A read follows an answer: the firing that found it, and at most the connection's next
    // probe, whose last look was before the answer.
    assert!(
        answering.drains <= 2 * answered,
        "{source:?}: reads without an answer to read, {answered} answers: {answering:?}"
    );
}
