//! A herd: one million simulated connections registered in one burst, all due together
//! (issue: reliability and security, overload).
//!
//! These check time bounds (the engine loop's longest turn) and a million registrations, so
//! they only mean something in an optimized build: in a debug build they are ignored, and
//! `cargo xtask test` runs this file again with `--release`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use lull::{
    Engine, Policy, SourceChoice,
    activity::{SimulatedSource, SourceKind},
    clock::monotonic_ns,
};
use lull_harness::process::rss_bytes;
use lull_tests::{assert_source_kept, serial, wait_until};

const N: u32 = 1_000_000;

/// Registers N connections at once and waits until each has been probed once.
fn herd(max_probes_per_tick: u32) -> lull::EngineStats {
    let sim = Arc::new(SimulatedSource::new(N));
    let engine = Engine::builder()
        .capacity(N)
        .max_probes_per_tick(max_probes_per_tick)
        .source(SourceChoice::Custom(sim))
        .build()
        .unwrap();
    let policy = Policy::detect_dead(Duration::from_secs(2), Duration::from_secs(1), 3);
    let rss_before = rss_bytes().expect("resident memory");
    let now = monotonic_ns();
    let conns: Vec<_> = (0..N)
        .map(|_| engine.watch_virtual(&policy, now).unwrap())
        .collect();
    let registered = Instant::now();
    assert!(
        wait_until(Duration::from_secs(60), || engine.stats().probes_sent
            >= u64::from(N)),
        "every connection is probed: {:?}",
        engine.stats()
    );
    let stats = engine.stats();
    let rss = rss_bytes()
        .expect("resident memory")
        .saturating_sub(rss_before) as f64
        / f64::from(N);
    eprintln!(
        "herd of {N} (bound {max_probes_per_tick}/tick): all probed {:?} after registration; \
         most probes in one tick {}, longest turn {} µs CPU ({} µs wall), RSS {rss:.0} B/conn",
        registered.elapsed(),
        stats.max_probes_per_tick,
        stats.max_loop_cpu_us,
        stats.max_loop_us,
    );
    assert_eq!(stats.dead, 0, "every simulated peer answers");
    // Bounded memory: the engine's 64 B, the simulated table's 24 B and the handles' 32 B,
    // with room for allocator and page rounding, but nothing proportional to the herd's size.
    assert!(rss < 200.0, "{rss:.0} B per connection");
    drop(conns);
    assert_source_kept(&engine, SourceKind::Simulated);
    stats
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "needs an optimized build; cargo xtask test runs it with --release"
)]
fn a_herd_is_spread_by_the_batch_bound_and_never_stalls_the_loop() {
    let _serial = serial();
    let stats = herd(1024);
    assert!(
        stats.max_probes_per_tick <= 1024,
        "the per-tick bound holds: {}",
        stats.max_probes_per_tick
    );
    // The loop's own work per turn, in CPU time so that preemption on a busy machine does not
    // count against it.
    assert!(
        stats.max_loop_cpu_us <= 10_000,
        "a turn took {} µs of CPU",
        stats.max_loop_cpu_us
    );
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "needs an optimized build; cargo xtask test runs it with --release"
)]
fn jitter_alone_spreads_a_herd_over_many_ticks() {
    let _serial = serial();
    // With no useful batch bound, only the jitter (10% of 2 s: 200 ms) spreads the herd.
    let stats = herd(32_768);
    assert!(
        stats.max_probes_per_tick < u64::from(N) / 50,
        "jitter must spread the herd over more than 50 ticks: {} in one tick",
        stats.max_probes_per_tick
    );
}
