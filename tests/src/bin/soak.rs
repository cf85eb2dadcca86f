//! The churn soak (`cargo xtask soak --minutes N`): thousands of connections opened, watched,
//! probed and dropped continuously, some of them closed by their peers, for N minutes. At the
//! end everything is dropped and nothing may be left: no slot, no fd, no registered BPF row,
//! and no steady growth of resident memory.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use lull::{Engine, Policy, SourceChoice, activity::SourceKind};
use lull_harness::{Behaviour, PeerServer, peer::PONG, process::rss_bytes};
use lull_tests::{REQUIRE_EBPF, ebpf_required, source_kept, wait_until};

/// Slots of the soaked engine.
const CAPACITY: u32 = 16_384;

/// Churn connections through an engine for a while and check that nothing leaks.
#[derive(Parser)]
struct Args {
    /// How long to churn.
    #[arg(long, default_value_t = 1.0)]
    minutes: f64,
    /// Connections alive at any moment (roughly).
    #[arg(long, default_value_t = 3_000)]
    live: usize,
    /// Write the figures here as JSON too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    let source = match Engine::builder()
        .capacity(CAPACITY)
        .source(SourceChoice::Ebpf)
        .build()
    {
        Ok(engine) => engine,
        Err(err) if !ebpf_required() => {
            eprintln!(
                "soak: eBPF unavailable ({err}); soaking the TCP_INFO source ({REQUIRE_EBPF}=1 makes this an error)"
            );
            Engine::builder()
                .capacity(CAPACITY)
                .source(SourceChoice::TcpInfo)
                .build()?
        }
        Err(err) => bail!("eBPF is required ({REQUIRE_EBPF}=1) but unavailable: {err}"),
    };
    let engine = Arc::new(source);
    let started_on = engine.source_kind();
    let answering = PeerServer::start_unlogged(Behaviour::Answer(PONG));
    let closing = PeerServer::start_unlogged(Behaviour::Close {
        after: Duration::from_millis(150),
        reset: false,
    });
    let resetting = PeerServer::start_unlogged(Behaviour::Close {
        after: Duration::from_millis(250),
        reset: true,
    });
    // Reads and never answers: dead to lull, yet it notices the client closing, so its end of
    // the connection does not outlive ours (a truly silent peer would hold it forever).
    let silent = PeerServer::start_unlogged(Behaviour::Count);
    let policy = Policy::detect_dead(Duration::from_millis(100), Duration::from_millis(50), 2);

    // Events must be read, or the channel fills and they are dropped (and counted).
    let events = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (engine, events, stop) = (engine.clone(), events.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if engine
                    .events()
                    .recv_timeout(Duration::from_millis(50))
                    .is_ok()
                {
                    events.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let (fds_before, _) = open_fds().context("counting open fds")?;
    let started = Instant::now();
    let cycles = Arc::new(AtomicU64::new(0));
    eprintln!(
        "soak: churning ~{} live connections for {duration:?} on {}",
        args.live,
        engine.source_kind()
    );
    let mut rss_samples = Vec::new();
    std::thread::scope(|scope| -> Result<()> {
        let workers = 3;
        for w in 0..workers {
            let (engine, policy, cycles) = (&engine, &policy, &cycles);
            let peers = [&answering, &closing, &resetting, &silent];
            let per_worker = args.live / workers;
            scope.spawn(move || -> Result<()> {
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ w as u64;
                let mut live: Vec<(Instant, lull::Watched<std::net::TcpStream>)> = Vec::new();
                while started.elapsed() < duration {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if live.len() < per_worker {
                        let peer = peers[(rng % 10).min(3) as usize];
                        let (stream, _) = peer.connect_one();
                        // A peer may close before the watch: that refusal is expected.
                        if let Ok(watched) = engine.watch(stream, policy) {
                            let lifetime = Duration::from_millis(50 + rng % 950);
                            live.push((Instant::now() + lifetime, watched));
                        }
                    }
                    let now = Instant::now();
                    let before = live.len();
                    live.retain(|(until, _)| *until > now);
                    cycles.fetch_add((before - live.len()) as u64, Ordering::Relaxed);
                    if live.len() >= per_worker {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                Ok(())
            });
        }
        // Resident memory after warm-up and then at intervals: a leak is a steady climb.
        let mut next = started + duration / 4;
        while started.elapsed() < duration {
            std::thread::sleep(Duration::from_millis(200));
            if Instant::now() >= next {
                rss_samples.push(rss_bytes().context("reading resident memory")?);
                eprintln!(
                    "soak: {:>5.1}s {} watch/drop cycles, {} watched, rss {:.1} MiB",
                    started.elapsed().as_secs_f64(),
                    cycles.load(Ordering::Relaxed),
                    engine.stats().watched,
                    *rss_samples.last().unwrap() as f64 / 1048576.0
                );
                next += duration / 4;
            }
        }
        Ok(())
    })?;

    // Everything is dropped now: let the engine process the drops, then count what is left.
    let settled = wait_until(Duration::from_secs(10), || {
        engine.slots_in_use() == 0 && engine.stats().watched == 0
    });
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("event reader");
    let stats = engine.stats();
    let slots_leaked = engine.slots_in_use();
    let rows_leaked = engine.source().registered_rows();
    // The peers' ends close once they read EOF; give them a moment.
    let fds_settled = wait_until(Duration::from_secs(5), || {
        open_fds().is_ok_and(|(n, _)| n <= fds_before)
    });
    let (fds_now, extent_leases) = open_fds().context("counting open fds")?;
    let fds_leaked = fds_now.saturating_sub(fds_before);
    if fds_leaked > 0 {
        for fd in std::fs::read_dir("/proc/self/fd")
            .into_iter()
            .flatten()
            .flatten()
        {
            eprintln!(
                "soak: open fd {:?} -> {:?}",
                fd.file_name(),
                std::fs::read_link(fd.path())
            );
        }
    }
    let growth = match (rss_samples.first(), rss_samples.last()) {
        (Some(first), Some(last)) => *last as i64 - *first as i64,
        _ => 0,
    };
    let report = serde_json::json!({
        "minutes": args.minutes,
        "source": engine.source_kind().to_string(),
        "watch_drop_cycles": cycles.load(Ordering::Relaxed),
        "probes_sent": stats.probes_sent,
        "dead": stats.dead,
        "closed": stats.closed,
        "events_read": events.load(Ordering::Relaxed),
        "events_dropped": stats.events_dropped,
        "rss_growth_bytes": growth,
        "rss_samples": rss_samples,
        "slots_leaked": slots_leaked,
        "fds_leaked": fds_leaked,
        "extent_leases_held": extent_leases,
        "bpf_rows_leaked": rows_leaked,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| path.display().to_string())?;
    }
    let mut problems = Vec::new();
    if !settled || slots_leaked != 0 {
        problems.push(format!("{slots_leaked} slots leaked"));
    }
    if !fds_settled || fds_leaked != 0 {
        problems.push(format!("{fds_leaked} fds leaked"));
    }
    // The engine falls back to TCP_INFO if its programs go away: the soak would then have
    // churned the fallback, and a table the engine no longer has reports no rows, which must
    // not read as zero leaked.
    if let Err(why) = source_kept(&engine, started_on) {
        problems.push(why);
    }
    if started_on == SourceKind::Ebpf && rows_leaked.is_none() {
        problems.push("the eBPF source reported no rows to count".into());
    }
    // Extents stay leased until the engine drops, by design, so they are not leaks; but more
    // of them than its capacity needs would be.
    let extents_needed = CAPACITY.div_ceil(lull::activity::EXTENT_ROWS) as usize;
    if extent_leases > extents_needed {
        problems.push(format!(
            "{extent_leases} extent leases held, more than the {extents_needed} a capacity of \
             {CAPACITY} needs"
        ));
    }
    if rows_leaked.unwrap_or(0) != 0 {
        problems.push(format!("{rows_leaked:?} BPF rows still registered"));
    }
    // The allocator and the kernel's socket buffers make resident memory wobble; a leak of one
    // allocation per cycle would show as megabytes over this many cycles.
    if growth > 4 << 20 {
        problems.push(format!(
            "resident memory grew by {growth} bytes in steady state"
        ));
    }
    if stats.probes_sent == 0 || stats.dead == 0 || stats.closed == 0 {
        problems.push(format!(
            "the soak did not exercise probes, deaths and closes: {stats:?}"
        ));
    }
    if !problems.is_empty() {
        bail!("soak failed: {}", problems.join("; "));
    }
    eprintln!("soak: no leaks");
    Ok(())
}

/// Open fds of this process, and how many of them are lease locks on extents of the shared
/// activity table (held from first use until the engine drops, so not counted as open).
fn open_fds() -> Result<(usize, usize)> {
    let (mut open, mut leases) = (0, 0);
    for fd in std::fs::read_dir("/proc/self/fd").context("listing /proc/self/fd")? {
        let target = std::fs::read_link(fd?.path()).unwrap_or_default();
        if target.starts_with("/run/lull/")
            && target.parent().is_some_and(|p| p.ends_with("extents"))
        {
            leases += 1;
        } else {
            open += 1;
        }
    }
    Ok((open, leases))
}
