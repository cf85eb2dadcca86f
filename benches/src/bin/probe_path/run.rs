//! [`Run`]: every cell (strategy, batch size), each on a fresh sending thread, repeated, with
//! a drain thread that empties the peers between cycles.

use std::{
    fs, io,
    os::fd::RawFd,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail, ensure};
use lull_benches::{median, pin_thread, thread_user_system_ns};

use crate::batch::{
    Cell, PAIRS, PAYLOAD, STRATEGIES, Sample, Sender, Strategy, drain, measured_cycle,
};

/// Probes between two drains: 16 per connection, far below what either side buffers, and
/// enough that the hand-off to the drain thread is a negligible share of the sender's time.
pub const CYCLE_PROBES: usize = 16 * PAIRS;

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

/// The sender, its line to the drain thread (which empties the peers between cycles), and
/// everything measured.
pub struct Run {
    sender: Sender,
    pub sizes: &'static [usize],
    pub reps: usize,
    pub window: Duration,
    /// Sending and draining CPUs.
    pub cpus: (usize, usize),
    drain: (mpsc::Sender<bool>, mpsc::Receiver<Result<u64>>),
    /// Bytes sent and bytes the peers read, which must match.
    bytes: (u64, u64),
    /// `[size][strategy][rep]`, and `[size][rep]` for io_uring's timed cells.
    pub samples: Vec<[Vec<Sample>; 3]>,
    pub timed: Vec<Vec<Sample>>,
    pub softirq_ns: Option<u64>,
    pub wall: Duration,
}

impl Run {
    /// Measures every cell over `sender`'s connections, `reps` times, each for `window` of
    /// the sending thread's CPU: the sender on `cpus.0`, the drain thread reading `peers` on
    /// `cpus.1`.
    pub fn start(
        sender: Sender,
        peers: &[RawFd],
        sizes: &'static [usize],
        reps: usize,
        window: Duration,
        cpus: (usize, usize),
    ) -> Result<Self> {
        let (req_tx, req_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let mut run = Self {
            sender,
            sizes,
            reps,
            window,
            cpus,
            drain: (req_tx, done_rx),
            bytes: (0, 0),
            samples: vec![Default::default(); sizes.len()],
            timed: vec![vec![]; sizes.len()],
            softirq_ns: None,
            wall: Duration::ZERO,
        };
        thread::scope(|s| -> Result<()> {
            s.spawn(move || -> Result<()> {
                pin_thread(cpus.1)?;
                let mut buf = vec![0u8; 1 << 16];
                while req_rx.recv() == Ok(true) && done_tx.send(drain(peers, &mut buf)).is_ok() {}
                Ok(())
            });
            let measured = run.measure_all();
            // Ends the drain thread, which the scope waits for, on every path.
            let _ = run.drain.0.send(false);
            measured
        })?;
        Ok(run)
    }

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

/// Exact runtime of `ksoftirqd/<cpu>`: delivery work deferred off the sending thread.
fn ksoftirqd_ns(cpu: usize) -> Option<u64> {
    let want = format!("ksoftirqd/{cpu}");
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let comm = fs::read_to_string(e.path().join("comm")).ok()?;
        let stat = (comm.trim() == want).then(|| fs::read_to_string(e.path().join("schedstat")));
        stat?.ok()?.split_whitespace().next()?.parse().ok()
    })
}
