//! Dropping a `Watched` while the engine probes: after drop returns, no probe may reach the
//! fd, even when its number is reused at once (issue: engine core, race test).

use std::{
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use lull::{Engine, Policy};
use lull_harness::{Behaviour, PeerServer};
use lull_tests::{Source, assert_source_kept, both_sources, engine, serial, wait_until};

const CYCLES: usize = 100_000;
const THREADS: usize = 2;
/// Bounds the test whatever happens.
const TIME_LIMIT: Duration = Duration::from_secs(150);
/// The engine's tick, and the policy's idle time and interval: the engine probes as fast as
/// it can, 100 µs after the watch and then every 100 µs.
const TICK: Duration = Duration::from_micros(100);
const STEP: Duration = Duration::from_micros(100);

/// A cheap per-thread random number (no shared state, no dependency).
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Spins (yielding) until `until`.
fn spin_until(until: Instant) {
    while Instant::now() < until {
        std::thread::yield_now();
    }
}

/// What one watch/drop cycle tested.
#[derive(Default)]
struct Tally {
    /// Cycles run.
    done: usize,
    /// Cycles in which the victim got the dropped watch's fd number.
    reused: usize,
    /// Cycles in which it also held that number from before the dropped watch's next probe
    /// was due until two ticks after: an engine that missed the drop would have written to
    /// the victim.
    in_window: usize,
}

/// Watches a dup of `pooled` for 0-300 µs (now and then 1 ms), drops it, and opens a dup of
/// `victim` at once, which takes the lowest free fd number: the one just closed, unless the
/// other thread took it. The victim stays open until the next probe the dropped watch would
/// have sent is due, and two ticks more.
fn cycle(
    engine: &Engine,
    policy: &Policy,
    pooled: &OwnedFd,
    victim: &OwnedFd,
    rng: &mut u64,
    tally: &mut Tally,
) {
    let fd = pooled.try_clone().expect("dup");
    let number = fd.as_raw_fd();
    let watched_at = Instant::now();
    let w = engine.watch(fd, policy).expect("watch");
    // Drops land before, during and after the first probes; now and then late enough for
    // several.
    let r = next(rng);
    let hold = if r.is_multiple_of(100) {
        1_000
    } else {
        r % 300
    };
    spin_until(Instant::now() + Duration::from_micros(hold));
    drop(w);
    let dropped = Instant::now();
    let victim = victim.try_clone().expect("dup");
    let opened = Instant::now();
    // Probes were due at watched_at + k * STEP (k >= 1); the first not yet due at the drop.
    let periods = dropped.duration_since(watched_at).as_nanos() / STEP.as_nanos() + 1;
    let due = watched_at + STEP * u32::try_from(periods).expect("a short hold");
    spin_until(due + 2 * TICK);
    tally.done += 1;
    if victim.as_raw_fd() == number {
        tally.reused += 1;
        if opened <= due {
            tally.in_window += 1;
        }
    }
    drop(victim);
}

both_sources!(no_probe_reaches_a_reused_fd_after_drop);
fn no_probe_reaches_a_reused_fd_after_drop(source: Source) {
    let _serial = serial();
    let name = "no_probe_reaches_a_reused_fd_after_drop";
    // A small capacity, so slots are reused (through the RCU grace period) many times, and a
    // 100 µs tick, so that probes go out while handles are being dropped.
    let builder = Engine::builder()
        .capacity(256)
        .tick(TICK)
        .max_probes_per_tick(4096);
    let Some(engine) = engine(name, source, builder) else {
        return;
    };
    let watched_peer = PeerServer::start(Behaviour::Count);
    let victim_peer = PeerServer::start(Behaviour::Count);
    let policy = Policy::detect_dead(STEP, STEP, 31).with_jitter(0.0);
    let pools: Vec<Vec<OwnedFd>> = (0..THREADS)
        .map(|_| {
            watched_peer
                .connect(16)
                .into_iter()
                .map(|(s, _)| OwnedFd::from(s))
                .collect()
        })
        .collect();
    let victims: Vec<OwnedFd> = victim_peer
        .connect(4)
        .into_iter()
        .map(|(s, _)| OwnedFd::from(s))
        .collect();
    let started = Instant::now();

    let tally = std::thread::scope(|scope| {
        let handles: Vec<_> = pools
            .iter()
            .enumerate()
            .map(|(t, pool)| {
                let (engine, policy, victims) = (&engine, &policy, &victims);
                scope.spawn(move || {
                    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
                    let mut tally = Tally::default();
                    for i in 0..CYCLES / THREADS {
                        if started.elapsed() > TIME_LIMIT {
                            break;
                        }
                        let (pooled, victim) = (&pool[i % pool.len()], &victims[i % victims.len()]);
                        cycle(engine, policy, pooled, victim, &mut rng, &mut tally);
                    }
                    tally
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("cycle thread"))
            .fold(Tally::default(), |a, b| Tally {
                done: a.done + b.done,
                reused: a.reused + b.reused,
                in_window: a.in_window + b.in_window,
            })
    });
    std::thread::sleep(Duration::from_millis(50));
    let stats = engine.stats();
    eprintln!(
        "{source:?}: {} watch/drop cycles in {:?}, fd number reused by a victim in {}, held \
         across the next due probe in {}; {} probes sent, {} bytes at the watched peer, {} at \
         the victims' peer",
        tally.done,
        started.elapsed(),
        tally.reused,
        tally.in_window,
        stats.probes_sent,
        watched_peer.total_bytes(),
        victim_peer.total_bytes()
    );
    assert_eq!(
        tally.done, CYCLES,
        "the cycles did not finish within {TIME_LIMIT:?}"
    );
    assert_eq!(
        victim_peer.total_bytes(),
        0,
        "{source:?}: a probe reached a reused fd after drop"
    );
    assert!(
        stats.probes_sent > 1_000,
        "{source:?}: the engine must really be probing: {stats:?}"
    );
    assert!(
        watched_peer.total_bytes() >= stats.probes_sent as usize * 6,
        "every counted probe arrived"
    );
    // Most cycles must really have tested something: a victim on the dropped fd number at
    // the moment the engine would next have probed it.
    assert!(
        tally.in_window * 10 >= CYCLES * 8,
        "{source:?}: only {} of {CYCLES} cycles held a victim on the reused fd number across \
         the next due probe ({} reused it at all)",
        tally.in_window,
        tally.reused
    );
    assert!(
        wait_until(Duration::from_secs(2), || engine.slots_in_use() == 0),
        "slots leaked: {} still in use",
        engine.slots_in_use()
    );
    assert_source_kept(&engine, source.kind());
}
