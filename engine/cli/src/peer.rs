//! `lull peer`: one process of the demo's peer population (started by `lull run`).
//!
//! It listens on one loopback port per [`Role`], prints the ports on stdout, and treats every
//! connection as its role and the shared [`Script`] say, on a tokio-uring runtime. It exits
//! when its stdin closes, so it never outlives the `lull run` that started it.

use std::{
    io::{Read, Write},
    process::ExitCode,
    rc::Rc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Args;
use lull_harness::{
    Behaviour, HangTrigger, UdpBehaviour, UdpPeer,
    peer::PONG,
    udp::{UDP_PROBE, UDP_REPLY},
};

use crate::schedule::{READY_PREFIX, Role, Script};

/// (internal) One process of the demo's peer population, started by `lull run`.
#[derive(Debug, Args)]
#[command(hide = true)]
pub struct PeerArgs {
    /// The script, as JSON.
    #[arg(long)]
    script: String,
}

pub fn run(args: &PeerArgs) -> Result<ExitCode> {
    let script: Script = serde_json::from_str(&args.script).context("--script")?;
    lull_harness::process::raise_fd_limit().context("reading RLIMIT_NOFILE")?;
    let mut listeners = Vec::new();
    for role in Role::ALL {
        // The engine opens thousands of connections at once: the listener's backlog is deep.
        let listener = lull_harness::socket::listener(([127, 0, 0, 1], 0).into())
            .context("binding a peer listener")?;
        listeners.push((role, listener));
    }
    // UDP flows: one socket per role, each peer a thread of its own; kept until exit.
    let udp: Vec<UdpPeer> = Role::UDP
        .iter()
        .map(|&role| {
            let socket = std::net::UdpSocket::bind(("127.0.0.1", 0))?;
            UdpPeer::start_on(socket, udp_behaviour(role, &script))
        })
        .collect::<std::io::Result<_>>()
        .context("binding a UDP peer")?;
    let mut ports: Vec<String> = listeners
        .iter()
        .map(|(_, l)| l.local_addr().map(|a| a.port().to_string()))
        .collect::<std::io::Result<_>>()?;
    ports.extend(udp.iter().map(|peer| peer.addr().port().to_string()));
    println!("{READY_PREFIX} {}", ports.join(" "));
    std::io::stdout().flush()?;

    // The parent holds our stdin: EOF means it is done (or gone), and so are we.
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });

    let script = Rc::new(script);
    tokio_uring::start(async move {
        let mut accepts = Vec::new();
        for (role, listener) in listeners {
            let listener = tokio_uring::net::TcpListener::from_std(listener);
            let script = script.clone();
            accepts.push(tokio_uring::spawn(async move {
                loop {
                    let Ok((stream, remote)) = listener.accept().await else {
                        // Out of fds or memory: wait for it to pass rather than spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let behaviour = behaviour(role, &script, remote.port());
                    tokio_uring::spawn(lull_harness::peer::serve(stream, behaviour, |_| {}));
                }
            }));
        }
        for accept in accepts {
            let _ = accept.await;
        }
    });
    drop(udp);
    Ok(ExitCode::SUCCESS)
}

/// What the UDP peer of `role` does with each flow (by its client port), by the script.
fn udp_behaviour(role: Role, script: &Script) -> UdpBehaviour {
    let answering = UdpBehaviour {
        probe: UDP_PROBE.to_vec(),
        reply: UDP_REPLY.to_vec(),
        busy_every: None,
        hang: None,
        // Thousands of flows for the whole run: no log.
        log: false,
    };
    match role {
        Role::Busy => UdpBehaviour {
            busy_every: Some(Duration::from_millis(script.busy_every_ms)),
            ..answering
        },
        Role::Hung => {
            let script = script.clone();
            UdpBehaviour {
                hang: Some(std::sync::Arc::new(move |port| {
                    Some(script.hang_after(port))
                })),
                ..answering
            }
        }
        Role::Answering | Role::Closing => answering,
    }
}

/// What the peer of the connection from client port `port` does, by its role and the script.
fn behaviour(role: Role, script: &Script, port: u16) -> Behaviour {
    match role {
        Role::Answering => Behaviour::Answer(PONG),
        Role::Busy => Behaviour::Busy {
            every: Duration::from_millis(script.busy_every_ms),
        },
        Role::Hung => Behaviour::Hang {
            trigger: HangTrigger::AfterAccept(script.hang_after(port)),
        },
        Role::Closing => Behaviour::Close {
            after: script.close_after(port),
            reset: Script::resets(port),
        },
    }
}
