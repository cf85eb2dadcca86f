//! The naive engine most applications write: a current-thread tokio runtime (one core's worth,
//! like one lull engine) with a task per connection that reads with a `tokio::time::sleep`
//! beside it, resets the sleep on every read, and on expiry sends lull's Redis `PING` and waits
//! `interval` for any reply, `count` times, before calling the peer dead.

use std::{
    net::TcpStream as StdStream,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use lull::{Payload, clock::monotonic_ns};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    runtime::Runtime,
    time::{Instant, sleep, sleep_until},
};

use crate::{
    proto::{Report, Role, Timing, Verdict},
    running::Running,
};

/// lull's probe, byte for byte, so that both engines send the same.
static PROBE: LazyLock<Payload> = LazyLock::new(Payload::redis_ping);

#[derive(Default)]
struct Shared {
    probes: AtomicU64,
    closed: AtomicU64,
    dead: Mutex<Vec<Verdict>>,
    /// Sockets of dead peers, kept open like lull's (it only reports) and the kernel's.
    graveyard: Mutex<Vec<TcpStream>>,
}

pub struct TokioRun {
    runtime: Runtime,
    timing: Timing,
    shared: Arc<Shared>,
}

impl TokioRun {
    pub fn new(timing: Timing) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the tokio runtime")?;
        Ok(Self {
            runtime,
            timing,
            shared: Arc::new(Shared::default()),
        })
    }
}

/// One connection's keepalive. Each turn of the loop is a read or a probe round, and the
/// loop ends with the connection (or the process).
async fn keepalive(
    mut stream: TcpStream,
    global: u64,
    timing: Timing,
    shared: Arc<Shared>,
    opened: Instant,
) {
    let (idle, interval) = (timing.idle(), timing.interval());
    let probe = PROBE.as_bytes();
    let mut buf = [0u8; 256];
    // From the moment the connection opened, not from the task's first poll, which waits
    // for the runtime's next turn.
    let timer = sleep_until(opened + idle);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    shared.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                timer.as_mut().reset(Instant::now() + idle);
                continue;
            }
            () = &mut timer => {}
        }
        let mut answered = false;
        for _ in 0..timing.count {
            if stream.write_all(probe).await.is_err() {
                shared.closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            shared.probes.fetch_add(1, Ordering::Relaxed);
            timer.as_mut().reset(Instant::now() + interval);
            tokio::select! {
                read = stream.read(&mut buf) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        shared.closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    answered = true;
                }
                () = &mut timer => {}
            }
            if answered {
                break;
            }
        }
        if !answered {
            let now = monotonic_ns();
            shared.dead.lock().unwrap().push(Verdict {
                global,
                at: now,
                tier: None,
            });
            shared.graveyard.lock().unwrap().push(stream);
            return;
        }
        timer.as_mut().reset(Instant::now() + idle);
    }
}

impl Running for TokioRun {
    fn add(&mut self, global: u64, _role: Role, stream: StdStream) -> Result<()> {
        stream.set_nonblocking(true)?;
        // Registering with the reactor needs the runtime's context.
        let _guard = self.runtime.enter();
        let stream = TcpStream::from_std(stream).context("registering a socket")?;
        let task = keepalive(
            stream,
            global,
            self.timing,
            self.shared.clone(),
            Instant::now(),
        );
        self.runtime.spawn(task);
        Ok(())
    }

    fn poll(&mut self, wait: Duration) -> Result<()> {
        // A current-thread runtime only runs inside `block_on`: this is where the tasks work.
        self.runtime.block_on(async { sleep(wait).await });
        Ok(())
    }

    fn probes(&self) -> Option<u64> {
        Some(self.shared.probes.load(Ordering::Relaxed))
    }

    fn detail(&self) -> String {
        "current-thread runtime, a task and a sleep per connection".into()
    }

    fn report(&self) -> Report {
        Report {
            probes: None,
            dead: self.shared.dead.lock().unwrap().clone(),
            closed: self.shared.closed.load(Ordering::Relaxed),
            revived: 0,
            lull: None,
        }
    }
}
