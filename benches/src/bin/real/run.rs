//! One strategy, start to finish: peers up, memory read, workers up, memory read again, the
//! measured window (with the hang and the vanishing inside it), reports in, everything torn
//! down.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lull::clock::monotonic_ns;

use crate::{
    attachment::{Attachment, Programs},
    child::Kid,
    env::{Background, Environment},
    measured::{Cpu, Measured, Memory, Outcome, Status},
    plan::Plan,
    proto::{
        ACCEPTED, CMD_COUNT, CMD_HANG, CMD_MARK, CMD_REPORT, MARKED, PORTS, READY, REPORT, Ready,
        Report, Role, Strategy, UNAVAILABLE, role_of,
    },
    softirq::SoftirqTime,
    system::{
        CpuStat, Meminfo, ProcCpu, ProcScan, SlabInfo, TcpCounters, backlog_drops, blackhole,
        ticks_to_ms, wakeups,
    },
};

/// CPU and counters read at one end of the window.
struct Snapshot {
    cpu: CpuStat,
    scan: ProcScan,
    tcp: TcpCounters,
    drops: u64,
    softirq: Option<SoftirqTime>,
    /// Wakeups of the workers' and the peers' threads.
    wakeups: (u64, u64),
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

pub fn strategy(plan: &Plan, env: &Environment, strategy: Strategy) -> Outcome {
    let status = match measure(plan, env, strategy) {
        Ok(status) => status,
        Err(err) => Status::Failed(format!("{err:#}")),
    };
    Outcome { strategy, status }
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

/// Starts the peer processes; returns them and their listeners, ready for `--targets`.
fn spawn_peers(plan: &Plan, env: &Environment, lifetime: &str) -> Result<(Vec<Kid>, Vec<String>)> {
    let k = plan.processes();
    let (mut peers, mut targets) = (Vec::with_capacity(k), Vec::with_capacity(k));
    for i in 0..k {
        let args = [
            "peer".to_string(),
            format!("--index={i}"),
            format!("--busy-every-ms={}", plan.timing.idle_ms / 4),
            format!("--lifetime-secs={lifetime}"),
        ];
        let mut kid = env.spawn_peer(format!("peer {i}"), &args)?;
        let ports = kid.expect(PORTS, &[], Duration::from_secs(10))?;
        targets.push(ports.split_whitespace().collect::<Vec<_>>().join(","));
        peers.push(kid);
    }
    Ok((peers, targets))
}

/// Starts one worker per peer, sharing the connections out evenly.
fn spawn_workers(
    plan: &Plan,
    env: &Environment,
    strategy: Strategy,
    targets: &[String],
    lifetime: &str,
) -> Result<Vec<Kid>> {
    let k = targets.len() as u64;
    let mut workers = Vec::with_capacity(targets.len());
    let mut first = 0;
    for (i, target) in (0..).zip(targets) {
        let n = plan.conns / k + u64::from(i < plan.conns % k);
        let mut args = vec![
            "worker".to_string(),
            format!("--strategy={}", strategy.label()),
            format!("--first={first}"),
            format!("--conns={n}"),
            format!("--targets={target}"),
            format!("--idle-ms={}", plan.timing.idle_ms),
            format!("--interval-ms={}", plan.timing.interval_ms),
            format!("--count={}", plan.timing.count),
            format!("--spread-ms={}", plan.timing.idle_ms),
            format!("--lifetime-secs={lifetime}"),
        ];
        if env.vanishing() {
            args.push("--vanishing".into());
        }
        if let Some(tick) = plan.lull_tick {
            args.push(format!("--lull-tick-us={}", tick.as_micros()));
        }
        workers.push(env.spawn_worker(format!("{} worker {i}", strategy.label()), &args)?);
        first += n;
    }
    Ok(workers)
}

/// Waits for every worker's READY; `Err(reason)` inside if the strategy cannot run here.
fn wait_ready(label: &str, workers: &mut [Kid]) -> Result<std::result::Result<Vec<Ready>, String>> {
    let mut readies = Vec::with_capacity(workers.len());
    for worker in workers {
        let line = worker.expect(READY, &[UNAVAILABLE], Duration::from_secs(240))?;
        if let Some(why) = line.strip_prefix(UNAVAILABLE) {
            return Ok(Err(why.trim().to_string()));
        }
        let ready: Ready = serde_json::from_str(&line).context("a worker's READY line")?;
        let failed = match ready.failed {
            0 => String::new(),
            n => format!(", {n} failed"),
        };
        eprintln!(
            "[{label}] {}: {} connections{failed} ({})",
            worker.name, ready.conns, ready.detail
        );
        readies.push(ready);
    }
    Ok(Ok(readies))
}

/// What the window yields: both snapshots, its length, when the peers hung and vanished, and
/// the workers' reports.
struct Window {
    start: Snapshot,
    end: Snapshot,
    length: Duration,
    hang_ns: u64,
    /// When the vanishing peers vanished, and how long the firewall rule took to go in.
    vanish: Option<(u64, f64)>,
    reports: Vec<Report>,
}

fn window(
    plan: &Plan,
    env: &Environment,
    label: &str,
    workers: &mut [Kid],
    peers: &mut [Kid],
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
    while w0.elapsed() < plan.window {
        let left = plan.window.saturating_sub(w0.elapsed());
        std::thread::sleep(left.min(Duration::from_secs(10)));
        if w0.elapsed() < plan.window {
            let secs = w0.elapsed().as_secs_f64();
            eprintln!("[{label}] {secs:.0} s of {} s", plan.window.as_secs());
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

fn measure(plan: &Plan, env: &Environment, strategy: Strategy) -> Result<Status> {
    let label = strategy.label();
    let k = plan.processes();
    let lifetime = (plan.window + Duration::from_secs(300))
        .as_secs()
        .to_string();
    // Whatever is attached to the run's cgroup now was left by an earlier strategy, and
    // would run on this one's sockets too.
    let stale = match &env.cgroup {
        Ok(cgroup) => Programs::query(cgroup.path(), false)
            .ok()
            .filter(|p| p.count() > 0)
            .map(|p| p.describe()),
        Err(_) => None,
    };
    if let Some(stale) = &stale {
        eprintln!("[{label}] programs left attached to the run's cgroup: {stale}");
    }
    let t0 = Instant::now();
    eprintln!("[{label}] starting {k} peer process(es)");
    let (mut peers, targets) = spawn_peers(plan, env, &lifetime)?;
    std::thread::sleep(plan.settle);
    let (mem0, slab0) = (Meminfo::read()?, SlabInfo::read());
    eprintln!("[{label}] starting {k} worker process(es)");
    let mut workers = spawn_workers(plan, env, strategy, &targets, &lifetime)?;
    let readies = match wait_ready(label, &mut workers)? {
        Ok(readies) => readies,
        Err(why) => return Ok(Status::Unavailable(why)),
    };
    for (peer, ready) in peers.iter_mut().zip(&readies) {
        wait_accepted(peer, ready.conns)?;
    }
    let setup = t0.elapsed();
    let conns: u64 = readies.iter().map(|r| r.conns).sum();
    ensure!(conns > 0, "no connection could be opened");
    eprintln!("[{label}] {conns} connections up in {setup:.1?}");
    let attachment = match (&env.cgroup, strategy == Strategy::LullEbpf) {
        (Ok(cgroup), true) => {
            let read = Attachment::read(cgroup, workers.len()).map_err(|e| format!("{e:#}"));
            if let Ok(a) = &read {
                let shared = if a.shared() { "shared" } else { "NOT shared" };
                eprintln!("[{label}] lull's attachment {shared}: {}", a.describe());
            }
            Some(read)
        }
        _ => None,
    };
    std::thread::sleep(plan.settle);
    let (mem1, slab1) = (Meminfo::read()?, SlabInfo::read());

    let w = window(plan, env, label, &mut workers, &mut peers)?;
    eprintln!("[{label}] window closed; tearing down");
    for kid in workers.iter_mut().chain(peers.iter_mut()) {
        kid.finish(Duration::from_secs(10));
    }
    std::thread::sleep(plan.settle);

    let ours: HashSet<u32> = workers
        .iter()
        .chain(&peers)
        .map(|k| k.pid)
        .chain([std::process::id()])
        .collect();
    let (start, end) = (&w.start, &w.end);
    let cpu = Cpu {
        window_s: w.length.as_secs_f64(),
        background: Background::default(),
        whole: ticks_to_ms(end.cpu.busy_since(&start.cpu).0),
        others: ticks_to_ms(end.scan.others_since(&start.scan, &ours)),
        workers_user: sum_delta(&end.workers, &start.workers, |p| p.user),
        workers_sys: sum_delta(&end.workers, &start.workers, |p| p.system),
        peers_user: sum_delta(&end.peers, &start.peers, |p| p.user),
        peers_sys: sum_delta(&end.peers, &start.peers, |p| p.system),
        orchestrator: sum_delta(&[end.me], &[start.me], |p| p.user + p.system + p.children),
        softirq: start.softirq.zip(end.softirq).map(|(a, b)| b.ms_since(&a)),
    };
    let keepalives = end.tcp.keepalive.saturating_sub(start.tcp.keepalive);
    let probes = match strategy {
        Strategy::Kernel => keepalives,
        _ => w.reports.iter().filter_map(|r| r.probes).sum(),
    };
    let (mut hung_ms, mut vanished_ms, mut wrongly_dead) = (Vec::new(), Vec::new(), 0);
    for &(global, at) in w.reports.iter().flat_map(|r| &r.dead) {
        let since = |t: u64| at.saturating_sub(t) as f64 / 1e6;
        match (role_of(global, env.vanishing()), w.vanish) {
            (Role::Hung, _) => hung_ms.push(since(w.hang_ns)),
            (Role::Vanishing, Some((at, _))) => vanished_ms.push(since(at)),
            _ => wrongly_dead += 1,
        }
    }
    let mut roles = [0u64; 4];
    for ready in &readies {
        for (total, n) in roles.iter_mut().zip(ready.roles) {
            *total += n;
        }
    }
    let growth =
        (slab0.available() && slab1.available()).then(|| slab1.growth_since(&slab0, conns, 5));
    let memory = Memory {
        slab: mem1.slab as i64 - mem0.slab as i64,
        unreclaimable: mem1.unreclaimable as i64 - mem0.unreclaimable as i64,
        objects: growth.as_ref().map(|g| (g.total, g.sockets)),
        top: growth.map(|g| g.top).unwrap_or_default(),
        rss: readies
            .iter()
            .map(|r| r.rss_after as i64 - r.rss_before as i64)
            .sum(),
    };
    let measured = Measured {
        processes: k,
        conns,
        failed: readies.iter().map(|r| r.failed).sum(),
        roles,
        detail: readies
            .first()
            .map(|r| r.detail.clone())
            .unwrap_or_default(),
        setup,
        window: w.length,
        probes,
        keepalives,
        segments: end.tcp.out_segs.saturating_sub(start.tcp.out_segs),
        drops: end.drops.saturating_sub(start.drops),
        wakeups: (
            end.wakeups.0.saturating_sub(start.wakeups.0),
            end.wakeups.1.saturating_sub(start.wakeups.1),
        ),
        hung_ms,
        vanished_ms,
        wrongly_dead,
        closed: w.reports.iter().map(|r| r.closed).sum(),
        revived: w.reports.iter().map(|r| r.revived).sum(),
        memory,
        blackhole_ms: w.vanish.map(|(_, ms)| ms),
        attachment,
        stale,
        cpu,
    };
    eprintln!(
        "[{label}] {} probes, {:.0} ms in the run's processes, hung caught {}/{}, vanished caught \
         {}/{}",
        measured.probes,
        measured.cpu.processes(),
        measured.hung_ms.len(),
        roles[Role::Hung.index()],
        measured.vanished_ms.len(),
        roles[Role::Vanishing.index()],
    );
    Ok(Status::Ran(Box::new(measured)))
}

/// Waits until the peer has accepted every connection its worker opened, so the memory
/// reading includes the peer's side of each.
fn wait_accepted(peer: &mut Kid, want: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut have = 0;
    while Instant::now() < deadline {
        peer.send(CMD_COUNT)?;
        have = peer
            .expect(ACCEPTED, &[], Duration::from_secs(10))?
            .parse()
            .context("an ACCEPTED line")?;
        if have >= want {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{} accepted {have} of {want} connections", peer.name)
}
