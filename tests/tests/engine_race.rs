//! Dropping a `Watched` while the engine probes: after drop returns, no probe may reach the
//! fd, even when its number is reused at once (issue: engine core, race test).

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use lull::{Engine, Policy};
use lull_harness::{Behaviour, PeerServer};
use lull_tests::{Source, both_sources, engine, serial, wait_until};

const CYCLES: usize = 100_000;
const THREADS: usize = 2;
/// Bounds the test whatever happens.
const TIME_LIMIT: Duration = Duration::from_secs(120);

/// A cheap per-thread random number (no shared state, no dependency).
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

both_sources!(no_probe_reaches_a_reused_fd_after_drop);
fn no_probe_reaches_a_reused_fd_after_drop(source: Source) {
    let _serial = serial();
    let name = "no_probe_reaches_a_reused_fd_after_drop";
    // A small capacity, so slots are reused (through the RCU grace period) many times, and a
    // 100 µs tick, so that probes go out while handles are being dropped.
    let builder = Engine::builder()
        .capacity(256)
        .tick(Duration::from_micros(100))
        .max_probes_per_tick(4096);
    let Some(engine) = engine(name, source, builder) else {
        return;
    };
    let watched_peer = PeerServer::start(Behaviour::Count);
    let victim_peer = PeerServer::start(Behaviour::Count);
    // Probe as fast as the engine can: 100 µs idle, then every 100 µs.
    let step = Duration::from_micros(100);
    let policy = Policy::detect_dead(step, step, 31).with_jitter(0.0);
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

    let (reused, done): (usize, usize) = std::thread::scope(|scope| {
        let handles: Vec<_> = pools
            .iter()
            .enumerate()
            .map(|(t, pool)| {
                let (engine, policy, victims) = (&engine, &policy, &victims);
                scope.spawn(move || {
                    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
                    let (mut reused, mut done) = (0, 0);
                    for i in 0..CYCLES / THREADS {
                        if started.elapsed() > TIME_LIMIT {
                            break;
                        }
                        let fd = pool[i % pool.len()].try_clone().expect("dup");
                        let number = fd.as_raw_fd();
                        let w = engine.watch(fd, policy).expect("watch");
                        // Live for 0-300 µs: drops land before, during and after the first
                        // probes; now and then long enough for several.
                        let r = next(&mut rng);
                        let hold = if r.is_multiple_of(100) {
                            1_000
                        } else {
                            r % 300
                        };
                        let spin = Instant::now() + Duration::from_micros(hold);
                        while Instant::now() < spin {
                            std::thread::yield_now();
                        }
                        drop(w);
                        // The lowest free fd number is the one just closed (unless the other
                        // thread took it): this socket's peer must never see a byte.
                        let victim = victims[i % victims.len()].try_clone().expect("dup");
                        if victim.as_fd().as_raw_fd() == number {
                            reused += 1;
                        }
                        std::hint::black_box(&victim);
                        drop(victim);
                        done += 1;
                    }
                    (reused, done)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("cycle thread"))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    std::thread::sleep(Duration::from_millis(50));
    let stats = engine.stats();
    eprintln!(
        "{source:?}: {done} watch/drop cycles in {:?}, fd number reused by a victim in {reused}, \
         {} probes sent, {} bytes at the watched peer, {} at the victims' peer",
        started.elapsed(),
        stats.probes_sent,
        watched_peer.total_bytes(),
        victim_peer.total_bytes()
    );
    assert_eq!(
        done, CYCLES,
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
    assert!(
        reused > CYCLES / 2,
        "fd numbers must really be reused: {reused}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || engine.slots_in_use() == 0),
        "slots leaked: {} still in use",
        engine.slots_in_use()
    );
}
