//! One strategy in one mix, start to finish: peers up, memory read, workers up (and where
//! lull's programs run checked), memory read again, the measured window (with the hang and
//! the vanishing inside it), reports in, everything torn down.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    attachment::{Attachment, Programs},
    child::Kid,
    env::Environment,
    lull_engine,
    measured::{Measured, Memory, Outcome, Status},
    plan::Plan,
    proto::{
        ACCEPTED, CMD_COUNT, LullCounters, Mix, PORTS, READY, Ready, Role, Strategy, Tier,
        UNAVAILABLE, Verdict, role_of,
    },
    system::{Meminfo, SlabInfo},
    window::{self, Window},
};

pub fn strategy(plan: &Plan, env: &Environment, strategy: Strategy, mix: Mix) -> Outcome {
    let status = match measure(plan, env, strategy, mix) {
        Ok(status) => status,
        Err(err) => Status::Failed(format!("{err:#}")),
    };
    Outcome { strategy, status }
}

/// Starts the peer processes; returns them and their listeners, ready for `--targets`.
fn spawn_peers(
    plan: &Plan,
    env: &Environment,
    mix: Mix,
    lifetime: &str,
) -> Result<(Vec<Kid>, Vec<String>)> {
    let k = plan.processes();
    let (mut peers, mut targets) = (Vec::with_capacity(k), Vec::with_capacity(k));
    for i in 0..k {
        let args = [
            "peer".to_string(),
            format!("--index={i}"),
            format!(
                "--busy-every-ms={}",
                mix.busy_every(&plan.timing).as_millis()
            ),
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
    (strategy, mix): (Strategy, Mix),
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
            format!("--mix={}", mix.label()),
            format!("--first={first}"),
            format!("--conns={n}"),
            format!("--targets={target}"),
            format!("--idle-ms={}", plan.timing.idle_ms),
            format!("--interval-ms={}", plan.timing.interval_ms),
            format!("--count={}", plan.timing.count),
            format!("--spread-ms={}", plan.spread(strategy).as_millis()),
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

fn measure(plan: &Plan, env: &Environment, strategy: Strategy, mix: Mix) -> Result<Status> {
    let label = format!("{} {}", mix.label(), strategy.label());
    let label = label.as_str();
    let k = plan.processes();
    let length = plan.window(strategy);
    let lifetime = (plan.spread(strategy) + length + Duration::from_secs(300))
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
    let (mut peers, targets) = spawn_peers(plan, env, mix, &lifetime)?;
    std::thread::sleep(plan.settle);
    let (mem0, slab0) = (Meminfo::read()?, SlabInfo::read());
    eprintln!(
        "[{label}] starting {k} worker process(es), connecting over {:.1?}",
        plan.spread(strategy)
    );
    let mut workers = spawn_workers(plan, env, (strategy, mix), &targets, &lifetime)?;
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
    let attachment = match (&env.cgroup, strategy.uses_ebpf()) {
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

    let w = window::run(plan, env, label, length, (&mut workers, &mut peers))?;
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
            .map(|r| r.rss_after as i64 - r.rss_started as i64)
            .sum(),
        start_rss: {
            let n = readies.len().max(1) as f64;
            let sum = |f: fn(&Ready) -> f64| readies.iter().map(f).sum::<f64>() / n;
            (
                sum(|r| r.rss_started as f64 - r.rss_before as f64),
                sum(|r| r.shared_started as f64 - r.shared_before as f64),
            )
        },
    };
    let (start, end) = (&w.start, &w.end);
    let keepalives = end.tcp.keepalive.saturating_sub(start.tcp.keepalive);
    let own_probes = (strategy != Strategy::Kernel)
        .then(|| w.reports.iter().filter_map(|r| r.probes).sum::<u64>());
    let mut measured = Measured {
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
        probes: own_probes.unwrap_or(0)
            + if strategy.kernel_probes() {
                keepalives
            } else {
                0
            },
        own_probes,
        keepalives,
        segments: end.tcp.out_segs.saturating_sub(start.tcp.out_segs),
        drops: end.drops.saturating_sub(start.drops),
        wakeups: (
            end.wakeups.0.saturating_sub(start.wakeups.0),
            end.wakeups.1.saturating_sub(start.wakeups.1),
        ),
        hung_ms: Vec::new(),
        vanished_ms: Vec::new(),
        hung_tiers: [0; 2],
        vanished_tiers: [0; 2],
        repeated: [0; 3],
        wrongly_dead: 0,
        closed: w.reports.iter().map(|r| r.closed).sum(),
        revived: w.reports.iter().map(|r| r.revived).sum(),
        bounds: plan.bounds(strategy),
        lull: lull_counters(&w),
        nominal_period: strategy
            .is_lull()
            .then(|| lull_engine::policy(strategy, plan.timing).nominal_probe_period()),
        attachment,
        stale,
        memory,
        blackhole_ms: w.vanish.map(|(_, ms)| ms),
        cpu: w.cpu(&ours),
    };
    verdicts(&mut measured, &w, env.vanishing(), mix);
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

/// Sorts the workers' verdicts into hung and vanished peers (latency from the instant they
/// hung or vanished, tier for lull) and connections that should not have been reported. Only
/// a connection's first verdict counts; later ones are counted apart.
fn verdicts(m: &mut Measured, w: &Window, vanishing: bool, mix: Mix) {
    let mut all: Vec<&Verdict> = w.reports.iter().flat_map(|r| &r.dead).collect();
    all.sort_by_key(|v| v.at);
    let mut seen = HashSet::new();
    for v in all {
        if !seen.insert(v.global) {
            m.repeated[v.tier.map_or(2, Tier::index)] += 1;
            continue;
        }
        let since = |t: u64| v.at.saturating_sub(t) as f64 / 1e6;
        let tiers = match (role_of(v.global, vanishing, mix), w.vanish) {
            (Role::Hung, _) => {
                m.hung_ms.push(since(w.hang_ns));
                &mut m.hung_tiers
            }
            (Role::Vanishing, Some((at, _))) => {
                m.vanished_ms.push(since(at));
                &mut m.vanished_tiers
            }
            _ => {
                m.wrongly_dead += 1;
                continue;
            }
        };
        if let Some(tier) = v.tier {
            tiers[tier.index()] += 1;
        }
    }
}

/// lull's counters summed over the workers (`None` for the other strategies).
fn lull_counters(w: &Window) -> Option<LullCounters> {
    w.reports.iter().filter_map(|r| r.lull).reduce(|mut a, b| {
        a.add(&b);
        a
    })
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
