//! `probe-path`: the userspace cost of sending one probe, by submission strategy.
//!
//! The engine sends a tick's probes as one io_uring submission: one `SEND` per connection, all
//! from one static payload, then one `submit_and_wait`. That is measured here against one
//! `send(2)` per probe and against `sendmmsg(2)` with one message per socket, for batches of 1
//! to 1024 probes over 1024 real loopback TCP connections. `ProbeRing` is private to the engine,
//! so `ring::Ring` is a copy of its submission code.
//!
//! This VM has no hardware counters and splits user from system time by sampling a 4 ms tick,
//! while a probe spends about 1% of its time in userspace. So userspace is measured three ways:
//! getrusage (rough: few ticks land in user mode), the clock around io_uring's user-mode phases,
//! and callgrind's exact count of userspace instructions.

mod batch;
mod callgrind;
mod report;
mod ring;
mod run;

use std::{
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Result, ensure};
use clap::Parser;
use lull_benches::{BenchReport, allowed_cpus};

use crate::{
    batch::connect,
    callgrind::{callgrind, callgrind_child},
    report::build_report,
    run::Run,
};

/// Measures the per-probe userspace and CPU cost of io_uring SEND batches against send(2).
#[derive(Parser, Debug)]
#[command(name = "probe-path")]
struct Args {
    /// Short run: 4 batch sizes, 3 repetitions.
    #[arg(long)]
    quick: bool,
    /// Repetitions of every (batch size, strategy) cell [default: 10, quick: 3].
    #[arg(long)]
    reps: Option<usize>,
    /// Sending-thread CPU seconds per cell and repetition [default: 0.25, quick: 0.25].
    #[arg(long)]
    seconds: Option<f64>,
    /// Directory for `probe-path.json` and `probe-path.md`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Internal: the instruction-counting run, under callgrind.
    #[arg(long, hide = true)]
    callgrind_child: bool,
}

const SIZES: [usize; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
const QUICK_SIZES: [usize; 4] = [1, 16, 64, 1024];

fn main() -> Result<()> {
    let args = Args::parse();
    let sizes: &'static [usize] = if args.quick { &QUICK_SIZES } else { &SIZES };
    if args.callgrind_child {
        return callgrind_child(sizes);
    }
    let reps = args.reps.unwrap_or(if args.quick { 3 } else { 10 });
    // Short cells, many times: on a shared, drifting machine they pair better than a few long
    // ones, and getrusage's ticks are pooled over repetitions anyway.
    let seconds = args.seconds.unwrap_or(0.25);
    ensure!(reps >= 1, "--reps must be at least 1");
    let valid = seconds.is_finite() && seconds > 0.0;
    ensure!(valid, "--seconds must be positive");
    let report = BenchReport::new("probe-path");
    let cpus = allowed_cpus()?;
    // CPU 0 usually takes the device interrupts, so the measured thread gets the last CPU.
    let (send_cpu, drain_cpu) = (cpus[cpus.len() - 1], cpus[0]);

    let (pairs, sender) = connect()?;
    let peers: Vec<RawFd> = pairs.iter().map(|(_, p)| p.as_raw_fd()).collect();
    let window = Duration::from_secs_f64(seconds);
    let run = Run::start(sender, &peers, sizes, reps, window, (send_cpu, drain_cpu))?;
    drop(pairs);
    let cg = callgrind(sizes, args.quick);
    build_report(report, &run, &cg).emit(args.out.as_deref())
}
