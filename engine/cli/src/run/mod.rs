//! `lull run`: the demo (default) and `--connect`.

mod connect;
mod demo;
mod options;
mod report;
mod tracker;

use std::{
    cell::Cell,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lull::{EngineBuilder, EngineGroup, SourceChoice};

pub use options::RunArgs;
use options::{Job, RunConfig, SourceArg};

use crate::{metrics::Metrics, privileges, usage};

/// Runs `lull run` to completion (or until SIGINT/SIGTERM).
pub fn run(args: RunArgs) -> Result<ExitCode> {
    let config = args.resolve()?;
    let limit = raise_fd_limit();
    // Each connection is one fd here; keep room for the engine, BPF objects and the peers' pipes.
    let budget = limit.saturating_sub(256);
    if u64::from(config.conns) > budget {
        return Err(usage(
            "--conns",
            format!(
                "{} connections need more file descriptors than this process may hold \
                 (RLIMIT_NOFILE is {limit}); the most is {budget}",
                config.conns
            ),
        ));
    }
    let stop = stop_flag()?;
    let metrics = config
        .metrics
        .map(Metrics::serve)
        .transpose()
        .map_err(|e| usage("--metrics", format!("{e:#}")))?;

    let engine = build_engine(&config)?;
    tracing::info!(
        "{} engine thread(s), activity source: {}",
        engine.len(),
        engine.source_kind()
    );
    if let Some(user) = &config.user {
        privileges::drop_to(user).with_context(|| format!("--user {user}"))?;
    }
    let run = Run {
        config: &config,
        engine: &engine,
        stop: &stop,
        metrics: metrics.as_ref(),
        started: Cell::new(Instant::now()),
    };
    let report = match &config.job {
        Job::Demo(population) => demo::run(&run, *population)?,
        Job::Connect(target) => connect::run(&run, target)?,
    };
    // Detach the BPF programs before printing: the report is the last word.
    engine.shutdown();
    print!("{}", report.to_table());
    if let Some(path) = &config.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.mismatches.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// What the jobs share.
pub struct Run<'a> {
    pub config: &'a RunConfig,
    pub engine: &'a EngineGroup,
    pub stop: &'a AtomicBool,
    pub metrics: Option<&'a Metrics>,
    /// When the timed part of the run began (after the connections were set up).
    pub started: Cell<Instant>,
}

impl Run<'_> {
    /// Whether the run should end: its duration is over or a signal arrived.
    pub fn over(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            || self.config.duration.is_some_and(|d| self.elapsed() >= d)
    }

    /// Starts the run's clock now: `--duration` counts from here.
    pub fn restart(&self) {
        self.started.set(Instant::now());
    }

    /// Time since the run's clock started.
    pub fn elapsed(&self) -> Duration {
        self.started.get().elapsed()
    }

    /// Whether a signal ended the run early.
    pub fn interrupted(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn build_engine(config: &RunConfig) -> Result<EngineGroup> {
    let mut engine = EngineBuilder::default()
        // Capacity per engine: room for every connection, reconnects included.
        .capacity(config.conns.div_ceil(config.engines as u32) * 2 + 64)
        .tick(config.tick)
        .max_probes_per_tick(config.max_probes_per_tick)
        .source(match config.source {
            SourceArg::Auto => SourceChoice::Auto,
            SourceArg::Ebpf => SourceChoice::Ebpf,
            SourceArg::TcpInfo => SourceChoice::TcpInfo,
        });
    if let Some(cgroup) = &config.cgroup {
        engine = engine.cgroup(cgroup);
    }
    EngineGroup::builder()
        .engines(config.engines)
        .engine(engine)
        .build()
        .map_err(|e| match e {
            lull::EngineError::Option { field, why } => usage(option_flag(field), why),
            other => anyhow::Error::new(other).context("starting the engine"),
        })
}

fn option_flag(field: &str) -> &'static str {
    match field {
        "tick" => "--tick",
        "max_probes_per_tick" => "--max-probes-per-tick",
        "engines" => "--engines",
        _ => "--conns",
    }
}

/// A flag set by SIGINT and SIGTERM; the run ends at its next check, cleanly.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing a signal handler")?;
    }
    Ok(stop)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer; setrlimit with values the kernel just gave us.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// This process's resident memory, in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    pages * page
}

/// Feeds the engine's events to the tracker and the metrics: waits up to `wait` for the first,
/// then takes whatever else is queued. Returns the events, for jobs that act on them.
pub fn pump_events(
    run: &Run<'_>,
    tracker: &mut tracker::Tracker,
    wait: Duration,
) -> Vec<lull::Event> {
    let events = run.engine.events();
    let mut got = Vec::new();
    if let Ok(first) = events.recv_timeout(wait) {
        got.push(first);
    }
    got.extend(events.try_iter());
    let now = Instant::now();
    for event in &got {
        let latency = tracker.on_event(event, now);
        if let (Some(metrics), Some(latency)) = (run.metrics, latency) {
            metrics.observe_detection(latency);
        }
    }
    if let Some(metrics) = run.metrics {
        metrics.update(&run.engine.stats());
    }
    got
}
