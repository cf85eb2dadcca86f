//! Shared support for lull's integration tests: loopback socket pairs, bounded waits, and the
//! rule for when eBPF is unavailable.
//!
//! Every test here touches only loopback addresses or network namespaces it creates itself.

pub mod cli;
pub mod host;
pub mod netns;
pub mod peers;
pub mod servers;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use lull::{
    Engine, EngineBuilder, SourceChoice,
    activity::{ActivityTable, TableOptions},
};

/// Set to `1` (as `.ci/run` does) to make "eBPF unavailable" fail the test instead of skipping.
pub const REQUIRE_EBPF: &str = "LULL_REQUIRE_EBPF";

/// Whether eBPF tests must run.
pub fn ebpf_required() -> bool {
    std::env::var(REQUIRE_EBPF).is_ok_and(|v| v == "1")
}

/// This process's resident memory, in bytes. Panics if it cannot be read: a reading of 0
/// would make every growth check pass.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages in /proc/self/statm");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).expect("the page size")
}

/// File descriptors this process has open. Panics if they cannot be listed: a count of 0
/// would make every leak check pass.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("listing /proc/self/fd")
        .count()
}

/// Loads an activity table for a test, or explains loudly why the test is skipped.
///
/// With `LULL_REQUIRE_EBPF=1` a failure to load is a test failure, so CI can never pass by
/// skipping.
pub fn ebpf_table(test: &str, capacity: u32) -> Option<ActivityTable> {
    let options = TableOptions {
        capacity,
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
