//! `ebpf-overhead`: what lull's eBPF programs cost each packet on the host.
//!
//! The `cgroup_skb` programs attach to the root cgroup, so every TCP packet on the host runs
//! them, not only the connections lull watches. Three configurations are measured the same way,
//! with the same loopback workloads:
//!
//! - `detached`: no lull program attached; the baseline.
//! - `attached, unregistered`: a table is loaded but the benchmark's sockets are not
//!   registered. This is what every other socket on the host pays: one storage lookup.
//! - `attached, registered`: both sockets registered, so every packet does the full work
//!   (lookup, header parse, stamp).
//!
//! The machine this runs on is noisy, so a single A-then-B comparison would mostly measure
//! drift. Instead the three configurations alternate within each round, their order rotating
//! from round to round, and each configuration is compared with the detached run of its own
//! round. Benchmarks never fail on timing: the goals are reported as met or not.

mod report;

use std::{
    fs::{self, File},
    io::{self, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use clap::Parser;
use lull::activity::{ActivityTable, TableOptions, cgroup2_root, tcp_info};
use lull_benches::{
    BenchReport, Table, allowed_cpus, median, net_counter, pin_thread, process_cpu_ns, spread,
};

/// Measures the per-packet cost of lull's eBPF programs on loopback TCP.
#[derive(Parser, Debug)]
#[command(name = "ebpf-overhead")]
struct Args {
    /// Short run: 3 rounds of 0.3 s windows.
    #[arg(long)]
    quick: bool,
    /// Rounds; each round runs every configuration once per workload [default: 9, quick: 3].
    #[arg(long)]
    rounds: Option<usize>,
    /// Measurement window per run, in seconds [default: 1.0, quick: 0.3].
    #[arg(long)]
    seconds: Option<f64>,
    /// Directory for `ebpf-overhead.json` and `ebpf-overhead.md`.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Detached,
    Unregistered,
    Registered,
}

const CONFIGS: [Config; 3] = [Config::Detached, Config::Unregistered, Config::Registered];

impl Config {
    fn label(self) -> &'static str {
        ["detached", "attached, unregistered", "attached, registered"][self.index()]
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    PingPong,
    Bulk,
}

impl Workload {
    fn label(self) -> &'static str {
        ["ping-pong", "bulk"][self as usize]
    }
}

/// One run: `ops` round trips or bytes in `secs`, and the packets they took.
#[derive(Clone, Copy, Debug)]
struct Sample {
    ops: f64,
    secs: f64,
    /// `Tcp OutSegs` delta from `/proc/net/snmp`.
    packets: f64,
    /// Sum of both sockets' `tcpi_segs_out` deltas: the same count, blind to other traffic.
    socket_packets: f64,
    /// CPU time of this process over the window. Everything runs on one CPU and loopback
    /// delivery runs in the sender's context, so this holds both programs' work, but not the
    /// time spent waiting for a CPU that another process holds.
    cpu_ns: f64,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.ops / self.secs
    }

    fn packets_per_op(&self) -> f64 {
        self.packets / self.ops
    }

    /// Operations per CPU second: the rate this run would have had with the CPU to itself.
    fn cpu_rate(&self) -> f64 {
        self.ops / self.cpu_ns * 1e9
    }
}

const BULK_CHUNK: usize = 64 * 1024;
/// Pause between a run's setup and its window, so that the deferred kernel work left by
/// dropping the previous run's table and loading this one's (RCU callbacks, map freeing in a
/// workqueue) is done before the window opens rather than inside it.
const SETTLE: Duration = Duration::from_millis(200);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    let args = Args::parse();
    let rounds = args.rounds.unwrap_or(if args.quick { 3 } else { 9 });
    let seconds = args.seconds.unwrap_or(if args.quick { 0.3 } else { 1.0 });
    ensure!(rounds >= 1, "--rounds must be at least 1");
    ensure!(
        seconds.is_finite() && seconds > 0.0,
        "--seconds must be a positive number"
    );
    let window = Duration::from_secs_f64(seconds);
    // Before pinning, which would make the machine line say "1 CPUs".
    let report = BenchReport::new("ebpf-overhead");
    let cpu = pin_to_one_cpu()?;

    // Fail before any timing if the programs cannot load at all.
    drop(load_table()?);
    let census = Census::open();
    let mut bench = Bench {
        baseline: census.as_ref().and_then(Census::count),
        census,
        disturbed: 0,
    };

    // Unrecorded warm-up, so the first measured run does not also pay for cold caches and
    // first-use allocations in the kernel.
    let warmup = window.min(Duration::from_millis(200));
    for workload in [Workload::PingPong, Workload::Bulk] {
        bench.run(Config::Registered, workload, warmup)?;
    }

    // samples[workload][config][round]
    let mut samples: [[Vec<Sample>; 3]; 2] = Default::default();
    for round in 0..rounds {
        for (w, workload) in [Workload::PingPong, Workload::Bulk].into_iter().enumerate() {
            for i in 0..CONFIGS.len() {
                let config = CONFIGS[(i + round) % CONFIGS.len()];
                let sample = bench.run(config, workload, window)?;
                let (what, unit) = (workload.label(), config.label());
                let rate = match workload {
                    Workload::PingPong => format!("{:.0} rt/s", sample.rate()),
                    Workload::Bulk => format!("{:.0} MB/s", sample.rate() / 1e6),
                };
                eprintln!("round {}/{rounds} {what} {unit}: {rate}", round + 1);
                samples[w][config.index()].push(sample);
            }
        }
    }

    let report = build_report(report, &samples, &bench, (rounds, seconds, cpu));
    report.emit(args.out.as_deref())
}

/// Runs configurations, watching for other processes' cgroup programs.
struct Bench {
    census: Option<Census>,
    /// Program attachments running for our sockets with no table of ours loaded.
    baseline: Option<u32>,
    /// Runs during which that set changed: other engineers' tests load lull tables on this
    /// host too, and one attached during a "detached" run makes it nothing of the kind.
    disturbed: usize,
}

impl Bench {
    /// One run on a fresh connection pair.
    fn run(&mut self, config: Config, workload: Workload, window: Duration) -> Result<Sample> {
        // Loaded before the connection exists, as in production, so `sock_ops` sees it
        // established; dropped at the end of the run, which detaches every program.
        let table = match config {
            Config::Detached => None,
            Config::Unregistered | Config::Registered => Some(load_table()?),
        };
        let (ours, peer) = tcp_pair()?;
        let mut slots = Vec::new();
        if let (Some(table), Config::Registered) = (&table, config) {
            for sock in [&ours, &peer] {
                let slot = table
                    .register(sock.as_fd())
                    .context("registering a benchmark socket")?;
                slots.push((slot, sock));
            }
        }
        thread::sleep(SETTLE);

        let count = || self.census.as_ref().and_then(Census::count);
        let before = count();
        let sample = match workload {
            Workload::PingPong => ping_pong(&ours, &peer, window),
            Workload::Bulk => bulk(&ours, &peer, window),
        }
        .with_context(|| format!("{} run, {}", workload.label(), config.label()))?;
        let expected = self.baseline.map(|b| b + 2 * u32::from(table.is_some()));
        if expected.is_some() && (before != expected || count() != expected) {
            self.disturbed += 1;
            eprintln!("  other cgroup programs came or went during this run");
        }

        if let Some(table) = &table {
            for (slot, sock) in slots {
                table.unregister_socket(slot, sock.as_fd());
            }
        }
        Ok(sample)
    }
}

fn load_table() -> Result<ActivityTable> {
    ActivityTable::load(&TableOptions {
        capacity: 8,
        cgroup: lull::activity::CgroupScope::Current,
        ..TableOptions::default()
    })
    .context(
        "eBPF unavailable: cannot load lull's activity table \
         (needs root, cgroup v2, and a build that embeds target/bpf/lull.bpf.o)",
    )
}

/// Pins this thread, and with it every thread it starts later, to one CPU, and returns it.
///
/// On this kind of 2-vCPU virtual machine a cross-CPU wakeup costs tens of microseconds, so
/// unpinned round trips flip between ~10k and ~55k per second depending on where the
/// scheduler happens to put the two threads: noise far larger than the effect measured.
/// The highest-numbered CPU is used because CPU 0 usually takes most device interrupts.
fn pin_to_one_cpu() -> Result<usize> {
    let cpus = allowed_cpus()?;
    let cpu = *cpus.last().context("this process may run on no CPU")?;
    pin_thread(cpu)?;
    Ok(cpu)
}

fn tcp_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let ours = TcpStream::connect(listener.local_addr()?).context("connecting on loopback")?;
    let (peer, _) = listener.accept().context("accepting on loopback")?;
    for sock in [&ours, &peer] {
        sock.set_nodelay(true).context("setting TCP_NODELAY")?;
        // So that a run whose other side failed ends in an error, not a hang.
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        sock.set_write_timeout(Some(IO_TIMEOUT))?;
    }
    Ok((ours, peer))
}

/// 1-byte requests answered by a peer thread, as many as fit in `window`.
fn ping_pong(ours: &TcpStream, peer: &TcpStream, window: Duration) -> Result<Sample> {
    thread::scope(|s| {
        let echo = s.spawn(move || -> io::Result<()> {
            let mut peer = peer;
            let mut byte = [0u8; 1];
            while peer.read(&mut byte)? == 1 {
                peer.write_all(&byte)?;
            }
            Ok(())
        });
        let measured = (|| -> Result<Sample> {
            let round_trip = || -> io::Result<()> {
                let mut ours = ours;
                ours.write_all(b"?")?;
                ours.read_exact(&mut [0u8; 1])
            };
            // The first round trips of a connection take a different path (quick-ACK mode).
            for _ in 0..200 {
                round_trip().context("warm-up round trip")?;
            }
            let start = Counters::read(ours, peer)?;
            let deadline = start.at + window;
            let mut trips = 0u64;
            while trips == 0 || Instant::now() < deadline {
                round_trip().context("round trip")?;
                trips += 1;
            }
            start.sample(trips, ours, peer)
        })();
        finish(ours, measured, echo).map(|(sample, ())| sample)
    })
}

/// 64 KiB writes one way for `window`, drained by a reader thread.
///
/// Throughput is every byte written over the time until the reader saw the last of it, so
/// bytes still queued when the window closes are neither lost nor counted as free.
fn bulk(ours: &TcpStream, peer: &TcpStream, window: Duration) -> Result<Sample> {
    thread::scope(|s| {
        let start = Counters::read(ours, peer)?;
        let reader = s.spawn(move || -> io::Result<u64> {
            let mut peer = peer;
            let mut buf = vec![0u8; 4 * BULK_CHUNK];
            let mut total = 0u64;
            loop {
                match peer.read(&mut buf)? {
                    0 => return Ok(total),
                    n => total += n as u64,
                }
            }
        });
        let (chunk, mut writer, mut sent) = (vec![0x5au8; BULK_CHUNK], ours, 0u64);
        let written = (|| -> io::Result<()> {
            while start.at.elapsed() < window {
                writer.write_all(&chunk)?;
                sent += BULK_CHUNK as u64;
            }
            Ok(())
        })();
        let ((), received) = finish(ours, written.context("bulk write"), reader)?;
        ensure!(received == sent, "sent {sent} bytes, received {received}");
        start.sample(sent, ours, peer)
    })
}

/// Closes our sending side, which ends the peer thread on every path (the scope would wait
/// for it forever otherwise), then reports the first failure of either side.
fn finish<T, U>(
    ours: &TcpStream,
    ours_result: Result<T>,
    peer: thread::ScopedJoinHandle<'_, io::Result<U>>,
) -> Result<(T, U)> {
    let closed = ours.shutdown(Shutdown::Write);
    let theirs = peer.join();
    let mine = ours_result?;
    let theirs = theirs
        .map_err(|_| anyhow!("peer thread panicked"))?
        .context("peer thread")?;
    closed.context("shutting down the sending side")?;
    Ok((mine, theirs))
}

/// What a run is measured by, read at the start and end of its window.
struct Counters {
    at: Instant,
    cpu_ns: u64,
    /// `Tcp OutSegs` from `/proc/net/snmp`: segments sent in this network namespace.
    out_segs: u64,
    /// Both sockets' `tcpi_segs_out`, summed (a wrapping u32 in the kernel).
    segs_out: u32,
}

impl Counters {
    fn read(a: &TcpStream, b: &TcpStream) -> Result<Self> {
        let out_segs = net_counter("/proc/net/snmp", "Tcp:", "OutSegs")?;
        let mut segs_out = 0u32;
        for sock in [a, b] {
            let info = tcp_info(sock.as_fd()).context("getsockopt(TCP_INFO)")?;
            segs_out = segs_out.wrapping_add(info.tcpi_segs_out);
        }
        Ok(Self {
            at: Instant::now(),
            cpu_ns: process_cpu_ns(),
            out_segs,
            segs_out,
        })
    }

    /// The sample for `ops` operations done since `self` was read.
    fn sample(&self, ops: u64, a: &TcpStream, b: &TcpStream) -> Result<Sample> {
        let (secs, cpu_ns) = (self.at.elapsed(), process_cpu_ns() - self.cpu_ns);
        let end = Self::read(a, b)?;
        Ok(Sample {
            ops: ops as f64,
            secs: secs.as_secs_f64(),
            packets: end.out_segs.saturating_sub(self.out_segs) as f64,
            socket_packets: f64::from(end.segs_out.wrapping_sub(self.segs_out)),
            cpu_ns: cpu_ns as f64,
        })
    }
}

/// Counts the `cgroup_skb` programs that run for this process's sockets, via
/// `BPF_PROG_QUERY` with `BPF_F_QUERY_EFFECTIVE` on this process's cgroup v2 directory.
struct Census {
    cgroup: File,
}

impl Census {
    /// `None` when this process's cgroup cannot be found; the runs are then not checked.
    fn open() -> Option<Self> {
        let own = fs::read_to_string("/proc/self/cgroup").ok()?;
        let relative = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        let path = cgroup2_root().ok()?.join(relative.trim_start_matches('/'));
        let census = Self {
            cgroup: File::open(path).ok()?,
        };
        census.count().map(|_| census)
    }

    /// Ingress plus egress programs; `None` if the query fails.
    fn count(&self) -> Option<u32> {
        const BPF_PROG_QUERY: libc::c_long = 16;
        const BPF_F_QUERY_EFFECTIVE: u32 = 1;
        let mut total = 0;
        // BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET_EGRESS
        for attach_type in [0, 1] {
            // `union bpf_attr`'s `query` member, 64 bytes (`include/uapi/linux/bpf.h`):
            // target_fd, attach_type, query_flags, attach_flags, prog_ids (u64, null),
            // prog_cnt at word 6, then fields this query leaves alone.
            let mut attr = [0u32; 16];
            attr[..3].copy_from_slice(&[
                self.cgroup.as_raw_fd() as u32,
                attach_type,
                BPF_F_QUERY_EFFECTIVE,
            ]);
            // SAFETY: `attr` is an initialised `bpf_attr` prefix of the size passed, which the
            // kernel copies in and out (so alignment does not matter); with `prog_ids` null it
            // writes nothing outside it.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_PROG_QUERY,
                    attr.as_mut_ptr(),
                    size_of_val(&attr),
                )
            };
            if ret < 0 {
                return None;
            }
            total += attr[6];
        }
        Some(total)
    }
}

use report::*;
