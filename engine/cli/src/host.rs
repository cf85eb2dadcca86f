//! `lull host`: keepalive policy and verdicts for services lull does not own.

mod metrics;

use std::{
    fs::OpenOptions,
    io::{self, Write},
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::{fs::OpenOptionsExt as _, net::UnixStream},
    },
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use clap::Args;
use lull::host::{Host, HostError, HostPaths, ReloadReport, Rules, StartReport, Verdict};
use serde::Serialize;

use crate::usage::UsageError;

/// Apply keepalive rules to services lull does not own, and report how their connections end.
///
/// A sock_ops program, attached to the cgroup each rule names, sets SO_KEEPALIVE,
/// TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT (and TCP_USER_TIMEOUT) on every matching connection
/// as it is established, and classifies its close: keepalive_timeout, user_timeout,
/// reset_by_peer, closed or local_abort. Connections that exist at start are picked up.
/// Runs until SIGINT or SIGTERM; SIGHUP re-reads the rule file. Everything stays pinned and
/// applied when lull stops (even on SIGKILL): `lull host --uninstall` takes it away.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// The rule file (TOML, `[[rule]]` tables).
    #[arg(long, value_name = "FILE", required_unless_present = "uninstall")]
    pub config: Option<PathBuf>,
    /// Write each verdict as a JSON line to FILE (appending), or to stdout with `-`.
    #[arg(long, value_name = "FILE|-")]
    pub events: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (a bare port binds 127.0.0.1).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Detach and remove everything host mode attached and pinned, then exit.
    #[arg(long, conflicts_with_all = ["config", "events", "metrics", "check"])]
    pub uninstall: bool,
    /// Check the rule file and exit (0 if it is valid, 2 if not).
    #[arg(long)]
    pub check: bool,
    /// Instance name: pins in /sys/fs/bpf/lull/NAME, lock in /run/lull/NAME.lock.
    #[arg(long, value_name = "NAME", default_value = "host")]
    pub instance: String,
}

#[derive(Serialize)]
struct EventLine<'a> {
    ts: String,
    verdict: &'static str,
    rule: &'a str,
    cookie: u64,
    local: String,
    peer: String,
    age_s: f64,
    picked_up: bool,
    sk_err: i32,
    old_state: &'static str,
    probes_out: u8,
    retransmits: u8,
    bytes_received: u64,
    bytes_acked: u64,
}

pub fn run(args: &HostArgs) -> Result<ExitCode> {
    let paths = HostPaths::new(&args.instance);
    if args.uninstall {
        let links = lull::host::uninstall(&paths)?;
        println!(
            "removed {} and {links} cgroup link(s); watched sockets keep their keepalive \
             options",
            paths.pins.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let config = args.config.clone().expect("clap requires --config");
    let rules = Rules::from_file(&config).map_err(rules_error)?;
    if args.check {
        println!("{}: {} rule(s), valid", config.display(), rules.rules.len());
        return Ok(ExitCode::SUCCESS);
    }
    let mut events = open_events(args.events.as_deref())?;
    let metrics = args
        .metrics
        .as_deref()
        .map(|addr| metrics::HostMetrics::serve(addr, &paths))
        .transpose()?;

    let (mut host, report) = Host::start(rules, &paths)?;
    log_start(&host, &report);
    release_startup_memory();

    let hup = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (wake_rx, wake_tx) = UnixStream::pair().context("socketpair for signals")?;
    wake_rx.set_nonblocking(true)?;
    for (signal, flag) in [
        (signal_hook::consts::SIGHUP, &hup),
        (signal_hook::consts::SIGINT, &stop),
        (signal_hook::consts::SIGTERM, &stop),
    ] {
        signal_hook::flag::register(signal, Arc::clone(flag))
            .context("installing signal handlers")?;
        signal_hook::low_level::pipe::register(signal, wake_tx.try_clone()?)
            .context("installing signal handlers")?;
    }
    let mut last_maintain = Instant::now();
    loop {
        let mut write_failed = None;
        host.drain(|v| {
            if let Some(m) = &metrics {
                m.observe(&v);
            }
            if let Some(out) = events.as_mut()
                && let Err(err) = write_event(out.as_mut(), &v)
            {
                write_failed = Some(err);
                return false;
            }
            true
        });
        if let Some(err) = write_failed {
            return Err(anyhow!(err).context("writing a verdict to --events"));
        }
        if stop.load(Ordering::Relaxed) {
            tracing::info!(
                "stopping; the rules stay applied and the verdicts wait in the kernel until \
                 the next start (`lull host --uninstall` removes everything)"
            );
            return Ok(ExitCode::SUCCESS);
        }
        if hup.swap(false, Ordering::Relaxed) {
            reload(&mut host, &config, metrics.as_ref());
        }
        if last_maintain.elapsed() >= Duration::from_secs(1) {
            last_maintain = Instant::now();
            match host.maintain() {
                Ok(Some(r)) => log_reload("a rule's cgroup changed; rules re-applied", &r),
                Ok(None) => {}
                Err(err) => tracing::warn!("re-applying rules after a cgroup change: {err}"),
            }
        }
        wait(&host, &wake_rx)?;
    }
}

/// Loading parsed the kernel's BTF (megabytes) twice; give the freed heap back to the system,
/// since the daemon then runs for months with a few kilobytes of its own.
fn release_startup_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn rules_error(err: lull::host::RulesError) -> anyhow::Error {
    // A bad rule file is bad input: exit code 2, one line.
    UsageError {
        field: "--config",
        message: err.to_string(),
    }
    .into()
}

fn reload(host: &mut Host, config: &std::path::Path, metrics: Option<&metrics::HostMetrics>) {
    let result = Rules::from_file(config)
        .map_err(HostError::from)
        .and_then(|rules| host.reload(rules));
    if let Some(m) = metrics {
        m.reloaded(result.is_ok());
    }
    match result {
        Ok(report) => log_reload(&format!("reloaded {}", config.display()), &report),
        Err(err) => tracing::error!("reload refused, the running rules stay in force: {err}"),
    }
}

/// Sleeps until a verdict arrives, a signal is caught, or a second passes.
fn wait(host: &Host, wake: &UnixStream) -> Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: host.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfds for the length given.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
    if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
        return Err(io::Error::last_os_error()).context("poll");
    }
    if fds[1].revents != 0 {
        let mut buf = [0u8; 64];
        while matches!(io::Read::read(&mut &*wake, &mut buf), Ok(n) if n > 0) {}
    }
    Ok(())
}

fn open_events(target: Option<&str>) -> Result<Option<Box<dyn Write>>> {
    Ok(match target {
        None => None,
        Some("-") => Some(Box::new(io::stdout())),
        Some(path) => Some(Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                // Verdicts name other processes' peers: not for everyone to read.
                .mode(0o600)
                .open(path)
                .with_context(|| format!("opening --events {path}"))?,
        )),
    })
}

/// One verdict, one `write`: a line is in the file before the kernel's copy is let go, so
/// a crash repeats at most the line being written, and never loses one.
fn write_event(out: &mut dyn Write, v: &Verdict) -> io::Result<()> {
    let line = EventLine {
        ts: humantime::format_rfc3339_millis(v.at).to_string(),
        verdict: v.kind.as_str(),
        rule: &v.rule,
        cookie: v.cookie,
        local: v.local.to_string(),
        peer: v.peer.to_string(),
        age_s: (v.age.as_secs_f64() * 1000.0).round() / 1000.0,
        picked_up: v.picked_up,
        sk_err: v.sk_err,
        old_state: v.old_state,
        probes_out: v.probes_out,
        retransmits: v.retransmits,
        bytes_received: v.bytes_received,
        bytes_acked: v.bytes_acked,
    };
    let mut text = serde_json::to_string(&line).map_err(io::Error::other)?;
    text.push('\n');
    out.write_all(text.as_bytes())?;
    out.flush()
}

fn log_start(host: &Host, report: &StartReport) {
    let rules = host.rules();
    tracing::info!(
        "lull host ({}) running: {} rule(s) from {}, {}; HZ={}",
        host.paths().instance,
        rules.rules.len(),
        rules.source.display(),
        if report.restarted {
            "restarted on the pinned state of the last run"
        } else {
            "fresh install"
        },
        report.hz
    );
    for (rule, n) in &report.lost {
        tracing::warn!(
            "rule {rule}: {n} verdict(s) lost in all (the ring buffer was full while nobody \
             read it); their connections are gone and cannot be named"
        );
    }
    log_pickup(host, &report.pickup);
}

fn log_reload(what: &str, report: &ReloadReport) {
    tracing::info!("{what}: {} new cgroup link(s)", report.links_made);
    for (rule, path) in &report.missing {
        tracing::warn!(
            "rule {rule}: cgroup {} does not exist now; the rule matches nothing until it does",
            path.display()
        );
    }
    if report.pickup.picked_total() + report.pickup.missed_total() > 0 {
        tracing::info!(
            "picked up {} more existing connection(s), missed {}",
            report.pickup.picked_total(),
            report.pickup.missed_total()
        );
    }
}

fn log_pickup(host: &Host, p: &lull::host::PickupReport) {
    let by_rule: Vec<String> = p
        .picked
        .iter()
        .map(|(slot, n)| format!("{}: {n}", host.rule_name(*slot)))
        .collect();
    tracing::info!(
        "existing connections: picked up {}{} in {} network namespace(s); missed {}",
        p.picked_total(),
        if by_rule.is_empty() {
            String::new()
        } else {
            format!(" ({})", by_rule.join(", "))
        },
        p.namespaces,
        p.missed_total()
    );
    for (why, n) in &p.missed {
        tracing::warn!("missed {n} existing connection(s): {why}");
    }
    for (ns, why) in &p.unreachable {
        tracing::warn!(
            "network namespace {} ({}) could not be searched: {why}",
            ns.inode,
            ns.path.display()
        );
    }
}
