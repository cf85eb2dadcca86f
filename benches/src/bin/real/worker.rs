//! `real worker`: the client end of up to ~15,000 connections (the fd limit is 20,000 per
//! process), all under one strategy.
//!
//! The worker opens its connections, puts them under its strategy, says `READY`, then runs
//! until stdin closes, noting the probe count when told the window starts (`mark`) and
//! reporting what it saw when told it ends (`report`).

use std::{
    io::{BufRead, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use lull_harness::{
    process::{raise_fd_limit, rss_bytes},
    socket::set_linger_zero,
};

use crate::{
    kernel::KernelRun,
    lull_engine::LullRun,
    naive::TokioRun,
    proto::{
        CMD_MARK, CMD_REPORT, MARKED, Mix, READY, REPORT, Ready, Role, Strategy, Timing,
        UNAVAILABLE, role_of,
    },
    running::Running,
    system::watchdog,
};

/// (internal) The client end of one share of a strategy's connections.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[arg(long, value_enum)]
    strategy: Strategy,
    /// Global number of this worker's first connection.
    #[arg(long)]
    first: u64,
    /// Connections to open.
    #[arg(long)]
    conns: u64,
    /// The peer's answering, busy, hung and vanishing listeners.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<SocketAddr>,
    /// Whether connections `1 mod 100` go to the vanishing listener.
    #[arg(long)]
    vanishing: bool,
    /// The traffic mix, which says which connections go to the busy listener.
    #[arg(long, value_enum)]
    mix: Mix,
    #[arg(long)]
    idle_ms: u64,
    #[arg(long)]
    interval_ms: u64,
    #[arg(long)]
    count: u32,
    /// lull's timing-wheel tick, in µs (lull's default if absent).
    #[arg(long)]
    lull_tick_us: Option<u64>,
    /// Open the connections at an even pace over this long, in ms.
    #[arg(long)]
    spread_ms: u64,
    /// Exit after this many seconds whatever happens.
    #[arg(long)]
    lifetime_secs: u64,
}

/// How often the worker's loop looks at its commands. Verdict times are taken where the
/// verdict is seen, not here, so this only delays `mark` and `report` a little.
const POLL: Duration = Duration::from_millis(50);
/// Failed connects after which a worker stops trying and reports the count it reached.
const MAX_FAILURES: u64 = 50;

pub fn run(args: &WorkerArgs) -> Result<()> {
    raise_fd_limit().context("raising the worker's fd limit")?;
    watchdog(args.lifetime_secs);
    let commands = stdin_lines();
    let timing = Timing {
        idle_ms: args.idle_ms,
        interval_ms: args.interval_ms,
        count: args.count,
    };
    let rss_before = rss_bytes().context("reading the worker's RSS")?;
    let shared_before = shared_rss();
    let mut running: Box<dyn Running> = match args.strategy {
        // eBPF needs privileges this process may lack: find out before opening anything.
        Strategy::LullEbpf | Strategy::LullTcpinfo | Strategy::LullTiered => {
            let tick = args.lull_tick_us.map(Duration::from_micros);
            match LullRun::start(args.strategy, timing, args.conns, tick) {
                Ok(lull) => Box::new(lull),
                Err(why) => {
                    // The outermost message already names the cause; the chain repeats it.
                    say(&format!("{UNAVAILABLE} {why}"));
                    return Ok(());
                }
            }
        }
        Strategy::Kernel => Box::new(KernelRun::new(timing, args.conns as usize)?),
        Strategy::Tokio => Box::new(TokioRun::new(timing)?),
    };
    // What the strategy costs before its first connection is a cost per process, not per
    // connection: read it apart.
    let rss_started = rss_bytes().context("reading the worker's RSS")?;
    let shared_started = shared_rss();
    let (n, failed, roles) = connect_all(args, running.as_mut())?;
    running.settle(n)?;
    let ready = Ready {
        conns: n,
        failed,
        roles,
        rss_before,
        rss_started,
        rss_after: rss_bytes().context("reading the worker's RSS")?,
        shared_before,
        shared_started,
        detail: running.detail(),
    };
    say(&format!("{READY} {}", serde_json::to_string(&ready)?));

    let mut marked = 0u64;
    let deadline = Instant::now() + Duration::from_secs(args.lifetime_secs);
    'outer: while Instant::now() < deadline {
        running.poll(POLL)?;
        // At most a handful of commands arrive in a whole run.
        for _ in 0..16 {
            match commands.try_recv() {
                Ok(cmd) if cmd == CMD_MARK => {
                    marked = running.probes().unwrap_or(0);
                    running.mark();
                    say(MARKED);
                }
                Ok(cmd) if cmd == CMD_REPORT => {
                    let mut report = running.report();
                    report.probes = running.probes().map(|p| p.saturating_sub(marked));
                    say(&format!("{REPORT} {}", serde_json::to_string(&report)?));
                }
                Ok(_) => {}
                Err(flume::TryRecvError::Empty) => break,
                Err(flume::TryRecvError::Disconnected) => break 'outer,
            }
        }
    }
    // Let go of what others share (lull's attachment), then leave at once: the kernel closes
    // every other socket (with a RST, see `connect`), and no strategy has anything left to say.
    running.finish();
    std::process::exit(0);
}

/// This process's shared resident memory, `RssFile` + `RssShmem` from /proc/self/status, in
/// bytes (0 if unreadable).
fn shared_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("RssFile:") || l.starts_with("RssShmem:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// Stdin, a line at a time, until EOF (the orchestrator closing it, or dying).
fn stdin_lines() -> flume::Receiver<String> {
    let (tx, rx) = flume::unbounded();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
    });
    rx
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Opens the worker's connections at an even pace over `--spread-ms`, each handed to the
/// strategy as soon as it is open, the strategy running in between.
///
/// Connections opened all at once would start every timer together, and strategies with
/// fixed timers (the kernel's, tokio's) would stay in step for ever, probing in bursts that
/// amortise wakeups in a way no server, whose connections arrive over time, ever sees. Spread
/// over one idle period, each connection's phase is its own, as after a long run.
fn connect_all(args: &WorkerArgs, running: &mut dyn Running) -> Result<(u64, u64, [u64; 4])> {
    if args.targets.len() != Role::ALL.len() {
        bail!("--targets needs {} addresses", Role::ALL.len());
    }
    let (mut opened, mut failed, mut roles) = (0u64, 0u64, [0u64; 4]);
    let spread = Duration::from_millis(args.spread_ms);
    let start = Instant::now();
    let mut next = 0u64;
    // Bounded: each turn opens every connection due, then waits at most 10 ms, and every
    // connection is due once `--spread-ms` has passed; connecting itself gives up after
    // MAX_FAILURES failures of at most 3 s each. A turn opens none that is not due yet, or
    // a slow pace (a long spread, few connections) would run ahead at one per turn.
    while next < args.conns && failed < MAX_FAILURES {
        let due = ((start.elapsed().as_secs_f64() / spread.as_secs_f64().max(1e-3))
            * args.conns as f64)
            .ceil()
            .min(args.conns as f64) as u64;
        while next < due && failed < MAX_FAILURES {
            let global = args.first + next;
            next += 1;
            let role = role_of(global, args.vanishing, args.mix);
            let target = args.targets[role.index()];
            match connect(target) {
                Ok(stream) => {
                    running.add(global, role, stream)?;
                    opened += 1;
                    roles[role.index()] += 1;
                }
                Err(err) => {
                    failed += 1;
                    if failed == 1 || failed == MAX_FAILURES {
                        eprintln!(
                            "real worker: connecting to {target} after {opened} connections: \
                             {err:#}"
                        );
                    }
                }
            }
        }
        if next < args.conns {
            running.poll(Duration::from_millis(10))?;
        }
    }
    Ok((opened, failed, roles))
}

fn connect(target: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
    stream.set_nodelay(true)?;
    // Closing with a RST instead of a FIN leaves no TIME_WAIT behind, so a strategy's
    // teardown neither holds ephemeral ports nor frees slab memory during the next one's
    // measurements. It changes nothing before the close.
    set_linger_zero(&stream).context("setsockopt(SO_LINGER)")?;
    Ok(stream)
}
