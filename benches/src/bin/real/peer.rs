//! `real peer`: the far end of one worker's connections, modelled on lull's own demo peer.
//!
//! One tokio-uring runtime, one listener per [`Role`], one task per accepted connection. The
//! peer behaves the same whichever strategy the worker runs, so its CPU is the same kind of
//! work in every run: answering the probes that strategy sends, and nothing else.

use std::{
    io::{BufRead, Write},
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Args;
use lull::clock::monotonic_ns;
use tokio_uring::net::TcpStream;

use lull_harness::process::raise_fd_limit;

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

struct State {
    /// `CLOCK_MONOTONIC` ns after which hung connections stop answering (`u64::MAX`: not yet
    /// told).
    hang_at: AtomicU64,
    accepted: AtomicU64,
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
        let listener = TcpListener::bind(SocketAddr::from((ip, 0)))
            .with_context(|| format!("binding a listener on {ip}"))?;
        // std listens with a backlog of 128, and a worker connects thousands in a row.
        // SAFETY: listen() on a socket we own; a second listen() only changes the backlog.
        unsafe { libc::listen(listener.as_raw_fd(), 4096) };
        listeners.push((role, listener));
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|(_, l)| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<_>>()?;
    println!("{PORTS} {}", addrs.join(" "));
    std::io::stdout().flush()?;

    let state = Arc::new(State {
        hang_at: AtomicU64::new(u64::MAX),
        accepted: AtomicU64::new(0),
    });
    {
        let state = state.clone();
        // Ends at EOF on stdin: the orchestrator is done (or gone), and so is this process.
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let mut words = line.split_whitespace();
                match (words.next(), words.next()) {
                    (Some(CMD_HANG), Some(at)) => {
                        if let Ok(at) = at.parse() {
                            state.hang_at.store(at, Ordering::Relaxed);
                        }
                    }
                    (Some(CMD_COUNT), _) => {
                        let n = state.accepted.load(Ordering::Relaxed);
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
            let state = state.clone();
            // Runs until the process exits (stdin EOF or the watchdog).
            accepts.push(tokio_uring::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        // Out of fds or memory: wait for it to pass rather than spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    state.accepted.fetch_add(1, Ordering::Relaxed);
                    tokio_uring::spawn(serve(stream, role, state.clone(), busy_every));
                }
            }));
        }
        for accept in accepts {
            let _ = accept.await;
        }
    });
    Ok(())
}

async fn serve(stream: TcpStream, role: Role, state: Arc<State>, busy_every: Duration) {
    let stream = std::rc::Rc::new(stream);
    match role {
        Role::Answering | Role::Vanishing => answer(&stream, None).await,
        Role::Hung => answer(&stream, Some(&state)).await,
        Role::Busy => {
            let writer = stream.clone();
            tokio::select! {
                () = answer(&stream, None) => {}
                // Ends when a write fails, i.e. with the connection.
                () = async move {
                    loop {
                        tokio::time::sleep(busy_every).await;
                        if writer.write_all(b"b".to_vec()).await.0.is_err() {
                            return;
                        }
                    }
                } => {}
            }
        }
    }
}

/// Answers every read with `+PONG\r\n` until the connection ends. A hung connection stops at
/// the first read after its hang instant: that read's bytes go unanswered, and the socket is
/// never read or written again, but stays open, so its kernel keeps ACKing.
async fn answer(stream: &TcpStream, hang: Option<&State>) {
    let mut buf = vec![0u8; 512];
    // Each turn is one read, and ends with the connection.
    loop {
        let (n, b) = stream.read(buf).await;
        buf = b;
        match n {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if let Some(state) = hang
            && monotonic_ns() >= state.hang_at.load(Ordering::Relaxed)
        {
            std::future::pending::<()>().await;
        }
        if stream.write_all(b"+PONG\r\n".to_vec()).await.0.is_err() {
            return;
        }
    }
}
