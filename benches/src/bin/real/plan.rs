//! What a run does: the orchestrator's options, and the [`Plan`] decided from them up front,
//! which every part of the orchestrator reads.

use std::{path::PathBuf, time::Duration};

use crate::{
    lull_engine,
    proto::{Mix, Strategy, Timing},
};

/// The orchestrator's options.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Short run (about 2 to 3 minutes): 5,000 connections in 2 worker processes, idle 1 s,
    /// interval 1 s, count 2.
    #[arg(long)]
    quick: bool,
    /// Connection counts to measure every strategy at, comma-separated; the detailed tables
    /// are for the largest, the others add points to CPU against connection count
    /// [default: 15000,60000; quick: 5000].
    #[arg(long, value_delimiter = ',')]
    conns: Vec<u64>,
    /// Most connections in one worker (and one peer) process; the fd limit is 20,000
    /// [default: 15000; quick: 2500, so that even a quick run shares lull's attachment
    /// between processes].
    #[arg(long)]
    per_process: Option<u64>,
    /// Strategies, in the order they run [default: all five].
    #[arg(long, value_enum, value_delimiter = ',')]
    strategies: Vec<Strategy>,
    /// Traffic mixes, in the order they run; every strategy runs in each [default: both].
    #[arg(long, value_enum, value_delimiter = ',')]
    mixes: Vec<Mix>,
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
    /// The shortest measurement window: a whole number of idle periods, so that every
    /// connection probed once per idle period is probed the same number of times in it.
    /// A strategy whose bound does not fit in it gets a longer one ([`Plan::window`]).
    pub base_window: Duration,
    /// When the hung peers hang (and the vanishing ones vanish), after the window opens.
    pub hang_after: Duration,
    /// Pause before each memory reading and after each teardown, for deferred kernel work.
    pub settle: Duration,
    /// Length of the reading of the machine's own background CPU.
    pub background: Duration,
    pub strategies: Vec<Strategy>,
    pub mixes: Vec<Mix>,
    /// lull's tick, if not its default.
    pub lull_tick: Option<Duration>,
}

/// How long a strategy may take to report a dead peer, from the peer's last activity (so
/// also from the instant it hung or vanished): `None` for hung peers where the strategy
/// cannot see them (kernel keepalive, whose probes the hung peer's kernel answers).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub hung: Option<Duration>,
    pub vanished: Duration,
}

/// Time allowed past a bound for the verdict to be made and reach the worker: lull's tick and
/// coalescing grid, the event channel, and the kernel's timer wheel, which at 250 Hz rounds a
/// timer seconds away up by as much as 256 ms, at each of keepalive's stages. A verdict within
/// its bound plus this counts as within the bound (the project's own tests allow 1 s).
pub const VERDICT_SLACK: Duration = Duration::from_millis(500);

impl Plan {
    pub fn new(args: &RunArgs) -> Self {
        let quick = args.quick;
        // Quick: the shortest timings kernel keepalive takes (whole seconds), so that
        // lull-tiered's hung_after, 4 dead bounds, is 12 s and its window 15 s.
        let timing = if quick {
            Timing {
                idle_ms: 1_000,
                interval_ms: 1_000,
                count: 2,
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
        let per_process = args
            .per_process
            .unwrap_or(if quick { 2_500 } else { 15_000 });
        Self {
            conns: sizes.iter().copied().max().unwrap_or(1),
            sizes,
            per_process: per_process.clamp(100, 19_000),
            timing,
            base_window: timing.idle() * 4,
            hang_after: if quick {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(4)
            },
            settle: Duration::from_millis(if quick { 300 } else { 1_500 }),
            background: Duration::from_millis(if quick { 1_000 } else { 4_000 }),
            strategies: if args.strategies.is_empty() {
                Strategy::ALL.to_vec()
            } else {
                args.strategies.clone()
            },
            mixes: if args.mixes.is_empty() {
                Mix::ALL.to_vec()
            } else {
                let mut mixes = args.mixes.clone();
                mixes.dedup();
                mixes
            },
            lull_tick: args.lull_tick,
        }
    }

    /// `strategy`'s detection bounds under this plan's timing (lull's from its own policy).
    pub fn bounds(&self, strategy: Strategy) -> Bounds {
        let t = self.timing;
        match strategy {
            Strategy::LullEbpf | Strategy::LullTcpinfo => {
                let bound = lull_engine::policy(strategy, t).detection_bound();
                Bounds {
                    hung: Some(bound),
                    vanished: bound,
                }
            }
            // Hung peers by the application tier, within hung_after plus one interval;
            // vanished ones by the transport tier, within the dead bound.
            Strategy::LullTiered => {
                let policy = lull_engine::policy(strategy, t);
                Bounds {
                    hung: Some(policy.hung_bound() + t.interval()),
                    vanished: policy.detection_bound(),
                }
            }
            Strategy::Kernel => Bounds {
                hung: None,
                vanished: t.bound(),
            },
            Strategy::Tokio => Bounds {
                hung: Some(t.bound()),
                vanished: t.bound(),
            },
        }
    }

    /// `strategy`'s measurement window: the base window, or, if a bound does not fit in it
    /// after the hang, the whole number of idle periods that holds it. lull-tiered, whose
    /// hung peers may take `hung_after`, gets a window of its own; the others share one, the
    /// longest any of them needs, so that their figures cover the same span.
    pub fn window(&self, strategy: Strategy) -> Duration {
        let needed = |s: Strategy| {
            let bounds = self.bounds(s);
            let longest = bounds.hung.unwrap_or_default().max(bounds.vanished);
            let needed = self.hang_after + longest + VERDICT_SLACK;
            let idle = self.timing.idle();
            idle * needed.as_nanos().div_ceil(idle.as_nanos()) as u32
        };
        let longest = match strategy {
            Strategy::LullTiered => needed(strategy),
            _ => Strategy::ALL
                .into_iter()
                .filter(|&s| s != Strategy::LullTiered)
                .map(needed)
                .max()
                .unwrap_or_default(),
        };
        self.base_window.max(longest)
    }

    /// How long each worker takes to open its connections: one nominal probe period of the
    /// strategy (idle, or for lull-tiered its application tier's period), so that when the
    /// window opens every connection's timer has its own phase, as after a long run.
    pub fn spread(&self, strategy: Strategy) -> Duration {
        if strategy.is_lull() {
            lull_engine::policy(strategy, self.timing).nominal_probe_period()
        } else {
            self.timing.idle()
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
