//! `real`: lull against the alternatives on real loopback sockets, as many as the machine holds.
//!
//! Four strategies watch the same population of connections, one strategy at a time so that
//! whole-system CPU belongs to one of them: lull with its eBPF source, lull with `TCP_INFO`,
//! the kernel's own `SO_KEEPALIVE`, and a naive tokio engine (a sleep per connection, reset on
//! every read). The fd limit is 20,000 per process, so each strategy's connections are spread
//! over several worker processes (the client ends) and as many peer processes (the far ends),
//! all children of this binary, started as `real worker` and `real peer`.
//!
//! The peers' mix: 5% busy (traffic every idle/4: never to be probed), 1% hung (stop reading
//! and writing at a fixed instant, socket open, kernel still ACKing), 1% vanishing (a firewall
//! rule in the run's private network namespace drops all their packets from a fixed instant,
//! as if their host had gone), the rest answering every probe. Figures: CPU over the window,
//! per probe and per connection-hour; probes sent; who caught the hung and vanished peers and
//! how fast; kernel memory per connection. Benchmarks print figures; they never pass or fail
//! on them.

mod child;
mod env;
mod kernel;
mod lull_engine;
mod measured;
mod naive;
mod notes;
mod peer;
mod proto;
mod report;
mod run;
mod running;
mod softirq;
mod system;
mod worker;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Result;
use clap::{Parser, Subcommand};
use lull_benches::BenchReport;

use crate::proto::{Strategy, Timing};

/// Compares lull (eBPF and TCP_INFO), kernel keepalive and a naive tokio engine over real
/// loopback sockets.
#[derive(Parser, Debug)]
#[command(name = "real", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Mode {
    #[command(hide = true)]
    Peer(peer::PeerArgs),
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Short run (under 90 s): 5,000 connections, idle 3 s, 12 s windows.
    #[arg(long)]
    quick: bool,
    /// Connection counts to measure every strategy at, comma-separated; the detailed tables
    /// are for the largest, the others add points to CPU against connection count
    /// [default: 15000,60000; quick: 5000].
    #[arg(long, value_delimiter = ',')]
    conns: Vec<u64>,
    /// Most connections in one worker (and one peer) process; the fd limit is 20,000.
    #[arg(long, default_value_t = 15_000)]
    per_process: u64,
    /// Strategies, in the order they run [default: all four].
    #[arg(long, value_enum, value_delimiter = ',')]
    strategies: Vec<Strategy>,
    /// No vanishing peers (they need iptables in the run's own network namespace).
    #[arg(long)]
    no_vanishing: bool,
    /// lull's timing-wheel tick [default: lull's own, 1 ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    lull_tick: Option<Duration>,
    /// Leave net.core.netdev_max_backlog alone (see the report's note on it).
    #[arg(long)]
    keep_backlog: bool,
    /// Directory for `real.json` and `real.md`.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Everything a run does, decided up front.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Connections per strategy in this pass.
    pub conns: u64,
    /// Every pass's connection count, ascending; the last is the detailed one.
    pub sizes: Vec<u64>,
    pub per_process: u64,
    pub timing: Timing,
    /// Measurement window per strategy: a whole number of idle periods, so that every
    /// connection probed once per idle period is probed the same number of times in it.
    pub window: Duration,
    /// When the hung peers hang (and the vanishing ones vanish), after the window opens.
    pub hang_after: Duration,
    /// Pause before each memory reading and after each teardown, for deferred kernel work.
    pub settle: Duration,
    /// Length of the reading of the machine's own background CPU.
    pub background: Duration,
    pub strategies: Vec<Strategy>,
    /// lull's tick, if not its default.
    pub lull_tick: Option<Duration>,
    pub quick: bool,
}

impl Plan {
    fn new(args: &RunArgs) -> Self {
        let quick = args.quick;
        let timing = if quick {
            Timing {
                idle_ms: 3_000,
                interval_ms: 1_000,
                count: 3,
            }
        } else {
            Timing {
                idle_ms: 10_000,
                interval_ms: 2_000,
                count: 3,
            }
        };
        let mut sizes: Vec<u64> = if args.conns.is_empty() {
            if quick {
                vec![5_000]
            } else {
                vec![15_000, 60_000]
            }
        } else {
            args.conns.iter().map(|&n| n.max(1)).collect()
        };
        sizes.sort_unstable();
        sizes.dedup();
        Self {
            conns: sizes.iter().copied().max().unwrap_or(1),
            sizes,
            per_process: args.per_process.clamp(100, 19_000),
            timing,
            window: timing.idle() * 4,
            hang_after: if quick {
                Duration::from_millis(1_500)
            } else {
                Duration::from_secs(4)
            },
            settle: Duration::from_millis(if quick { 500 } else { 1_500 }),
            background: Duration::from_millis(if quick { 1_500 } else { 4_000 }),
            strategies: if args.strategies.is_empty() {
                Strategy::ALL.to_vec()
            } else {
                args.strategies.clone()
            },
            lull_tick: args.lull_tick,
            quick,
        }
    }

    /// The same plan at another connection count.
    fn with_conns(&self, conns: u64) -> Self {
        Self {
            conns,
            ..self.clone()
        }
    }

    /// Worker (and peer) processes per strategy.
    pub fn processes(&self) -> usize {
        self.conns.div_ceil(self.per_process) as usize
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.mode {
        Some(Mode::Peer(args)) => peer::run(&args),
        Some(Mode::Worker(args)) => worker::run(&args),
        None => orchestrate(&cli.run),
    }
}

fn orchestrate(args: &RunArgs) -> Result<()> {
    let started = Instant::now();
    let plan = Plan::new(args);
    // In the host's namespace, the only one where this global setting can be reached.
    let backlog = if args.keep_backlog {
        None
    } else {
        // Room for a probe and its answer per connection, should every timer fire at once.
        match system::Backlog::raise(4 * plan.conns) {
            Ok(backlog) => Some(backlog),
            Err(err) => {
                eprintln!("real: leaving netdev_max_backlog alone: {err:#}");
                None
            }
        }
    };
    // While this process still has a single thread: `unshare` moves only the calling one.
    let netns = system::private_netns();
    let report = BenchReport::new("real");
    let env = env::Environment::probe(netns, args.no_vanishing);
    eprintln!(
        "real: {:?} connections per strategy, at most {} per worker or peer process; idle {:?}, \
         interval {:?}, count {} (bound {:?}); {:?} window, hangs at +{:?}; {}",
        plan.sizes,
        plan.per_process,
        plan.timing.idle(),
        plan.timing.interval(),
        plan.timing.count,
        plan.timing.bound(),
        plan.window,
        plan.hang_after,
        env.describe(),
    );
    if let Err(why) = &env.softirq {
        eprintln!("real: softirq time not measured: {why}");
    }
    // Other people's jobs come and go: the background is read before and after each strategy
    // and the mean of the two taken off its figures.
    let mut backgrounds = vec![env::background(&plan, &env)?];
    say_background(backgrounds[0]);
    let mut passes = Vec::new();
    for (pass, &size) in plan.sizes.iter().enumerate() {
        let plan = plan.with_conns(size);
        if plan.sizes.len() > 1 {
            eprintln!(
                "real: pass {}/{}: {size} connections per strategy ({:.0?} so far)",
                pass + 1,
                plan.sizes.len(),
                started.elapsed()
            );
        }
        let mut outcomes = Vec::new();
        for &strategy in &plan.strategies {
            let before = backgrounds[backgrounds.len() - 1];
            let mut outcome = run::strategy(&plan, &env, strategy);
            if let measured::Status::Failed(why) | measured::Status::Unavailable(why) = &outcome.status {
                eprintln!("[{}] not measured: {why}", strategy.label());
            }
            let background = env::background(&plan, &env)?;
            say_background(background);
            backgrounds.push(background);
            if let measured::Status::Ran(m) = &mut outcome.status {
                m.cpu.background = env::Background::mean(before, background);
            }
            outcomes.push(outcome);
        }
        passes.push(report::Pass {
            conns: size,
            outcomes,
        });
    }
    let report = report::build(
        report,
        &plan,
        &env,
        &passes,
        &backgrounds,
        backlog.as_ref().map(|b| (b.before, b.now)),
        started.elapsed(),
    );
    drop(backlog);
    eprintln!("real: done in {:.0?}", started.elapsed());
    report.emit(args.out.as_deref())
}

fn say_background(background: env::Background) {
    eprintln!(
        "real: background (nothing of the run's going): whole system less other processes \
         {:.1} ms/s; softirq {}",
        background.whole_less_others,
        background
            .softirq
            .map_or("not measured".into(), |[idle, _, other]| format!(
                "on idle CPUs {idle:.1} ms/s, in other tasks {other:.1} ms/s"
            ))
    );
}
