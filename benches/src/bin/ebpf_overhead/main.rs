//! `ebpf-overhead`: what lull's eBPF programs cost a packet, against what they replace.
//!
//! One process, one pinned CPU, one thread playing both ends of 1-byte loopback ping-pong
//! (no wakeups, so its CPU clock holds all the work, the programs' included). Three
//! connection pairs, each opened from one of three cgroups the benchmark makes for itself:
//! - `in`, where programs are attached and detached: an unregistered pair, and a pair whose
//!   two sockets are registered with lull;
//! - `out`, where nothing is ever attached: a pair that must see no cost at all.
//!
//! A configuration is a program attached to `in` and a pair to measure. Each is measured as
//! the difference between 50 ms windows with the program attached and detached, on the same
//! pair, in ABBA order, over many rounds; the configurations take turns. Separate runs of a
//! second or more swing ±20% on these VMs, the interleaved median about ±2%.
//!
//! The same run times one `getsockopt(TCP_INFO)`: the read lull's fallback source makes per
//! timer firing, and what the kernel half has to beat for a whole probe cycle.

mod cgroups;
mod report;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsFd,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use aya::{
    EbpfLoader,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, links::FdLink},
};
use cgroups::BenchCgroups;
use clap::Parser;
use lull::activity::{ActivityTable, CgroupScope, TableOptions, bpf_object, tcp_info};
use lull_benches::{BenchReport, allowed_cpus, pin_thread, process_cpu_ns};

/// Measures the per-packet cost of lull's eBPF programs on loopback TCP, step by step.
#[derive(Parser, Debug)]
#[command(name = "ebpf-overhead")]
struct Args {
    /// Short run: 30 rounds.
    #[arg(long)]
    quick: bool,
    /// Rounds; each measures every configuration once, attached and detached [default: 120,
    /// quick: 30].
    #[arg(long)]
    rounds: Option<usize>,
    /// One window, in milliseconds.
    #[arg(long, default_value_t = 50)]
    window_ms: u64,
    /// Directory for `ebpf-overhead.json` and `ebpf-overhead.md`.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Which pair a configuration measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pair {
    /// In the attached cgroup, not registered.
    Unregistered,
    /// In the attached cgroup, both sockets registered.
    Registered,
    /// In a cgroup nothing is attached to.
    Outside,
}

/// What is attached to the `in` cgroup during a configuration's "on" windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Program {
    /// lull's own ingress program (the pinned one).
    Lull,
    /// A step of the cost ladder, by index into `LADDER_PROGS`.
    Ladder(usize),
}

/// One measured configuration.
#[derive(Clone, Copy, Debug)]
struct Config {
    /// The key under `figures` (and the table's label).
    key: &'static str,
    label: &'static str,
    program: Program,
    pair: Pair,
}

/// The four figures first, then the ladder's steps.
const CONFIGS: [Config; 7] = [
    Config {
        key: "empty_hook",
        label: "empty cgroup_skb program, same cgroup",
        program: Program::Ladder(0),
        pair: Pair::Unregistered,
    },
    Config {
        key: "unregistered",
        label: "lull attached, socket not registered",
        program: Program::Lull,
        pair: Pair::Unregistered,
    },
    Config {
        key: "registered",
        label: "lull attached, socket registered",
        program: Program::Lull,
        pair: Pair::Registered,
    },
    Config {
        key: "other_cgroup",
        label: "lull attached to another cgroup",
        program: Program::Lull,
        pair: Pair::Outside,
    },
    Config {
        key: "step_lookup",
        label: "ladder: storage lookup only, registered",
        program: Program::Ladder(1),
        pair: Pair::Registered,
    },
    Config {
        key: "step_parse",
        label: "ladder: lookup + header read every packet, registered",
        program: Program::Ladder(2),
        pair: Pair::Registered,
    },
    Config {
        key: "step_stamp",
        label: "ladder: lookup + header + clock + row store every packet, registered",
        program: Program::Ladder(3),
        pair: Pair::Registered,
    },
];

/// One window on one pair.
#[derive(Clone, Copy, Debug)]
struct Window {
    round_trips: u64,
    packets: u64,
    cpu_ns: u64,
    wall_ns: u64,
}

impl Window {
    fn cpu_ns_per_packet(&self) -> f64 {
        self.cpu_ns as f64 / self.packets as f64
    }

    fn round_trips_per_sec(&self) -> f64 {
        self.round_trips as f64 * 1e9 / self.wall_ns as f64
    }
}

/// Per configuration, per round: (detached, attached).
type Samples = Vec<Vec<(Window, Window)>>;

fn main() -> Result<()> {
    let args = Args::parse();
    let rounds = args.rounds.unwrap_or(if args.quick { 30 } else { 120 });
    ensure!(rounds >= 1, "--rounds must be at least 1");
    ensure!(
        (1..=10_000).contains(&args.window_ms),
        "--window-ms must be between 1 and 10000"
    );
    let window = Duration::from_millis(args.window_ms);
    // Before pinning, which would make the machine line say "1 CPUs".
    let report = BenchReport::new("ebpf-overhead");
    let cpu = *allowed_cpus()?
        .last()
        .context("this process may run on no CPU")?;
    // The highest-numbered CPU: CPU 0 usually takes most device interrupts.
    pin_thread(cpu)?;

    let cgroups = BenchCgroups::create()?;
    let table = ActivityTable::load(&TableOptions {
        capacity: 16,
        // Somewhere no socket lives: the benchmark attaches to `in` itself, on and off.
        cgroup: CgroupScope::Path(cgroups.anchor()),
        ..TableOptions::default()
    })
    .context(
        "eBPF unavailable: cannot load lull's activity table (needs root, cgroup v2, and a \
         build that embeds target/bpf/lull.bpf.o)",
    )?;
    let pairs = Pairs::open(&cgroups, &table)?;
    let mut programs = Programs::load(&table)?;
    let in_cgroup = std::fs::File::open(cgroups.inside())
        .with_context(|| format!("opening {}", cgroups.inside().display()))?;

    let mut samples: Samples = vec![Vec::with_capacity(rounds); CONFIGS.len()];
    let mut tcp_info_ns = Vec::with_capacity(rounds);
    let mut disturbed = 0;
    let started = Instant::now();
    for round in 0..rounds {
        // Rotate the order of configurations, and flip which half of each pair goes first.
        for i in 0..CONFIGS.len() {
            let k = (i + round) % CONFIGS.len();
            let config = CONFIGS[k];
            let pair = pairs.get(config.pair);
            let program = programs.get(config.program)?;
            let before = cgroups.effective_programs();
            let mut measure_on = || -> Result<Window> {
                let link = attach(program, &in_cgroup)?;
                let w = ping_pong(pair, window);
                drop(link);
                w
            };
            let (off, on) = if (round + i) % 2 == 0 {
                let off = ping_pong(pair, window)?;
                (off, measure_on()?)
            } else {
                let on = measure_on()?;
                (ping_pong(pair, window)?, on)
            };
            if cgroups.effective_programs() != before {
                disturbed += 1;
            }
            samples[k].push((off, on));
        }
        tcp_info_ns.push(time_tcp_info(&pairs.unregistered.0)?);
        if round % 10 == 9 || round + 1 == rounds {
            eprintln!(
                "ebpf-overhead: round {}/{rounds} ({:.0?} so far)",
                round + 1,
                started.elapsed()
            );
        }
    }
    drop(pairs);
    drop(table);
    let facts = report::Facts {
        rounds,
        window,
        cpu,
        disturbed,
        tcp_info_ns,
    };
    report::build(report, &samples, &facts).emit(args.out.as_deref())?;
    drop(cgroups);
    Ok(())
}

fn attach(program: &mut CgroupSkb, cgroup: &std::fs::File) -> Result<FdLink> {
    let id = program
        .attach(
            cgroup,
            CgroupSkbAttachType::Ingress,
            CgroupAttachMode::Single,
        )
        .context("attaching a program to the `in` cgroup")?;
    program
        .take_link(id)
        .context("taking the link")?
        .try_into()
        .context("a bpf_link")
}

/// The three measured connection pairs.
struct Pairs {
    unregistered: (TcpStream, TcpStream),
    registered: (TcpStream, TcpStream),
    outside: (TcpStream, TcpStream),
}

impl Pairs {
    /// Opens each pair from its cgroup (a socket belongs to the cgroup that made it), and
    /// registers the registered pair's two sockets.
    fn open(cgroups: &BenchCgroups, table: &ActivityTable) -> Result<Self> {
        cgroups.enter_inside()?;
        let unregistered = tcp_pair()?;
        let registered = tcp_pair()?;
        cgroups.enter_outside()?;
        let outside = tcp_pair()?;
        cgroups.enter_anchor()?;
        for sock in [&registered.0, &registered.1] {
            table
                .register(sock.as_fd())
                .context("registering a benchmark socket")?;
        }
        Ok(Self {
            unregistered,
            registered,
            outside,
        })
    }

    fn get(&self, pair: Pair) -> &(TcpStream, TcpStream) {
        match pair {
            Pair::Unregistered => &self.unregistered,
            Pair::Registered => &self.registered,
            Pair::Outside => &self.outside,
        }
    }
}

/// lull's pinned ingress program, and the ladder's, loaded against lull's pinned maps.
struct Programs {
    lull: CgroupSkb,
    ladder: aya::Ebpf,
}

impl Programs {
    fn load(table: &ActivityTable) -> Result<Self> {
        let pins = table.pin_dir();
        let lull = CgroupSkb::from_pin(pins.join("prog_ingress"), CgroupSkbAttachType::Ingress)
            .context("opening lull's pinned ingress program")?;
        let object = bpf_object().context("this build has no BPF object")?;
        let mut ladder = EbpfLoader::new()
            .map_pin_path(lull_common::SLOTS_MAP, pins.join(lull_common::SLOTS_MAP))
            .map_pin_path(
                lull_common::ACTIVITY_MAP,
                pins.join(lull_common::ACTIVITY_MAP),
            )
            .load(object)
            .context("loading the cost ladder")?;
        for name in lull_common::LADDER_PROGS {
            let program: &mut CgroupSkb = ladder
                .program_mut(name)
                .with_context(|| format!("the object has no program {name}"))?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
        }
        Ok(Self { lull, ladder })
    }

    fn get(&mut self, program: Program) -> Result<&mut CgroupSkb> {
        Ok(match program {
            Program::Lull => &mut self.lull,
            Program::Ladder(i) => self
                .ladder
                .program_mut(lull_common::LADDER_PROGS[i])
                .context("a ladder program")?
                .try_into()?,
        })
    }
}

fn tcp_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let a = TcpStream::connect(listener.local_addr()?).context("connecting on loopback")?;
    let (b, _) = listener.accept().context("accepting on loopback")?;
    for sock in [&a, &b] {
        sock.set_nodelay(true).context("setting TCP_NODELAY")?;
    }
    Ok((a, b))
}

fn segs_out(pair: &(TcpStream, TcpStream)) -> Result<u64> {
    let mut total = 0u64;
    for sock in [&pair.0, &pair.1] {
        total += u64::from(
            tcp_info(sock.as_fd())
                .context("getsockopt(TCP_INFO)")?
                .tcpi_segs_out,
        );
    }
    Ok(total)
}

/// One window of 1-byte round trips, both ends on this thread: a writes, b reads and answers,
/// a reads. Packets are the two sockets' own `tcpi_segs_out`.
fn ping_pong(pair: &(TcpStream, TcpStream), window: Duration) -> Result<Window> {
    let (mut a, mut b) = (&pair.0, &pair.1);
    let mut byte = [0u8; 1];
    let mut trip = || -> std::io::Result<()> {
        a.write_all(b"?")?;
        b.read_exact(&mut byte)?;
        b.write_all(&byte)?;
        a.read_exact(&mut byte)
    };
    // Settles whatever the attach or detach left in flight (RCU callbacks, cold caches).
    let warm = Instant::now() + Duration::from_millis(10);
    while Instant::now() < warm {
        trip().context("warm-up round trip")?;
    }
    let packets = segs_out(pair)?;
    let cpu = process_cpu_ns();
    let start = Instant::now();
    let mut round_trips = 0u64;
    while round_trips == 0 || start.elapsed() < window {
        for _ in 0..64 {
            trip().context("round trip")?;
        }
        round_trips += 64;
    }
    Ok(Window {
        round_trips,
        wall_ns: start.elapsed().as_nanos() as u64,
        cpu_ns: process_cpu_ns() - cpu,
        packets: segs_out(pair)? - packets,
    })
}

/// CPU ns of one `getsockopt(TCP_INFO)` on a connected socket, over 20,000 calls.
fn time_tcp_info(sock: &TcpStream) -> Result<f64> {
    const CALLS: u32 = 20_000;
    let cpu = process_cpu_ns();
    for _ in 0..CALLS {
        std::hint::black_box(tcp_info(sock.as_fd()).context("getsockopt(TCP_INFO)")?);
    }
    Ok((process_cpu_ns() - cpu) as f64 / f64::from(CALLS))
}
