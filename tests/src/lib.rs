//! Shared support for lull's integration tests: loopback socket pairs, bounded waits, and the
//! rule for when eBPF is unavailable.
//!
//! Every test here touches only loopback addresses or network namespaces it creates itself.

pub mod bpf;
pub mod cgroups;
pub mod cli;
pub mod host;
pub mod nat;
pub mod netns;
pub mod pins;
pub mod servers;

use std::{
    collections::{HashMap, HashSet},
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use lull::{
    ConnId, Engine, EngineBuilder, Policy, SourceChoice, Watched,
    activity::{ActivityTable, CgroupScope, SourceKind, TableOptions},
};

/// Set to `1` (as `.ci/run` does) to make "eBPF unavailable" fail the test instead of skipping.
pub const REQUIRE_EBPF: &str = "LULL_REQUIRE_EBPF";

/// Whether eBPF tests must run.
pub fn ebpf_required() -> bool {
    std::env::var(REQUIRE_EBPF).is_ok_and(|v| v == "1")
}

/// Whether this process is root, which loading eBPF and `--user` need. Otherwise explains
/// loudly why the test is skipped, or fails it if eBPF is required.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        !ebpf_required(),
        "{test}: needs root, and {REQUIRE_EBPF}=1 forbids skipping"
    );
    eprintln!("SKIPPED {test}: needs root");
    false
}

/// Loads an activity table for a test, or explains loudly why the test is skipped.
///
/// With `LULL_REQUIRE_EBPF=1` a failure to load is a test failure, so CI can never pass by
/// skipping.
pub fn ebpf_table(test: &str, capacity: u32) -> Option<ActivityTable> {
    ebpf_table_in(test, capacity, CgroupScope::default())
}

/// [`ebpf_table`] with its programs attached to `cgroup`.
pub fn ebpf_table_in(test: &str, capacity: u32, cgroup: CgroupScope) -> Option<ActivityTable> {
    let options = TableOptions {
        capacity,
        cgroup,
        ..TableOptions::default()
    };
    match ActivityTable::load(&options) {
        Ok(table) => Some(table),
        Err(err) if !ebpf_required() => {
            eprintln!(
                "SKIPPED {test}: eBPF unavailable ({err}); set {REQUIRE_EBPF}=1 to fail instead"
            );
            None
        }
        Err(err) => panic!("{test}: eBPF is required ({REQUIRE_EBPF}=1) but unavailable: {err}"),
    }
}

/// A connected loopback pair: (ours, the peer's).
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
    let ours = TcpStream::connect(listener.local_addr().expect("listener address"))
        .expect("connect on loopback");
    let (peer, _) = listener.accept().expect("accept on loopback");
    ours.set_nodelay(true).expect("TCP_NODELAY");
    peer.set_nodelay(true).expect("TCP_NODELAY");
    (ours, peer)
}

/// Opens `n` connections to `peer` and watches each with `policy`.
pub fn watch_n(
    engine: &Engine,
    peer: &lull_harness::PeerServer,
    n: usize,
    policy: &Policy,
) -> Vec<Watched<TcpStream>> {
    peer.connect(n)
        .into_iter()
        .map(|(s, _)| engine.watch(s, policy).expect("watch"))
        .collect()
}

/// Writes `bytes` on `from` and reads them on `to`, so both sides' stacks have processed them.
pub fn transfer(from: &mut TcpStream, to: &mut TcpStream, bytes: &[u8]) {
    from.write_all(bytes).expect("write on loopback");
    let mut buf = vec![0; bytes.len()];
    to.read_exact(&mut buf).expect("read on loopback");
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Serialises the tests of one binary that hold thousands of sockets: the process may hold
/// only 20,000 fds, and parallel tests would also disturb each other's timings.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The activity sources a behavioural test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The eBPF table.
    Ebpf,
    /// The TCP_INFO fallback.
    TcpInfo,
}

impl Source {
    /// What an engine built on this source reports as its source.
    pub fn kind(self) -> SourceKind {
        match self {
            Self::Ebpf => SourceKind::Ebpf,
            Self::TcpInfo => SourceKind::TcpInfo,
        }
    }
}

/// Whether `engine` still reads `want`, as a sentence if not.
///
/// An engine whose eBPF programs went away switches to `TCP_INFO` and carries on, and most
/// scenarios pass on that source too: a test that does not look at the end would pass
/// without having tested eBPF. [`assert_source_kept`] is the form for tests; the soak, which
/// lists its problems, uses this one.
pub fn source_kept(engine: &Engine, want: SourceKind) -> Result<(), String> {
    let (now, reported) = (engine.source_kind(), engine.stats().source);
    if now == want && reported == Some(want) {
        Ok(())
    } else {
        Err(format!(
            "the engine started on the {want} source and ended on {now} (its stats say \
             {reported:?}): it fell back during the test"
        ))
    }
}

/// Asserts, at the end of a test, that `engine` still reads `want` (see [`source_kept`]).
#[track_caller]
pub fn assert_source_kept(engine: &Engine, want: SourceKind) {
    if let Err(why) = source_kept(engine, want) {
        panic!("{why}");
    }
}

/// Asserts that `reported` names every connection of `expected` exactly once, and no other.
///
/// Counting events is not enough: a connection reported twice hides one never reported.
#[track_caller]
pub fn assert_exactly_once(
    what: &str,
    reported: impl IntoIterator<Item = ConnId>,
    expected: &HashSet<ConnId>,
) {
    let mut times: HashMap<ConnId, usize> = HashMap::new();
    for id in reported {
        *times.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    let extra: Vec<_> = times.keys().filter(|id| !expected.contains(id)).collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|id| !times.contains_key(id))
        .collect();
    assert!(
        twice.is_empty() && extra.is_empty() && missing.is_empty(),
        "{what}: of {} expected connections, {} reported more than once (e.g. {:?}), {} \
         reported that were not expected (e.g. {:?}), {} never reported (e.g. {:?})",
        expected.len(),
        twice.len(),
        &twice[..twice.len().min(3)],
        extra.len(),
        &extra[..extra.len().min(3)],
        missing.len(),
        &missing[..missing.len().min(3)],
    );
}

/// An engine on `source`, configured by `builder`; `None` (with a loud message) when the
/// source is eBPF and eBPF is unavailable and not required.
pub fn engine(test: &str, source: Source, builder: EngineBuilder) -> Option<Engine> {
    let choice = match source {
        Source::Ebpf => SourceChoice::Ebpf,
        Source::TcpInfo => SourceChoice::TcpInfo,
    };
    match builder.source(choice).build() {
        Ok(engine) => Some(engine),
        Err(err) if source == Source::Ebpf && !ebpf_required() => {
            eprintln!(
                "SKIPPED {test}: eBPF unavailable ({err}); set {REQUIRE_EBPF}=1 to fail instead"
            );
            None
        }
        Err(err) => panic!("{test}: building the engine on {source:?}: {err}"),
    }
}

/// Instantiates a scenario `fn name(source: Source)` as two tests, `name::ebpf` and
/// `name::tcp_info`: both activity sources must pass the same behavioural suite.
#[macro_export]
macro_rules! both_sources {
    ($scenario:ident) => {
        mod $scenario {
            #[test]
            fn ebpf() {
                super::$scenario($crate::Source::Ebpf);
            }
            #[test]
            fn tcp_info() {
                super::$scenario($crate::Source::TcpInfo);
            }
        }
    };
}

/// Percentile (0..=100) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
