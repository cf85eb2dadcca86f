//! The measured window of one strategy: CPU and counters read at both ends, the hang and the
//! vanishing inside it, the workers' reports at its end.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lull::clock::monotonic_ns;

use crate::{
    child::Kid,
    env::{Background, Environment},
    measured::Cpu,
    plan::Plan,
    proto::{CMD_HANG, CMD_MARK, CMD_REPORT, MARKED, REPORT, Report},
    softirq::SoftirqTime,
    system::{
        CpuStat, ProcCpu, ProcScan, TcpCounters, backlog_drops, blackhole, ticks_to_ms, wakeups,
    },
};

/// CPU and counters read at one end of the window.
pub struct Snapshot {
    cpu: CpuStat,
    scan: ProcScan,
    pub tcp: TcpCounters,
    pub drops: u64,
    softirq: Option<SoftirqTime>,
    /// Wakeups of the workers' and the peers' threads.
    pub wakeups: (u64, u64),
    workers: Vec<ProcCpu>,
    peers: Vec<ProcCpu>,
    me: ProcCpu,
}

impl Snapshot {
    fn take(env: &Environment, workers: &[Kid], peers: &[Kid]) -> Result<Self> {
        let read = |kids: &[Kid]| -> Vec<ProcCpu> {
            kids.iter()
                .map(|k| ProcCpu::read(k.pid).unwrap_or_default())
                .collect()
        };
        Ok(Self {
            cpu: CpuStat::read()?,
            scan: ProcScan::read(),
            tcp: TcpCounters::read()?,
            drops: backlog_drops(),
            softirq: env.softirq_now(),
            wakeups: (
                workers.iter().map(|k| wakeups(k.pid)).sum(),
                peers.iter().map(|k| wakeups(k.pid)).sum(),
            ),
            workers: read(workers),
            peers: read(peers),
            me: ProcCpu::read(std::process::id()).unwrap_or_default(),
        })
    }
}

fn sum_delta(end: &[ProcCpu], start: &[ProcCpu], f: fn(&ProcCpu) -> u64) -> f64 {
    let ticks: u64 = end
        .iter()
        .zip(start)
        .map(|(e, s)| f(e).saturating_sub(f(s)))
        .sum();
    ticks_to_ms(ticks)
}

/// Removes the firewall rule when dropped, so that no later strategy starts with it.
struct Blackhole;

impl Drop for Blackhole {
    fn drop(&mut self) {
        if let Err(err) = blackhole("-D") {
            eprintln!("real: removing the firewall rule: {err:#}");
        }
    }
}

/// What the window yields: both snapshots, its length, when the peers hung and vanished, and
/// the workers' reports.
pub struct Window {
    pub start: Snapshot,
    pub end: Snapshot,
    pub length: Duration,
    pub hang_ns: u64,
    /// When the vanishing peers vanished, and how long the firewall rule took to go in.
    pub vanish: Option<(u64, f64)>,
    pub reports: Vec<Report>,
}

impl Window {
    /// CPU over the window: whole system, the run's processes (`workers`, `peers`, this one;
    /// `ours` holds all their pids), softirq by context. The background is filled in later.
    pub fn cpu(&self, ours: &HashSet<u32>) -> Cpu {
        let (start, end) = (&self.start, &self.end);
        Cpu {
            window_s: self.length.as_secs_f64(),
            background: Background::default(),
            whole: ticks_to_ms(end.cpu.busy_since(&start.cpu).0),
            others: ticks_to_ms(end.scan.others_since(&start.scan, ours)),
            workers_user: sum_delta(&end.workers, &start.workers, |p| p.user),
            workers_sys: sum_delta(&end.workers, &start.workers, |p| p.system),
            peers_user: sum_delta(&end.peers, &start.peers, |p| p.user),
            peers_sys: sum_delta(&end.peers, &start.peers, |p| p.system),
            orchestrator: sum_delta(&[end.me], &[start.me], |p| p.user + p.system + p.children),
            softirq: start.softirq.zip(end.softirq).map(|(a, b)| b.ms_since(&a)),
        }
    }
}

/// Runs the window, `length` long: marks the workers, makes the hung peers hang and the
/// vanishing ones vanish `plan.hang_after` into it, and collects the workers' reports at its
/// end.
pub fn run(
    plan: &Plan,
    env: &Environment,
    label: &str,
    length: Duration,
    (workers, peers): (&mut [Kid], &mut [Kid]),
) -> Result<Window> {
    let start = Snapshot::take(env, workers, peers)?;
    let (w0, w0_ns) = (Instant::now(), monotonic_ns());
    for worker in workers.iter_mut() {
        worker.send(CMD_MARK)?;
    }
    for worker in workers.iter_mut() {
        worker.expect(MARKED, &[], Duration::from_secs(10))?;
    }
    let hang_ns = w0_ns + plan.hang_after.as_nanos() as u64;
    for peer in peers.iter_mut() {
        peer.send(&format!("{CMD_HANG} {hang_ns}"))?;
    }
    std::thread::sleep((w0 + plan.hang_after).saturating_duration_since(Instant::now()));
    let (mut rule, mut vanish) = (None, None);
    if env.vanishing() {
        let t = Instant::now();
        blackhole("-I")?;
        rule = Some(Blackhole);
        vanish = Some((monotonic_ns(), t.elapsed().as_secs_f64() * 1e3));
    }
    let also = if env.vanishing() {
        " and vanishing peers vanish"
    } else {
        ""
    };
    eprintln!(
        "[{label}] window open; hung peers hang{also} at +{:?}",
        plan.hang_after
    );
    // Bounded: one turn per 10 s of the window.
    while w0.elapsed() < length {
        let left = length.saturating_sub(w0.elapsed());
        std::thread::sleep(left.min(Duration::from_secs(10)));
        if w0.elapsed() < length {
            let secs = w0.elapsed().as_secs_f64();
            eprintln!("[{label}] {secs:.0} s of {} s", length.as_secs());
        }
    }
    let end = Snapshot::take(env, workers, peers)?;
    let length = w0.elapsed();
    for worker in workers.iter_mut() {
        worker.send(CMD_REPORT)?;
    }
    let mut reports = Vec::with_capacity(workers.len());
    for worker in workers.iter_mut() {
        let line = worker.expect(REPORT, &[], Duration::from_secs(30))?;
        reports.push(serde_json::from_str(&line).context("a worker's REPORT line")?);
    }
    drop(rule);
    Ok(Window {
        start,
        end,
        length,
        hang_ns,
        vanish,
        reports,
    })
}
