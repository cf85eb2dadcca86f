//! `real`: lull against the alternatives on real loopback sockets, as many as the machine holds.
//!
//! Five strategies watch the same population of connections, one strategy at a time so that
//! whole-system CPU belongs to one of them: lull with its eBPF source, lull with `TCP_INFO`,
//! lull tiered (eBPF source, the transport left to kernel keepalive, lull's own probes only
//! for hung applications), the kernel's own `SO_KEEPALIVE`, and a naive tokio engine (a sleep
//! per connection, reset on every read). The fd limit is 20,000 per process, so each
//! strategy's connections are spread over several worker processes (the client ends) and as
//! many peer processes (the far ends), all children of this binary, started as `real worker`
//! and `real peer`. Workers run in a cgroup made for the run, so that lull's eBPF workers
//! share one attachment of its programs; peers run outside it, so their sockets run none.
//!
//! Two traffic mixes, each run with every strategy: `standard`, 5% busy (a byte every
//! idle/4: never to be probed), and `busy_heavy`, 20% busy (10 one-byte messages a second).
//! In both, 1% hung (stop reading and writing at a fixed instant, socket open, kernel still
//! ACKing), 1% vanishing (a firewall rule in the run's private network namespace drops all
//! their packets from a fixed instant, as if their host had gone), the rest answering every
//! probe. Figures: CPU over the window, per probe and per connection-hour; probes sent; who
//! caught the hung and vanished peers, how fast, and by which of lull's tiers; kernel memory
//! per connection. `real.json` has the headline figures as plain numbers under `figures`.
//! Benchmarks print figures; they never pass or fail on them.

mod attachment;
mod cgroup;
mod child;
mod env;
mod figures;
mod findings;
mod kernel;
mod lull_engine;
mod measured;
mod naive;
mod notes;
mod peer;
mod plan;
mod proto;
mod report;
mod run;
mod running;
mod softirq;
mod system;
mod window;
mod worker;

use std::time::Instant;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lull_benches::BenchReport;

use crate::{
    measured::Status,
    plan::{Plan, RunArgs},
};

/// Compares lull (eBPF, TCP_INFO and tiered), kernel keepalive and a naive tokio engine over
/// real loopback sockets.
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
    let windows: Vec<String> = plan
        .strategies
        .iter()
        .map(|&s| format!("{} {:?}", s.label(), plan.window(s)))
        .collect();
    eprintln!(
        "real: {:?} connections per strategy and mix ({}), at most {} per worker or peer \
         process; idle {:?}, interval {:?}, count {} (bound {:?}, lull-tiered's hung_after \
         {:?}); windows {}, hangs at +{:?}; {}",
        plan.sizes,
        plan.mixes
            .iter()
            .map(|m| m.label())
            .collect::<Vec<_>>()
            .join(", "),
        plan.per_process,
        plan.timing.idle(),
        plan.timing.interval(),
        plan.timing.count,
        plan.timing.bound(),
        plan.timing.hung_after(),
        windows.join(", "),
        plan.hang_after,
        env.describe(),
    );
    if let Err(why) = &env.cgroup {
        eprintln!("real: no cgroup for the workers: {why}");
    }
    if let Err(why) = &env.softirq {
        eprintln!("real: softirq time not measured: {why}");
    }
    // Other people's jobs come and go: the background is read before and after each strategy
    // and the mean of the two taken off its figures.
    let mut backgrounds = vec![env::background(&plan, &env)?];
    say_background(backgrounds[0]);
    let mut passes = Vec::new();
    let total = plan.sizes.len() * plan.mixes.len();
    for &size in &plan.sizes {
        let plan = plan.with_conns(size);
        for &mix in &plan.mixes {
            eprintln!(
                "real: pass {}/{total}: {} mix, {size} connections per strategy ({:.0?} so far)",
                passes.len() + 1,
                mix.label(),
                started.elapsed()
            );
            let mut outcomes = Vec::new();
            for &strategy in &plan.strategies {
                let before = backgrounds[backgrounds.len() - 1];
                let mut outcome = run::strategy(&plan, &env, strategy, mix);
                if let Status::Failed(why) | Status::Unavailable(why) = &outcome.status {
                    eprintln!("[{} {}] not measured: {why}", mix.label(), strategy.label());
                }
                let background = env::background(&plan, &env)?;
                say_background(background);
                backgrounds.push(background);
                if let Status::Ran(m) = &mut outcome.status {
                    m.cpu.background = env::Background::mean(before, background);
                }
                outcomes.push(outcome);
            }
            passes.push(measured::Pass {
                conns: size,
                mix,
                outcomes,
            });
        }
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
