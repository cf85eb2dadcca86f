//! `probe-path`: the userspace cost of sending one probe, by submission strategy.
//!
//! The engine sends a tick's probes as one io_uring submission: one `SEND` per connection, all
//! from one static payload, then one `submit_and_wait`. That is measured here against one
//! `send(2)` per probe and against `sendmmsg(2)` with one message per socket, for batches of 1
//! to 1024 probes over 1024 real loopback TCP connections. `ProbeRing` is private to the engine,
//! so [`Ring`] is a copy of its submission code.
//!
//! This VM has no hardware counters and splits user from system time by sampling a 4 ms tick,
//! while a probe spends about 1% of its time in userspace. So userspace is measured three ways:
//! getrusage (rough: few ticks land in user mode), the clock around io_uring's user-mode phases,
//! and callgrind's exact count of userspace instructions.

mod report;

use std::{
    collections::HashMap,
    fs, io,
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use io_uring::{IoUring, opcode, types};
use lull_benches::{
    BenchReport, Table, allowed_cpus, median, pin_thread, spread, thread_user_system_ns,
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

static PAYLOAD: [u8; 6] = *b"PING\r\n";
const FLAGS: libc::c_int = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
const PAIRS: usize = 1024;
const SIZES: [usize; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
const QUICK_SIZES: [usize; 4] = [1, 16, 64, 1024];
/// Probes between two drains: 16 per connection, far below what either side buffers, and
/// enough that the hand-off to the drain thread is a negligible share of the sender's time.
const CYCLE_PROBES: usize = 16 * PAIRS;
const CALLGRIND_PROBES: usize = 8192;
/// CONFIG_HZ=250 on these VMs: getrusage's user/system split rests on one sample per tick.
const TICK_NS: f64 = 4e6;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
enum Strategy {
    Uring,
    Send,
    Sendmmsg,
}

const STRATEGIES: [Strategy; 3] = [Strategy::Uring, Strategy::Send, Strategy::Sendmmsg];

impl Strategy {
    fn label(self) -> &'static str {
        ["io_uring SEND batch", "send(2) loop", "sendmmsg 1/socket"][self as usize]
    }
}

/// What the engine's `probe::ring::Completion` holds.
struct Completion {
    #[allow(dead_code)] // Written, as the engine writes it, so that the copy costs the same.
    tag: u64,
    result: i32,
}

/// The engine's `ProbeRing`, minus what probes do not use.
struct Ring {
    ring: IoUring,
    queued: u32,
}

/// Wall time in io_uring_enter during the current batch, for the timed cells.
#[derive(Default)]
struct Phases {
    enter_ns: u64,
    /// Each timed batch's wall time outside the kernel.
    user_ns: Vec<u64>,
}

impl Ring {
    fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2).max(2))
            .build(entries.max(1))?;
        Ok(Self { ring, queued: 0 })
    }

    fn room(&self) -> u32 {
        self.ring.params().sq_entries() - self.queued
    }

    /// # Safety
    /// `buf..buf + len` must stay valid until [`Ring::submit`] returns.
    unsafe fn push_send(&mut self, fd: RawFd, buf: *const u8, len: u32, tag: u64) -> bool {
        let sqe = opcode::Send::new(types::Fd(fd), buf, len)
            .flags(FLAGS)
            .build()
            .user_data(tag);
        // SAFETY: the entry refers only to memory the caller keeps valid until `submit`.
        let pushed = unsafe { self.ring.submission().push(&sqe) }.is_ok();
        if pushed {
            self.queued += 1;
        }
        pushed
    }

    /// As the engine's, plus clock reads around the kernel entry when `TIMED`.
    fn submit<const TIMED: bool>(
        &mut self,
        out: &mut Vec<Completion>,
        p: &mut u64,
    ) -> io::Result<()> {
        let want = self.queued as usize;
        if want == 0 {
            return Ok(());
        }
        let mut got = 0;
        loop {
            let entered = TIMED.then(Instant::now);
            let result = self.ring.submit_and_wait(want - got);
            if let Some(t) = entered {
                *p += nanos(t);
            }
            match result {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                let (tag, result) = (cqe.user_data(), cqe.result());
                out.push(Completion { tag, result });
                got += 1;
            }
            if got >= want {
                break;
            }
        }
        self.queued = 0;
        Ok(())
    }
}

fn nanos(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}

/// Our ends of the connections, visited round robin across batches, and the ring.
struct Sender {
    ring: Ring,
    completions: Vec<Completion>,
    fds: Vec<RawFd>,
    cursor: usize,
    phases: Phases,
}

impl Sender {
    fn next_fd(&mut self) -> RawFd {
        let fd = self.fds[self.cursor];
        self.cursor = (self.cursor + 1) % self.fds.len();
        fd
    }
}

/// One batch as the engine sends it; `TIMED` adds the clock reads of the timed cells.
fn uring_batch<const TIMED: bool>(s: &mut Sender, b: usize, out: &mut Sample) -> Result<()> {
    let start = TIMED.then(Instant::now);
    for tag in 0..b as u64 {
        let fd = s.next_fd();
        let (room, buf, len) = (s.ring.room(), PAYLOAD.as_ptr(), PAYLOAD.len() as u32);
        // SAFETY: PAYLOAD is a static that nothing modifies.
        let pushed = room > 0 && unsafe { s.ring.push_send(fd, buf, len, tag) };
        ensure!(pushed, "the ring is full before {b} entries");
    }
    s.completions.clear();
    s.phases.enter_ns = 0;
    let submitted = s
        .ring
        .submit::<TIMED>(&mut s.completions, &mut s.phases.enter_ns);
    submitted.context("io_uring_enter")?;
    for c in &s.completions {
        out.add(c.result as isize);
    }
    if let Some(t) = start {
        s.phases.user_ns.push(nanos(t) - s.phases.enter_ns);
    }
    Ok(())
}

fn errno_result(n: isize) -> isize {
    if n >= 0 {
        return n;
    }
    -(io::Error::last_os_error().raw_os_error().unwrap_or(0) as isize)
}

fn send_batch(s: &mut Sender, b: usize, out: &mut Sample) {
    for _ in 0..b {
        let fd = s.next_fd();
        // SAFETY: PAYLOAD is valid for its length; send only reads it.
        let n = unsafe { libc::send(fd, PAYLOAD.as_ptr().cast(), PAYLOAD.len(), FLAGS) };
        out.add(errno_result(n));
    }
}

fn sendmmsg_batch(s: &mut Sender, b: usize, out: &mut Sample) {
    let (base, len) = (PAYLOAD.as_ptr().cast_mut().cast(), PAYLOAD.len());
    let mut iov = libc::iovec {
        iov_base: base,
        iov_len: len,
    };
    // SAFETY: mmsghdr is plain data for which all zeroes is an empty message.
    let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
    (msg.msg_hdr.msg_iov, msg.msg_hdr.msg_iovlen) = (&mut iov, 1);
    for _ in 0..b {
        let fd = s.next_fd();
        // SAFETY: `msg` and `iov` outlive the call; the kernel reads the payload through them
        // and writes only `msg.msg_len`.
        let n = unsafe { libc::sendmmsg(fd, &mut msg, 1, FLAGS) };
        out.add(if n == 1 {
            msg.msg_len as isize
        } else {
            errno_result(n as isize)
        });
    }
}

/// A strategy, and for io_uring whether its user-mode phases are timed.
type Cell = (Strategy, bool);

fn run_batches(c: Cell, s: &mut Sender, b: usize, n: usize, t: &mut Sample) -> Result<()> {
    for _ in 0..n {
        match c {
            (Strategy::Uring, true) => uring_batch::<true>(s, b, t)?,
            (Strategy::Uring, false) => uring_batch::<false>(s, b, t)?,
            (Strategy::Send, _) => send_batch(s, b, t),
            (Strategy::Sendmmsg, _) => sendmmsg_batch(s, b, t),
        }
    }
    Ok(())
}

/// The only code that callgrind counts (`--toggle-collect`) and the CPU clock times.
#[inline(never)]
fn measured_cycle(c: Cell, s: &mut Sender, b: usize, n: usize, t: &mut Sample) -> Result<()> {
    run_batches(c, s, b, n, t)
}

/// Reads everything the peers hold, without blocking. Returns the bytes read.
fn drain(peers: &[RawFd], buf: &mut [u8]) -> Result<u64> {
    let mut total = 0;
    for &fd in peers {
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), FLAGS) };
            match errno_result(n) {
                0 => bail!("a peer connection closed"),
                n if n > 0 => total += n as u64,
                e if e == -(libc::EAGAIN as isize) => break,
                e if e == -(libc::EINTR as isize) => {}
                e => bail!("recv: {}", io::Error::from_raw_os_error(-e as i32)),
            }
        }
    }
    Ok(total)
}

/// `PAIRS` loopback connections, TCP_NODELAY on both ends, and a sender over our ends.
fn connect() -> Result<(Vec<(TcpStream, TcpStream)>, Sender)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    let pair = || -> Result<(TcpStream, TcpStream)> {
        let (ours, (peer, _)) = (TcpStream::connect(addr)?, listener.accept()?);
        ours.set_nodelay(true)?;
        peer.set_nodelay(true)?;
        Ok((ours, peer))
    };
    let pairs = (0..PAIRS).map(|_| pair()).collect::<Result<Vec<_>>>();
    let pairs = pairs.context("opening 1024 loopback connections (2048 fds: see `ulimit -n`)")?;
    let sender = Sender {
        ring: Ring::new(PAIRS as u32).context("io_uring unavailable")?,
        completions: Vec::with_capacity(2 * PAIRS),
        fds: pairs.iter().map(|(o, _)| o.as_raw_fd()).collect(),
        cursor: 0,
        phases: Phases::default(),
    };
    Ok((pairs, sender))
}

/// (exact CPU time of the calling thread, getrusage(RUSAGE_THREAD) user, system), in ns. The
/// kernel splits the exact total over the thread's whole life in the ratio of the ticks that
/// found it in either mode, so a measurement wants a fresh thread, and enough ticks.
fn thread_times() -> (u64, u64, u64) {
    // SAFETY: timespec is plain integers; `ts` is a valid out-pointer.
    let ts = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        ts
    };
    let cpu = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let (user, system) = thread_user_system_ns();
    (cpu, user, system)
}

#[derive(Clone, Copy, Default)]
struct Sample {
    probes: u64,
    /// CLOCK_THREAD_CPUTIME_ID over the measured cycles only.
    cpu_ns: u64,
    /// getrusage over the sending thread's life, hand-offs to the drain thread included.
    user_ns: u64,
    sys_ns: u64,
    /// Sends that returned `EAGAIN` (a full send buffer), and the first other error.
    eagain: u64,
    error: Option<i32>,
    /// Timed cells: the median batch's wall time outside the kernel (robust to the odd
    /// preemption landing in a user-mode stretch), and the batch size.
    batch_user_ns: f64,
    b: u64,
}

impl Sample {
    fn add(&mut self, result: isize) {
        match result {
            6 => {}
            r if r == -(libc::EAGAIN as isize) => self.eagain += 1,
            r => _ = self.error.get_or_insert(r as i32),
        }
    }

    fn per_probe(&self, ns: u64) -> f64 {
        ns as f64 / self.probes as f64
    }
}

/// The sender, its line to the drain thread (which empties the peers between cycles), and
/// everything measured.
struct Run {
    sender: Sender,
    sizes: &'static [usize],
    reps: usize,
    window: Duration,
    /// Sending and draining CPUs.
    cpus: (usize, usize),
    drain: (mpsc::Sender<bool>, mpsc::Receiver<Result<u64>>),
    /// Bytes sent and bytes the peers read, which must match.
    bytes: (u64, u64),
    /// `[size][strategy][rep]`, and `[size][rep]` for io_uring's timed cells.
    samples: Vec<[Vec<Sample>; 3]>,
    timed: Vec<Vec<Sample>>,
    softirq_ns: Option<u64>,
    wall: Duration,
}

impl Run {
    /// One cell on a fresh thread (so no older history leaks into getrusage's split), sending
    /// until it has used `window` of CPU.
    fn measure(&mut self, cell: Cell, b: usize, window: Duration) -> Result<Sample> {
        let (cpu, sender, (req, done)) = (self.cpus.0, &mut self.sender, &mut self.drain);
        let body = move || -> Result<(Sample, u64)> {
            pin_thread(cpu)?;
            let (_, u0, s0) = thread_times();
            let (mut sample, mut received) = (Sample::default(), 0);
            let batches = (CYCLE_PROBES / b).max(1);
            sender.phases.user_ns.clear();
            let wall = Instant::now();
            while sample.cpu_ns < window.as_nanos() as u64 && wall.elapsed() < 20 * window {
                let t0 = thread_times().0;
                measured_cycle(cell, sender, b, batches, &mut sample)?;
                sample.cpu_ns += thread_times().0 - t0;
                sample.probes += (batches * b) as u64;
                let sent = req.send(true);
                sent.map_err(|_| anyhow!("the drain thread ended"))?;
                received += done.recv()??;
            }
            let (_, u1, s1) = thread_times();
            if let Some(e) = sample.error {
                bail!("{}: {}", cell.0.label(), io::Error::from_raw_os_error(-e));
            }
            (sample.user_ns, sample.sys_ns) = (u1 - u0, s1 - s0);
            let batch_user: Vec<f64> = sender.phases.user_ns.iter().map(|&n| n as f64).collect();
            (sample.batch_user_ns, sample.b) = (median(&batch_user), b as u64);
            Ok((sample, received))
        };
        let joined = thread::scope(|s| s.spawn(body).join());
        let (sample, received) = joined.map_err(|_| anyhow!("the sending thread panicked"))??;
        self.bytes.0 += (sample.probes - sample.eagain) * PAYLOAD.len() as u64;
        self.bytes.1 += received;
        Ok(sample)
    }

    fn measure_all(&mut self) -> Result<()> {
        // Unrecorded, so that the first cell does not pay for cold caches and first uses.
        for st in STRATEGIES {
            for b in [1, PAIRS] {
                self.measure((st, false), b, self.window.min(Duration::from_millis(100)))?;
            }
        }
        let (softirq, wall) = (ksoftirqd_ns(self.cpus.0), Instant::now());
        for rep in 0..self.reps {
            for (i, &b) in self.sizes.iter().enumerate() {
                // Strategies alternate within a size, in an order rotating across repetitions.
                for k in 0..3 {
                    let st = STRATEGIES[(k + rep + i) % 3];
                    let sample = self.measure((st, false), b, self.window)?;
                    let (ns, label) = (sample.per_probe(sample.cpu_ns), st.label());
                    let of = format!("{}/{}", rep + 1, self.reps);
                    eprintln!("rep {of} B={b:<4} {label:<20} {ns:5.0} ns/probe");
                    self.samples[i][st as usize].push(sample);
                }
                // Its clock reads would inflate the CPU figures, so it is a cell of its own.
                let timed = self.measure((Strategy::Uring, true), b, self.window / 4)?;
                self.timed[i].push(timed);
            }
        }
        self.softirq_ns = softirq.zip(ksoftirqd_ns(self.cpus.0)).map(|(a, b)| b - a);
        self.wall = wall.elapsed();
        // One last drain, later, for any delivery that ksoftirqd finished after the last one.
        thread::sleep(Duration::from_millis(50));
        self.drain
            .0
            .send(true)
            .map_err(|_| anyhow!("the drain thread ended"))?;
        self.bytes.1 += self.drain.1.recv()??;
        let (sent, read) = self.bytes;
        ensure!(sent == read, "the peers read {read} of {sent} bytes");
        Ok(())
    }
}

/// `--callgrind-child`: each cell once, in `cells` order, as one call of `measured_cycle` of
/// `CALLGRIND_PROBES` probes, which callgrind counts and dumps as one part.
fn callgrind_child(sizes: &[usize]) -> Result<()> {
    let (pairs, mut sender) = connect()?;
    let peers: Vec<RawFd> = pairs.iter().map(|(_, p)| p.as_raw_fd()).collect();
    let (mut buf, mut sample) = (vec![0u8; 1 << 16], Sample::default());
    for (st, b) in cells(sizes) {
        // Outside `measured_cycle`, so that first-use costs are not counted.
        run_batches((st, false), &mut sender, b, 1, &mut sample)?;
        drain(&peers, &mut buf)?;
        let n = CALLGRIND_PROBES / b;
        measured_cycle((st, false), &mut sender, b, n, &mut sample)?;
        drain(&peers, &mut buf)?;
    }
    let failed = sample.error.is_some() || sample.eagain > 0;
    ensure!(!failed, "sends failed under callgrind");
    Ok(())
}

/// Every (strategy, B), then io_uring at the largest B again, to show the count repeats.
fn cells(sizes: &[usize]) -> Vec<(Strategy, usize)> {
    let all = sizes.iter().flat_map(|&b| STRATEGIES.map(|st| (st, b)));
    let last = (Strategy::Uring, sizes[sizes.len() - 1]);
    all.chain([last]).collect()
}

/// Instructions per probe by (strategy, B), and the repeated cell's two totals.
type Callgrind = Result<(HashMap<(Strategy, usize), f64>, (u64, u64))>;

/// Runs `--callgrind-child` under callgrind, counting only inside `measured_cycle` and dumping
/// a part (appended to one file) each time it returns.
fn callgrind(sizes: &[usize], quick: bool) -> Callgrind {
    let file = std::env::temp_dir().join(format!("probe-path.{}.callgrind", std::process::id()));
    let mut cmd = Command::new("valgrind");
    cmd.args(["--tool=callgrind", "-q", "--combine-dumps=yes"]);
    // `--dump-after` wants the exact name: it takes no wildcards.
    let f = "probe_path::measured_cycle";
    cmd.args([format!("--toggle-collect={f}"), format!("--dump-after={f}")]);
    cmd.arg(format!("--callgrind-out-file={}", file.display()));
    cmd.arg(std::env::current_exe()?).arg("--callgrind-child");
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .stdout(Stdio::null())
        .output()
        .context("running valgrind")?;
    let text = fs::read_to_string(&file).unwrap_or_default();
    let _ = fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "valgrind failed: {}", stderr.trim());
    let totals = text
        .lines()
        .filter_map(|l| l.strip_prefix("totals: ")?.parse().ok());
    let (cells, totals): (Vec<_>, Vec<u64>) = (cells(sizes), totals.collect());
    let parts = totals.len();
    ensure!(
        parts >= cells.len(),
        "callgrind wrote {parts} parts, not one per cell"
    );
    let per_probe = |(&(st, b), &t): (&(Strategy, usize), &u64)| {
        ((st, b), t as f64 / (CALLGRIND_PROBES / b * b) as f64)
    };
    let per_probe = cells.iter().zip(&totals).map(per_probe);
    let repeat = (totals[cells.len() - 4], totals[cells.len() - 1]);
    Ok((per_probe.collect(), repeat))
}

/// Exact runtime of `ksoftirqd/<cpu>`: delivery work deferred off the sending thread.
fn ksoftirqd_ns(cpu: usize) -> Option<u64> {
    let want = format!("ksoftirqd/{cpu}");
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let comm = fs::read_to_string(e.path().join("comm")).ok()?;
        let stat = (comm.trim() == want).then(|| fs::read_to_string(e.path().join("schedstat")));
        stat?.ok()?.split_whitespace().next()?.parse().ok()
    })
}

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
    let (req_tx, req_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let mut run = Run {
        sender,
        sizes,
        reps,
        window: Duration::from_secs_f64(seconds),
        cpus: (send_cpu, drain_cpu),
        drain: (req_tx, done_rx),
        bytes: (0, 0),
        samples: vec![Default::default(); sizes.len()],
        timed: vec![vec![]; sizes.len()],
        softirq_ns: None,
        wall: Duration::ZERO,
    };
    thread::scope(|s| -> Result<()> {
        s.spawn(move || -> Result<()> {
            pin_thread(drain_cpu)?;
            let mut buf = vec![0u8; 1 << 16];
            while req_rx.recv() == Ok(true) && done_tx.send(drain(&peers, &mut buf)).is_ok() {}
            Ok(())
        });
        let measured = run.measure_all();
        // Ends the drain thread, which the scope waits for, on every path.
        let _ = run.drain.0.send(false);
        measured
    })?;
    drop(pairs);
    let cg = callgrind(sizes, args.quick);
    build_report(report, &run, &cg).emit(args.out.as_deref())
}

use report::*;
