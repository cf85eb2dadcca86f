//! `wheel`: lull's timing wheel against tokio-util's `DelayQueue` and a `BinaryHeap`.
//!
//! All three run the same workload, drawn once per size from one seeded generator: N timers
//! with keepalive-like deadlines, then four timed phases (insert N, cancel 10%, re-arm another
//! 10%, expire the rest one tick at a time). The machine is noisy, so within a repetition the
//! structures run back to back in an order that rotates between repetitions, and every ratio
//! is taken within one repetition before the median over repetitions is reported. Memory is
//! measured through a counting global allocator. The report's notes give the details.
//! Benchmarks never fail on timing: goals are reported as met or not.

mod report;

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    future::poll_fn,
    hint::black_box,
    path::PathBuf,
    task::Poll,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use lull::wheel::{ENTRY_BYTES, TimerKey, TimingWheel};
use lull_benches::{BenchReport, Table, median};
use lull_harness::alloc::CountingAllocator;
use tokio::runtime::Runtime;
use tokio_util::time::DelayQueue;

/// Compares lull's timing wheel with tokio-util's DelayQueue and std's BinaryHeap.
#[derive(Parser, Debug)]
#[command(name = "wheel")]
struct Args {
    /// Short run: 10k, 100k and 1M timers, fewer repetitions.
    #[arg(long)]
    quick: bool,
    /// Repetitions per size [default: 15 at 10k, 9 at 100k, 5 at 1M, 3 above; quick: 7, 5, 3].
    #[arg(long)]
    reps: Option<usize>,
    /// Live timer counts, comma-separated [default: 10000,100000,1000000,10000000].
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Directory for `wheel.json` and `wheel.md`.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Counts live heap bytes: the one way to compare structures that allocate differently (one
/// `Vec`, a slab plus boxed sleeps, a heap plus a side table) on equal terms.
#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

/// Deadlines are uniform over 1..=HORIZON ticks: 30 s of 1 ms ticks, a keepalive interval.
const HORIZON: u64 = 30_000;
const SEED: u64 = 0x6c75_6c6c_7768_6565;

/// splitmix64: tiny, seedable, and the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    fn deadline(&mut self) -> u32 {
        1 + self.below(HORIZON) as u32
    }
}

/// One size's operations, shared by all three structures.
struct Workload {
    /// Timer i's deadline in ticks.
    deadlines: Vec<u32>,
    /// Timers to cancel, distinct.
    cancel: Vec<u32>,
    /// Timers to re-arm and their new deadlines; distinct, and disjoint from `cancel`.
    rearm: Vec<(u32, u32)>,
}

impl Workload {
    fn new(n: usize) -> Self {
        let mut rng = Rng(SEED ^ n as u64);
        let deadlines = (0..n).map(|_| rng.deadline()).collect();
        let k = n / 10;
        // The first 2k places of a random permutation (partial Fisher-Yates).
        let mut perm: Vec<u32> = (0..n as u32).collect();
        for i in 0..2 * k {
            let j = i + rng.below((n - i) as u64) as usize;
            perm.swap(i, j);
        }
        let cancel = perm[..k].to_vec();
        let rearm = perm[k..2 * k]
            .iter()
            .map(|&i| (i, rng.deadline()))
            .collect();
        Self {
            deadlines,
            cancel,
            rearm,
        }
    }

    /// The same timers and operations, but with the deadlines ascending in slab order, so
    /// that walking a slot's list walks memory forward: a diagnostic for how much of the cost
    /// is memory access rather than the wheel's work, which is the same either way.
    fn in_slab_order(&self) -> Self {
        let mut deadlines = self.deadlines.clone();
        deadlines.sort_unstable();
        Self {
            deadlines,
            cancel: self.cancel.clone(),
            rearm: self.rearm.clone(),
        }
    }

    fn len(&self) -> usize {
        self.deadlines.len()
    }

    fn expected_fired(&self) -> usize {
        self.len() - self.cancel.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Lull,
    DelayQueue,
    Heap,
    /// lull on [`Workload::in_slab_order`]: a diagnostic, not a contender.
    LullInOrder,
}

const KINDS: [Kind; 4] = [Kind::Lull, Kind::DelayQueue, Kind::Heap, Kind::LullInOrder];

impl Kind {
    fn label(self) -> &'static str {
        ["lull", "DelayQueue", "BinaryHeap", "lull, in slab order"][self as usize]
    }
}

/// One structure's run through the four phases: wall time per phase, in ns.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    insert: f64,
    cancel: f64,
    rearm: f64,
    expire: f64,
    /// Heap growth after the insert phase, plus the structure's inline size.
    bytes: usize,
}

/// Per-op figures of one run, indexed by the constants below: ns per insert, cancel, re-arm,
/// expire (per timer fired), their insert+expire sum, and bytes per live timer.
type PerOp = [f64; 6];
const EXPIRE: usize = 3;
const INSERT_EXPIRE: usize = 4;
const BYTES: usize = 5;

fn per_op(s: &Sample, w: &Workload) -> PerOp {
    let n = w.len() as f64;
    let insert = s.insert / n;
    let expire = s.expire / w.expected_fired() as f64;
    let cancel = s.cancel / w.cancel.len() as f64;
    let rearm = s.rearm / w.rearm.len() as f64;
    [
        insert,
        cancel,
        rearm,
        expire,
        insert + expire,
        s.bytes as f64 / n,
    ]
}

fn elapsed_ns(t: Instant) -> f64 {
    t.elapsed().as_nanos() as f64
}

/// The structure is expected to be empty, every timer but the cancelled ones having fired.
fn check_fired(fired: usize, w: &Workload, empty: bool) -> Result<()> {
    let expected = w.expected_fired();
    ensure!(
        fired == expected,
        "{fired} timers fired, expected {expected}"
    );
    ensure!(empty, "timers left over after the last tick");
    Ok(())
}

fn run_lull(w: &Workload) -> Result<Sample> {
    let mut s = Sample::default();
    let mut keys: Vec<TimerKey> = Vec::with_capacity(w.len());
    let base = ALLOC.live_bytes();

    let t = Instant::now();
    let mut wheel = TimingWheel::new();
    for (i, &d) in w.deadlines.iter().enumerate() {
        keys.push(wheel.insert(u64::from(d), i as u32));
    }
    s.insert = elapsed_ns(t);
    s.bytes = ALLOC.live_bytes() - base + size_of::<TimingWheel>();

    let t = Instant::now();
    let mut missing = 0usize;
    for &i in &w.cancel {
        missing += usize::from(wheel.remove(keys[i as usize]).is_none());
    }
    s.cancel = elapsed_ns(t);

    let t = Instant::now();
    for &(i, d) in &w.rearm {
        missing += usize::from(!wheel.reset(keys[i as usize], u64::from(d)));
    }
    s.rearm = elapsed_ns(t);
    ensure!(missing == 0, "{missing} cancels or re-arms found no timer");

    // A fired entry stays allocated until removed; the other two structures free it on expiry,
    // and so does the engine when a connection closes, so each one is removed here too.
    let t = Instant::now();
    let (mut fired, mut sum) = (0usize, 0u64);
    for now in 1..=HORIZON {
        while let Some(e) = wheel.poll(now) {
            wheel.remove(e.key);
            fired += 1;
            sum += u64::from(e.token);
        }
    }
    s.expire = elapsed_ns(t);
    black_box(sum);
    check_fired(fired, w, wheel.is_empty())?;
    Ok(s)
}

/// A binary min-heap cannot move or delete an entry in place, so it gets the usual lazy
/// treatment: each timer has a generation in a side table, cancel and re-arm bump it (re-arm
/// also pushes a new entry), and expiry skips popped entries whose generation is stale.
fn run_heap(w: &Workload) -> Result<Sample> {
    let mut s = Sample::default();
    let base = ALLOC.live_bytes();

    // Deadlines are u64 ticks, as in the other two, though this workload's would fit a u32.
    let t = Instant::now();
    let mut heap: BinaryHeap<Reverse<(u64, u32, u32)>> = BinaryHeap::new();
    let mut generation: Vec<u32> = Vec::new();
    for (i, &d) in w.deadlines.iter().enumerate() {
        generation.push(0);
        heap.push(Reverse((u64::from(d), i as u32, 0)));
    }
    s.insert = elapsed_ns(t);
    s.bytes = ALLOC.live_bytes() - base + size_of_val(&heap) + size_of_val(&generation);

    let t = Instant::now();
    for &i in &w.cancel {
        generation[i as usize] += 1;
    }
    s.cancel = elapsed_ns(t);

    let t = Instant::now();
    for &(i, d) in &w.rearm {
        let g = &mut generation[i as usize];
        *g += 1;
        heap.push(Reverse((u64::from(d), i, *g)));
    }
    s.rearm = elapsed_ns(t);

    let t = Instant::now();
    let (mut fired, mut sum) = (0usize, 0u64);
    for now in 1..=HORIZON {
        while let Some(&Reverse((d, i, g))) = heap.peek() {
            if d > now {
                break;
            }
            heap.pop();
            if generation[i as usize] == g {
                fired += 1;
                sum += u64::from(i);
            }
        }
    }
    s.expire = elapsed_ns(t);
    black_box(sum);
    check_fired(fired, w, heap.is_empty())?;
    Ok(s)
}

/// DelayQueue on a current-thread runtime whose clock is paused: time moves only through
/// `tokio::time::advance`, so no phase ever sleeps, and the measured time is the queue's work
/// plus the runtime turn each tick needs to fire the queue's `Sleep`.
fn run_delay_queue(rt: &Runtime, w: &Workload) -> Result<Sample> {
    rt.block_on(async {
        let mut s = Sample::default();
        let mut keys = Vec::with_capacity(w.len());
        let base = ALLOC.live_bytes();

        let t = Instant::now();
        let start = tokio::time::Instant::now();
        let at = |d: u32| start + Duration::from_millis(u64::from(d));
        let mut dq: DelayQueue<u32> = DelayQueue::new();
        for (i, &d) in w.deadlines.iter().enumerate() {
            keys.push(dq.insert_at(i as u32, at(d)));
        }
        s.insert = elapsed_ns(t);
        s.bytes = ALLOC.live_bytes() - base + size_of::<DelayQueue<u32>>();

        let t = Instant::now();
        let mut missing = 0usize;
        for &i in &w.cancel {
            missing += usize::from(dq.try_remove(&keys[i as usize]).is_none());
        }
        s.cancel = elapsed_ns(t);
        ensure!(missing == 0, "{missing} cancels found no timer");

        let t = Instant::now();
        for &(i, d) in &w.rearm {
            dq.reset_at(&keys[i as usize], at(d));
        }
        s.rearm = elapsed_ns(t);

        // Unconstrained: under tokio's cooperative budget the queue's `Sleep` turns Pending
        // after 128 polls in one task turn, so a drain that stops at Pending would fall behind
        // whenever more than 128 timers are due in a tick (it does at 10M). A real task would
        // yield and be polled again; the budget is the runtime's, not the queue's.
        let t = Instant::now();
        let (fired, sum) = tokio::task::unconstrained(async {
            let (mut fired, mut sum) = (0usize, 0u64);
            for _ in 1..=HORIZON {
                tokio::time::advance(Duration::from_millis(1)).await;
                while let Poll::Ready(Some(e)) =
                    poll_fn(|cx| Poll::Ready(dq.poll_expired(cx))).await
                {
                    fired += 1;
                    sum += u64::from(e.into_inner());
                }
            }
            (fired, sum)
        })
        .await;
        s.expire = elapsed_ns(t);
        black_box(sum);
        let moved = tokio::time::Instant::now() - start;
        ensure!(
            moved == Duration::from_millis(HORIZON),
            "the paused clock moved {moved:?}, not {HORIZON} ms"
        );
        check_fired(fired, w, dq.is_empty())?;
        Ok(s)
    })
}

/// What the expire loop pays the runtime alone: `advance(1 ms)` for every tick, no queue.
fn runtime_tick_ns(rt: &Runtime) -> f64 {
    rt.block_on(async {
        let t = Instant::now();
        for _ in 1..=HORIZON {
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        elapsed_ns(t) / HORIZON as f64
    })
}

fn run(kind: Kind, rt: &Runtime, w: &Workload) -> Result<Sample> {
    match kind {
        Kind::Lull | Kind::LullInOrder => run_lull(w),
        Kind::DelayQueue => run_delay_queue(rt, w),
        Kind::Heap => run_heap(w),
    }
    .with_context(|| format!("{} at N={}", kind.label(), w.len()))
}

/// Everything measured at one size: per-op figures per structure per repetition.
struct SizeResult {
    n: usize,
    reps: usize,
    /// `per_op[kind][rep]`
    per_op: [Vec<PerOp>; 4],
    /// Runtime cost of one `advance(1 ms)` per repetition.
    tick_ns: Vec<f64>,
}

impl SizeResult {
    fn values(&self, kind: Kind, metric: usize) -> impl Iterator<Item = f64> {
        self.per_op[kind as usize].iter().map(move |p| p[metric])
    }

    fn median(&self, kind: Kind, metric: usize) -> f64 {
        median(&self.values(kind, metric).collect::<Vec<_>>())
    }

    fn range(&self, kind: Kind, metric: usize) -> (f64, f64) {
        let lo = self.values(kind, metric).fold(f64::INFINITY, f64::min);
        (lo, self.values(kind, metric).fold(lo, f64::max))
    }

    /// Median over repetitions of `a / b`, each taken within its own repetition.
    fn ratio(&self, a: Kind, b: Kind, metric: usize) -> f64 {
        let v: Vec<f64> = self.per_op[a as usize]
            .iter()
            .zip(&self.per_op[b as usize])
            .map(|(a, b)| a[metric] / b[metric])
            .collect();
        median(&v)
    }
}

fn measure_size(n: usize, reps: usize, rt: &Runtime) -> Result<SizeResult> {
    let w = Workload::new(n);
    let sorted = w.in_slab_order();
    // An unrecorded pass so the first repetition does not also pay for first use of the
    // allocator's arenas and the code's cold caches; skipped where it would cost tens of
    // seconds.
    if n <= 1_000_000 {
        eprintln!("wheel: N={n} warm-up");
        for kind in [Kind::Lull, Kind::DelayQueue, Kind::Heap] {
            run(kind, rt, &w)?;
        }
    }
    let mut result = SizeResult {
        n,
        reps,
        per_op: Default::default(),
        tick_ns: Vec::new(),
    };
    for rep in 0..reps {
        for i in 0..KINDS.len() {
            let kind = KINDS[(i + rep) % KINDS.len()];
            let w = [&w, &w, &w, &sorted][kind as usize];
            let p = per_op(&run(kind, rt, w)?, w);
            let figures: Vec<String> = METRICS
                .iter()
                .zip(p)
                .map(|(m, v)| format!("{m} {v:.1}"))
                .collect();
            eprintln!(
                "wheel: N={n} rep {}/{reps} {}: {}",
                rep + 1,
                kind.label(),
                figures.join(", ")
            );
            result.per_op[kind as usize].push(p);
        }
        result.tick_ns.push(runtime_tick_ns(rt));
    }
    Ok(result)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let sizes = args.sizes.clone().unwrap_or_else(|| {
        if args.quick {
            vec![10_000, 100_000, 1_000_000]
        } else {
            vec![10_000, 100_000, 1_000_000, 10_000_000]
        }
    });
    ensure!(!sizes.is_empty(), "--sizes must name at least one size");
    for &n in &sizes {
        ensure!(
            (10..=u32::MAX as usize).contains(&n),
            "--sizes: {n} is out of range (10 to 2^32 - 1 timers)"
        );
    }
    ensure!(args.reps != Some(0), "--reps must be at least 1");
    // Small sizes take milliseconds per run, so they get more repetitions for the same noise.
    let reps_for = |n: usize| {
        let (small, medium, large) = if args.quick { (7, 5, 3) } else { (15, 9, 5) };
        args.reps.unwrap_or(match n {
            0..=10_000 => small,
            10_001..=100_000 => medium,
            100_001..=1_000_000 => large,
            _ => 3,
        })
    };

    let report = BenchReport::new("wheel");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .context("building the tokio runtime")?;
    let started = Instant::now();
    let mut results = Vec::new();
    for &n in &sizes {
        results.push(measure_size(n, reps_for(n), &rt)?);
    }
    let secs = started.elapsed().as_secs_f64();
    build_report(report, &results, secs).emit(args.out.as_deref())
}

use report::*;
