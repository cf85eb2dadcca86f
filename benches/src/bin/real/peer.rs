//! `real peer`: the far end of one worker's connections, modelled on lull's own demo peer.
//!
//! One tokio-uring runtime, one listener per [`Role`], one task per accepted connection,
//! served as lull-harness's [`serve`] does for the role's [`Behaviour`]: the same answering,
//! busy and hung peers the tests and the demo use. The peer behaves the same whichever
//! strategy the worker runs, so its CPU is the same kind of work in every run: answering the
//! probes that strategy sends, and nothing else.

use std::{
    io::{BufRead, Write},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Args;
use lull_harness::{
    peer::{Behaviour, HangTrigger, PONG, serve},
    process::raise_fd_limit,
    socket::listener,
};

use crate::{
    proto::{ACCEPTED, CMD_COUNT, CMD_HANG, PORTS, Role, peer_address, vanish_address},
    system::watchdog,
};

/// (internal) The far end of one worker's connections.
#[derive(Debug, Args)]
pub struct PeerArgs {
    /// Which peer this is (picks its loopback addresses).
    #[arg(long)]
    index: usize,
    /// How often a busy connection sends a byte, in ms.
    #[arg(long)]
    busy_every_ms: u64,
    /// Exit after this many seconds whatever happens.
    #[arg(long)]
    lifetime_secs: u64,
}

pub fn run(args: &PeerArgs) -> Result<()> {
    raise_fd_limit().context("raising the peer's fd limit")?;
    watchdog(args.lifetime_secs);
    let mut listeners = Vec::new();
    for role in Role::ALL {
        let ip = match role {
            Role::Vanishing => vanish_address(args.index),
            _ => peer_address(args.index),
        };
        // A deep backlog: a worker connects thousands in a row.
        let listener = listener(SocketAddr::from((ip, 0)))
            .with_context(|| format!("binding a listener on {ip}"))?;
        listeners.push((role, listener));
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|(_, l)| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<_>>()?;
    println!("{PORTS} {}", addrs.join(" "));
    std::io::stdout().flush()?;

    // `CLOCK_MONOTONIC` ns after which hung connections stop answering (`u64::MAX`: not yet
    // told), shared with every hung connection's trigger; and connections accepted.
    let hang_at = Arc::new(AtomicU64::new(u64::MAX));
    let accepted = Arc::new(AtomicU64::new(0));
    {
        let (hang_at, accepted) = (hang_at.clone(), accepted.clone());
        // Ends at EOF on stdin: the orchestrator is done (or gone), and so is this process.
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let mut words = line.split_whitespace();
                match (words.next(), words.next()) {
                    (Some(CMD_HANG), Some(at)) => {
                        if let Ok(at) = at.parse() {
                            hang_at.store(at, Ordering::Relaxed);
                        }
                    }
                    (Some(CMD_COUNT), _) => {
                        let n = accepted.load(Ordering::Relaxed);
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "{ACCEPTED} {n}").and_then(|()| out.flush());
                    }
                    _ => {}
                }
            }
            std::process::exit(0);
        });
    }

    let busy_every = Duration::from_millis(args.busy_every_ms.max(1));
    tokio_uring::start(async move {
        let mut accepts = Vec::new();
        for (role, listener) in listeners {
            let listener = tokio_uring::net::TcpListener::from_std(listener);
            let accepted = accepted.clone();
            let behaviour = match role {
                Role::Answering | Role::Vanishing => Behaviour::Answer(PONG),
                Role::Hung => Behaviour::Hang {
                    trigger: HangTrigger::At(hang_at.clone()),
                },
                Role::Busy => Behaviour::Busy { every: busy_every },
            };
            // Runs until the process exits (stdin EOF or the watchdog).
            accepts.push(tokio_uring::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        // Out of fds or memory: wait for it to pass rather than spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    tokio_uring::spawn(serve(stream, behaviour.clone(), |_| {}));
                }
            }));
        }
        for accept in accepts {
            let _ = accept.await;
        }
    });
    Ok(())
}
