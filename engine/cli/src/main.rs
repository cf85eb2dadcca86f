//! `lull`: keep idle TCP connections alive and find dead peers, with the kernel's help.
//!
//! With no arguments it runs `lull run`: a self-contained demonstration that holds 10,000
//! loopback connections to a known mix of peers (busy, answering, hung, closing) and reports
//! what the engine found. `lull run --connect HOST:PORT` keeps a real server's connections
//! alive instead, and `--connect udp://HOST:PORT` UDP flows to a peer.

mod check;
mod host;
mod ls;
mod metrics;
mod peer;
mod privileges;
mod run;
mod schedule;
mod usage;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use usage::UsageError;

/// Keep idle TCP connections alive and find dead peers, with the kernel's help.
///
/// An eBPF program records when each watched socket last carried payload; one lazy timer per
/// connection reads that record and probes only connections that really were idle. Without
/// root (or without a built BPF object) lull falls back to TCP_INFO and says so. UDP flows are
/// kept warm (a datagram only after an interval with nothing sent) and watched for dead peers
/// too: `lull run --connect udp://HOST:PORT`.
#[derive(Debug, Parser)]
#[command(name = "lull", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(Box<run::RunArgs>),
    Check(check::CheckArgs),
    Peer(peer::PeerArgs),
    Host(Box<host::HostArgs>),
    Ls(ls::LsArgs),
}

fn init_logging() {
    // `RUST_LOG` decides; the default shows lull's own notices, such as which activity
    // source is in use. The `log` bridge carries the kernel side's aya-log records too.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        None => run::run(run::RunArgs::default()),
        Some(Command::Run(args)) => run::run(*args),
        Some(Command::Check(args)) => check::run(&args),
        Some(Command::Peer(args)) => peer::run(&args),
        Some(Command::Host(args)) => host::run(&args),
        Some(Command::Ls(args)) => ls::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            if let Some(bad) = err.downcast_ref::<UsageError>() {
                eprintln!("error: {bad}");
                ExitCode::from(2)
            } else {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        }
    }
}
