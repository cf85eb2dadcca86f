//! `real worker`: the client end of up to ~15,000 connections (the fd limit is 20,000 per
//! process), all under one strategy.
//!
//! The worker opens its connections, puts them under its strategy, says `READY`, then runs
//! until stdin closes, noting the probe count when told the window starts (`mark`) and
//! reporting what it saw when told it ends (`report`).

use std::{
    collections::HashMap,
    io::{BufRead, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use lull::{ConnId, Engine, Event, Payload, Policy, Probe, SourceChoice, Watched, clock};

use crate::{
    kernel::KernelRun,
    naive::TokioRun,
    proto::{
        CMD_MARK, CMD_REPORT, MARKED, READY, REPORT, Ready, Report, Role, Strategy, Timing,
        UNAVAILABLE, role_of,
    },
    system::{raise_fd_limit, rss_bytes, watchdog},
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

/// A strategy at work over the worker's connections.
pub trait Running {
    /// Puts one more connection under the strategy.
    fn add(&mut self, global: u64, stream: TcpStream) -> Result<()>;
    /// Called once every connection is added, before READY.
    fn settle(&mut self, _conns: u64) -> Result<()> {
        Ok(())
    }
    /// Does the strategy's work (or lets its own threads do it) for about `wait`.
    fn poll(&mut self, wait: Duration) -> Result<()>;
    /// Probes sent so far, if the strategy counts them itself.
    fn probes(&self) -> Option<u64>;
    /// Verdicts and other endings so far.
    fn report(&self) -> Report;
    /// Something about the strategy worth printing (lull's activity source).
    fn detail(&self) -> String {
        String::new()
    }
}

pub fn run(args: &WorkerArgs) -> Result<()> {
    raise_fd_limit();
    watchdog(args.lifetime_secs);
    let commands = stdin_lines();
    let timing = Timing {
        idle_ms: args.idle_ms,
        interval_ms: args.interval_ms,
        count: args.count,
    };
    let rss_before = rss_bytes();
    // eBPF needs privileges this process may lack: find out before opening anything.
    let engine = match args.strategy {
        Strategy::LullEbpf | Strategy::LullTcpinfo => match lull_engine(args) {
            Ok(engine) => Some(engine),
            Err(why) => {
                // The outermost message already names the cause; the chain repeats it.
                say(&format!("{UNAVAILABLE} {why}"));
                return Ok(());
            }
        },
        _ => None,
    };
    let mut running: Box<dyn Running> = match engine {
        Some(engine) => Box::new(LullRun::new(engine, timing, args.conns as usize)),
        None if args.strategy == Strategy::Kernel => {
            Box::new(KernelRun::new(timing, args.conns as usize)?)
        }
        None => Box::new(TokioRun::new(timing)?),
    };
    let (n, failed, roles) = connect_all(args, running.as_mut())?;
    running.settle(n)?;
    let ready = Ready {
        conns: n,
        failed,
        roles,
        rss_before,
        rss_after: rss_bytes(),
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
    // Leave at once: the kernel closes every socket (with a RST, see `connect`) faster than
    // dropping 15,000 handles one by one, and no strategy has anything left to say.
    std::process::exit(0);
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
    // Bounded: each turn opens every connection due, then waits at most 10 ms; connecting
    // itself gives up after MAX_FAILURES failures of at most 3 s each.
    while next < args.conns && failed < MAX_FAILURES {
        let due = ((start.elapsed().as_secs_f64() / spread.as_secs_f64().max(1e-3))
            * args.conns as f64)
            .ceil()
            .min(args.conns as f64) as u64;
        let until = due.max(next + 1);
        while next < until && next < args.conns && failed < MAX_FAILURES {
            let global = args.first + next;
            next += 1;
            let role = role_of(global, args.vanishing);
            let target = args.targets[role.index()];
            match connect(target) {
                Ok(stream) => {
                    running.add(global, stream)?;
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
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid option pointer of the declared size, on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setsockopt(SO_LINGER)");
    }
    Ok(stream)
}

fn lull_engine(args: &WorkerArgs) -> Result<Engine> {
    let source = match args.strategy {
        Strategy::LullEbpf => SourceChoice::Ebpf,
        _ => SourceChoice::TcpInfo,
    };
    let mut builder = Engine::builder();
    if let Some(us) = args.lull_tick_us {
        builder = builder.tick(Duration::from_micros(us));
    }
    Ok(builder
        .capacity(u32::try_from(args.conns)?.max(1))
        .source(source)
        .name("real-lull")
        .build()?)
}

/// lull: one engine, every connection watched, verdicts from its event channel.
struct LullRun {
    engine: Engine,
    policy: Policy,
    /// Held so the watches (and the sockets) live as long as the worker.
    watched: Vec<Watched<TcpStream>>,
    ids: HashMap<ConnId, u64>,
    report: Report,
}

impl LullRun {
    fn new(engine: Engine, timing: Timing, conns: usize) -> Self {
        let policy = Policy::detect_dead(timing.idle(), timing.interval(), timing.count)
            .with_probe(Probe::Bytes(Payload::redis_ping()))
            // Nobody else reads these sockets, so lull must, or the busy peers' bytes and the
            // answers to its probes would pile up in the receive buffers.
            .with_drain(true);
        Self {
            engine,
            policy,
            watched: Vec::with_capacity(conns),
            ids: HashMap::with_capacity(conns),
            report: Report::default(),
        }
    }

    fn take(&mut self, event: Event) {
        let now = clock::monotonic_ns();
        match event {
            Event::Dead { id, .. } => {
                if let Some(&global) = self.ids.get(&id) {
                    self.report.dead.push((global, now));
                }
            }
            Event::Closed { .. } => self.report.closed += 1,
            Event::Revived { .. } => self.report.revived += 1,
            Event::ProbeDue { .. } => {}
        }
    }
}

impl Running for LullRun {
    fn add(&mut self, global: u64, stream: TcpStream) -> Result<()> {
        let watched = self
            .engine
            .watch(stream, &self.policy)
            .context("watching a connection")?;
        self.ids.insert(watched.id(), global);
        self.watched.push(watched);
        Ok(())
    }

    fn settle(&mut self, conns: u64) -> Result<()> {
        // The engine takes each watch from a queue; READY means every connection is on its
        // wheel.
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.engine.stats().watched < conns && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn poll(&mut self, wait: Duration) -> Result<()> {
        if let Ok(event) = self.engine.events().recv_timeout(wait) {
            self.take(event);
            // Bounded: the channel holds at most its capacity.
            let more: Vec<Event> = self.engine.events().try_iter().take(1 << 16).collect();
            for event in more {
                self.take(event);
            }
        }
        Ok(())
    }

    fn probes(&self) -> Option<u64> {
        Some(self.engine.stats().probes_sent)
    }

    fn report(&self) -> Report {
        let dropped = self.engine.stats().events_dropped;
        if dropped > 0 {
            eprintln!("real worker: lull dropped {dropped} events (its channel was full)");
        }
        self.report.clone()
    }

    fn detail(&self) -> String {
        format!("source {}", self.engine.source_kind())
    }
}
