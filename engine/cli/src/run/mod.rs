//! `lull run`: the demo (default) and `--connect`.

mod args;
mod cgroup;
mod config;
mod connect;
mod connect_udp;
mod datagrams;
mod demo;
mod report;
mod session;
mod tracker;

use std::{
    cell::Cell,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
    time::Instant,
};

use anyhow::{Context as _, Result};
use lull::{EngineBuilder, EngineGroup, SourceChoice};

pub use args::RunArgs;
use args::SourceArg;
use cgroup::RunCgroup;
use config::{Job, RunConfig};
use session::Session;

use crate::{metrics::Metrics, privileges, usage::usage};

/// Runs `lull run` to completion (or until SIGINT/SIGTERM).
pub fn run(args: RunArgs) -> Result<ExitCode> {
    let config = RunConfig::resolve(args)?;
    let limit = lull_harness::process::raise_fd_limit().context("reading RLIMIT_NOFILE")?;
    // Each connection (and each UDP flow) is one fd here; keep room for the engine, BPF
    // objects and the peers' pipes.
    let budget = limit.saturating_sub(256);
    let fds = u64::from(config.conns) + u64::from(config.side_udp_flows());
    if fds > budget {
        let udp = config.side_udp_flows();
        return Err(usage(
            "--conns",
            format!(
                "{} connections{} need more file descriptors than this process may hold \
                 (RLIMIT_NOFILE is {limit}); the most is {budget}",
                config.conns,
                if udp > 0 {
                    format!(" and {udp} UDP flows (--udp 0 for none)")
                } else {
                    String::new()
                }
            ),
        ));
    }
    let stop = stop_flag()?;
    let metrics = config
        .metrics
        .map(Metrics::serve)
        .transpose()
        .map_err(|e| usage("--metrics", format!("{e:#}")))?;

    // Before the engine: the cgroup its programs attach to is the one lull's sockets live in.
    let cgroup = RunCgroup::enter(config.cgroup.as_deref(), config.source)?;
    let engine = build_engine(&config, cgroup.as_ref())?;
    tracing::info!(
        "{} engine thread(s), activity source: {}",
        engine.len(),
        engine.source_kind()
    );
    if config.udp_policy.is_some() {
        // Attaching the egress program needs the privileges about to be dropped.
        let observer = engine.observe_datagrams();
        tracing::info!("UDP flows are seen by: {observer}");
    }
    if let Some(user) = &config.user {
        // Rows of the host's table are leased through lock files only root may make.
        engine
            .reserve()
            .context("leasing the eBPF table's rows before --user")?;
        privileges::drop_to(user).with_context(|| format!("--user {user}"))?;
    }
    let session = Session {
        config: &config,
        engine: &engine,
        stop: &stop,
        metrics: metrics.as_ref(),
        cgroup: cgroup.as_ref(),
        started: Cell::new(Instant::now()),
    };
    let report = match &config.job {
        Job::Demo(population) => demo::run(&session, *population)?,
        Job::Connect(target) => connect::run(&session, target)?,
    };
    // Detach the BPF programs (and leave our cgroup) before printing: the report is the last
    // word.
    engine.shutdown();
    drop(cgroup);
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

fn build_engine(config: &RunConfig, cgroup: Option<&RunCgroup>) -> Result<EngineGroup> {
    let mut engine = EngineBuilder::default()
        // Capacity per engine: room for every connection, reconnects included.
        .capacity((config.conns + config.side_udp_flows()).div_ceil(config.engines as u32) * 2 + 64)
        .tick(config.tick)
        .max_probes_per_tick(config.max_probes_per_tick)
        .source(match config.source {
            SourceArg::Auto => SourceChoice::Auto,
            SourceArg::Ebpf => SourceChoice::Ebpf,
            SourceArg::TcpInfo => SourceChoice::TcpInfo,
        });
    if let Some(cgroup) = cgroup {
        engine = engine.cgroup(cgroup.scope());
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
