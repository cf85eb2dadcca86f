//! `host-scale`: `lull host` watching as many real established connections as the machine
//! holds, up to a million, on a ladder of steps.
//!
//! The run lives in a network namespace of its own. Server processes in a watched cgroup
//! hold the accepted ends (one port each, at most `--per-process` sockets each: the fd limit
//! is 20,000); client processes in another cgroup hold the other ends, from eight loopback
//! source addresses. The first step's connections are made before `lull host` starts, so the
//! start picks them up and its kernel memory per connection can be read alone. At each step:
//! - `lull host`'s CPU over an idle window, as % of one core, and its memory (RSS) per
//!   watched connection;
//! - kernel memory (slab) per connection, both ends;
//! - the wall time of `lull ls --json` over all rows (and without the process column);
//! - the verdict latency of sample clients that vanish (firewalled inside the namespace),
//!   against the bound idle + count × interval + 1 s.
//!
//! Benchmarks print figures; they never pass or fail on them.

mod fleet;
mod measure;
mod report;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use lull::host::{CountersReader, HostPaths};

use crate::{
    fleet::{Fleet, SAMPLE_PORT},
    measure::{Blackhole, Usage, events_len, slab_bytes, time_ls, verdicts},
    report::{Pickup, Step},
};

/// `lull host` over a ladder of real connection counts.
#[derive(Parser, Debug)]
#[command(name = "host-scale", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Mode {
    #[command(hide = true)]
    Serve(fleet::ServeArgs),
    #[command(hide = true)]
    Connect(fleet::ConnectArgs),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A short run: the ladder 20,000 and 50,000, 10 s idle windows.
    #[arg(long)]
    quick: bool,
    /// Connection counts to climb, comma-separated [default: 100000,250000,500000,1000000;
    /// quick: 20000,50000].
    #[arg(long, value_delimiter = ',')]
    ladder: Vec<u64>,
    /// Most sockets in one server (or client) process; the fd limit is 20,000.
    #[arg(long, default_value_t = 19_500)]
    per_process: u64,
    /// Seconds of idle over which lull's CPU is measured at each step [default: 30; quick: 10].
    #[arg(long)]
    idle_window: Option<u64>,
    /// Vanishing sample clients per step.
    #[arg(long, default_value_t = 20)]
    sample: u64,
    /// Most seconds to build one step's connections.
    #[arg(long, default_value_t = 900)]
    step_timeout: u64,
    /// The `lull` binary [default: `lull` beside this binary].
    #[arg(long)]
    lull: Option<PathBuf>,
    /// Write host-scale.json and host-scale.md here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The sample rule: a vanished client is dead within 5 + 3 × 1 + 1 = 9 s.
const SAMPLE_IDLE: u64 = 5;
const SAMPLE_INTERVAL: u64 = 1;
const SAMPLE_COUNT: u64 = 3;

fn main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.mode {
        Some(Mode::Serve(args)) => return fleet::serve(args),
        Some(Mode::Connect(args)) => return fleet::connect(args),
        None => {}
    }
    let mut args = cli.run;
    if args.ladder.is_empty() {
        args.ladder = if args.quick {
            vec![20_000, 50_000]
        } else {
            vec![100_000, 250_000, 500_000, 1_000_000]
        };
    }
    args.ladder.sort_unstable();
    let report = run(&args)?;
    report.emit(args.out.as_deref())
}

/// The run's cgroups: `watched` holds the servers, `clients` the other ends.
struct Cgroups {
    root: PathBuf,
    watched: PathBuf,
    clients: PathBuf,
}

impl Cgroups {
    fn create() -> Result<Self> {
        let root =
            lull::activity::cgroup2_root()?.join(format!("lull-host-scale-{}", std::process::id()));
        let (watched, clients) = (root.join("watched"), root.join("clients"));
        for dir in [&root, &watched, &clients] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Self {
            root,
            watched,
            clients,
        })
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in [&self.watched, &self.clients, &self.root] {
            // The fleet is gone by now; a process still exiting makes rmdir wait a moment.
            for _ in 0..100 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The `lull host` under test; stopped and uninstalled on drop.
struct Daemon {
    child: Child,
    lull: PathBuf,
    instance: String,
    log: PathBuf,
}

impl Daemon {
    fn start(
        lull: &Path,
        instance: &str,
        config: &Path,
        events: &Path,
        log: &Path,
    ) -> Result<(Self, Duration)> {
        let started = Instant::now();
        let child = Command::new(lull)
            .args(["host", "--config"])
            .arg(config)
            .arg("--events")
            .arg(events)
            .args(["--instance", instance])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", lull.display()))?;
        let mut daemon = Self {
            child,
            lull: lull.into(),
            instance: instance.into(),
            log: log.into(),
        };
        while !daemon.log().contains("existing connections:") {
            if daemon.child.try_wait()?.is_some() || started.elapsed() > Duration::from_secs(600) {
                bail!("lull host did not start:\n{}", daemon.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((daemon, started.elapsed()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = Command::new(&self.lull)
            .args(["host", "--uninstall", "--instance", &self.instance])
            .output();
    }
}

fn run(args: &RunArgs) -> Result<report::HostScaleReport> {
    measure::raise_fd_limit();
    measure::private_netns()?;
    let lull = match &args.lull {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("lull"),
    };
    if !lull.is_file() {
        bail!(
            "{} is missing: `cargo xtask bench host-scale` builds it",
            lull.display()
        );
    }
    let cgroups = Cgroups::create()?;
    let tag = format!("host-scale-{}", std::process::id());
    let dir = std::env::temp_dir();
    let (config, events, log) = (
        dir.join(format!("{tag}.toml")),
        dir.join(format!("{tag}.events")),
        dir.join(format!("{tag}.log")),
    );
    let ports = args
        .ladder
        .last()
        .copied()
        .unwrap_or(0)
        .div_ceil(args.per_process);
    std::fs::write(
        &config,
        format!(
            "[[rule]]\nname = \"mass\"\ncgroup = \"{w}\"\nlocal_ports = [\"{lo}-{hi}\"]\n\
             idle = \"3600s\"\ninterval = \"60s\"\ncount = 5\n\n\
             [[rule]]\nname = \"sample\"\ncgroup = \"{w}\"\nlocal_ports = [{SAMPLE_PORT}]\n\
             idle = \"{SAMPLE_IDLE}s\"\ninterval = \"{SAMPLE_INTERVAL}s\"\ncount = {SAMPLE_COUNT}\n",
            w = cgroups.watched.display(),
            lo = fleet::FIRST_PORT,
            hi = fleet::FIRST_PORT as u64 + ports.max(1) - 1,
        ),
    )?;
    let _ = std::fs::remove_file(&events);
    let window = Duration::from_secs(args.idle_window.unwrap_or(if args.quick { 10 } else { 30 }));
    let timeout = Duration::from_secs(args.step_timeout);
    let mut fleet = Fleet::new(&cgroups.watched, &cgroups.clients, args.per_process);
    let mut steps = Vec::new();
    let mut stopped_by = None;

    // The first step's connections exist before lull: the start picks them up.
    let slab0 = slab_bytes()?;
    let first = args.ladder[0];
    eprintln!("host-scale: {first} connections before lull host starts");
    fleet.grow_to(first, timeout)?;
    let slab1 = slab_bytes()?;
    let (daemon, start_took) = Daemon::start(&lull, &tag, &config, &events, &log)?;
    let slab2 = slab_bytes()?;
    let counters = CountersReader::open(&HostPaths::new(&tag))?;
    let pickup = Pickup {
        conns: first,
        picked: counters.read()?.iter().map(|c| c.picked_up).sum(),
        start: start_took,
        kernel_bytes_per_conn: (slab2 as f64 - slab1 as f64) / first as f64,
        log: daemon
            .log()
            .lines()
            .find_map(|l| l.split_once("existing connections:"))
            .map(|(_, said)| said.trim().to_string())
            .unwrap_or_default(),
    };
    let sample_server = fleet.sample_server()?;
    let rss_start = Usage::read(daemon.pid())?.rss;

    for (i, &target) in args.ladder.iter().enumerate() {
        if i > 0 {
            eprintln!("host-scale: growing to {target} connections");
            if let Err(err) = fleet.grow_to(target, timeout) {
                stopped_by = Some(format!("at {target}: {err:#}"));
                break;
            }
        }
        match step(
            args, &lull, &tag, &daemon, &mut fleet, &counters, &events, window,
        ) {
            Ok(mut s) => {
                s.slab_per_conn = (slab_bytes()? as f64 - slab0 as f64) / fleet.conns as f64;
                s.lull_rss_growth_per_conn =
                    (s.lull_rss as f64 - rss_start as f64) / (fleet.conns - first).max(1) as f64;
                eprintln!("host-scale: {s:?}");
                steps.push(s);
            }
            Err(err) => {
                stopped_by = Some(format!("at {target}: {err:#}"));
                break;
            }
        }
    }
    drop(sample_server);
    drop(daemon);
    drop(fleet);
    for f in [&config, &events, &log] {
        let _ = std::fs::remove_file(f);
    }
    drop(cgroups);
    Ok(report::build(args, &pickup, &steps, stopped_by, window))
}

#[allow(clippy::too_many_arguments)]
fn step(
    args: &RunArgs,
    lull: &Path,
    instance: &str,
    daemon: &Daemon,
    fleet: &mut Fleet,
    counters: &CountersReader,
    events: &Path,
    window: Duration,
) -> Result<Step> {
    let watched: u64 = counters.read()?.iter().map(|c| c.watched()).sum();
    eprintln!(
        "host-scale: {} connections, {watched} watched; idle window {window:?}",
        fleet.conns
    );
    let before = Usage::read(daemon.pid())?;
    std::thread::sleep(window);
    let after = Usage::read(daemon.pid())?;
    let (ls, rows) = time_ls(lull, instance, &[])?;
    let (ls_bare, _) = time_ls(lull, instance, &["--no-process"])?;

    // Vanishing samples.
    let from = events_len(events);
    let (clients, ports) = fleet.sample_clients(args.sample)?;
    // Let the first keepalive round pass over them, so the drop lands at a random point of
    // their cycle rather than right after establishment.
    std::thread::sleep(Duration::from_secs(SAMPLE_IDLE + 1));
    let blackhole = Blackhole::start()?;
    let since = Instant::now();
    let bound = Duration::from_secs(SAMPLE_IDLE + SAMPLE_COUNT * SAMPLE_INTERVAL + 1);
    let found = verdicts(
        events,
        from,
        &ports,
        since,
        since + bound + Duration::from_secs(10),
    );
    drop(blackhole);
    drop(clients);
    let mut latencies: Vec<Duration> = found
        .values()
        .filter(|(kind, _)| kind == "keepalive_timeout")
        .map(|(_, d)| *d)
        .collect();
    latencies.sort();
    Ok(Step {
        conns: fleet.conns,
        watched,
        lull_cpu_percent: after.cpu_percent_since(&before),
        lull_rss: after.rss,
        lull_rss_growth_per_conn: 0.0,
        slab_per_conn: 0.0,
        ls,
        ls_rows: rows,
        ls_no_process: ls_bare,
        sample: ports.len() as u64,
        verdicts: found.len() as u64,
        latencies,
        bound,
    })
}
