//! `lull peer`: one process of the demo's peer population (started by `lull run`).
//!
//! It listens on one loopback port per [`Role`], prints the ports on stdout, and treats every
//! connection as its role and the shared [`Script`] say, on a tokio-uring runtime. It exits
//! when its stdin closes, so it never outlives the `lull run` that started it.

use std::{
    io::{Read, Write},
    net::TcpListener,
    os::fd::AsRawFd,
    process::ExitCode,
    rc::Rc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Args;
use tokio_uring::net::TcpStream;

use crate::schedule::{Role, Script};

/// (internal) One process of the demo's peer population, started by `lull run`.
#[derive(Debug, Args)]
#[command(hide = true)]
pub struct PeerArgs {
    /// The script, as JSON.
    #[arg(long)]
    script: String,
}

/// The line a peer process prints once it listens: `PORTS <answering> <busy> <hung> <closing>`.
pub const READY_PREFIX: &str = "PORTS";

pub fn run(args: &PeerArgs) -> Result<ExitCode> {
    let script: Script = serde_json::from_str(&args.script).context("--script")?;
    crate::run::raise_fd_limit();
    let mut listeners = Vec::new();
    for role in Role::ALL {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a peer listener")?;
        // std listens with a backlog of 128; the engine opens thousands of connections at once.
        // SAFETY: listen() on a socket we own; a second listen() only changes the backlog.
        unsafe { libc::listen(listener.as_raw_fd(), 4096) };
        listeners.push((role, listener));
    }
    let ports: Vec<String> = listeners
        .iter()
        .map(|(_, l)| l.local_addr().map(|a| a.port().to_string()))
        .collect::<std::io::Result<_>>()?;
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
                        continue;
                    };
                    tokio_uring::spawn(serve(stream, remote.port(), role, script.clone()));
                }
            }));
        }
        for accept in accepts {
            let _ = accept.await;
        }
    });
    Ok(ExitCode::SUCCESS)
}

async fn serve(stream: TcpStream, port: u16, role: Role, script: Rc<Script>) {
    let stream = Rc::new(stream);
    match role {
        Role::Answering => answer(&stream).await,
        Role::Busy => {
            let writer = stream.clone();
            let every = Duration::from_millis(script.busy_every_ms);
            tokio::select! {
                () = answer(&stream) => {}
                () = async move {
                    loop {
                        tokio::time::sleep(every).await;
                        if writer.write_all(b"b".to_vec()).await.0.is_err() {
                            return;
                        }
                    }
                } => {}
            }
        }
        Role::Hung => {
            tokio::select! {
                () = answer(&stream) => return,
                () = tokio::time::sleep(script.hang_after(port)) => {}
            }
            // Hung: the socket stays open, nothing is read or written, the kernel keeps ACKing.
            std::future::pending::<()>().await;
        }
        Role::Closing => {
            tokio::select! {
                () = answer(&stream) => return,
                () = tokio::time::sleep(script.close_after(port)) => {}
            }
            if Script::resets(port) {
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: a valid option pointer of the declared size, on our socket.
                unsafe {
                    libc::setsockopt(
                        stream.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&raw const linger).cast(),
                        size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
            }
        }
    }
}

/// Answers every read with `+PONG`, until the connection ends.
async fn answer(stream: &TcpStream) {
    let mut buf = vec![0u8; 1024];
    loop {
        let (n, b) = stream.read(buf).await;
        buf = b;
        match n {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if stream.write_all(b"+PONG\r\n".to_vec()).await.0.is_err() {
            return;
        }
    }
}
