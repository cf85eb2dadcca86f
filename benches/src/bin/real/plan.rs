//! What a run does: the orchestrator's options, and the [`Plan`] decided from them up front,
//! which every part of the orchestrator reads.

use std::{path::PathBuf, time::Duration};

use crate::proto::{Strategy, Timing};

/// The orchestrator's options.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
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
    pub no_vanishing: bool,
    /// lull's timing-wheel tick [default: lull's own, 1 ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    lull_tick: Option<Duration>,
    /// Leave net.core.netdev_max_backlog alone (see the report's note on it).
    #[arg(long)]
    pub keep_backlog: bool,
    /// Directory for `real.json` and `real.md`.
    #[arg(long)]
    pub out: Option<PathBuf>,
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
}

impl Plan {
    pub fn new(args: &RunArgs) -> Self {
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
        }
    }

    /// The same plan at another connection count.
    pub fn with_conns(&self, conns: u64) -> Self {
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
