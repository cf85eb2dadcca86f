//! An edge gateway: a tokio-uring TCP proxy that keeps both legs of every connection under
//! lull, and closes both legs as soon as either peer is found dead.
//!
//! ```text
//! cargo run --example gateway -- --listen 127.0.0.1:7000 --upstream 127.0.0.1:6379
//! ```
//!
//! A proxy that does not parse the protocol it carries must not write into it, so both legs use
//! `Probe::Kernel`: the kernel sends zero-byte keepalive probes (with `TCP_USER_TIMEOUT` so that
//! unacknowledged data cannot stall them), and lull turns its verdict into an event. A gateway
//! that speaks the protocol (Redis, MQTT, HTTP/2, WebSocket) would use a byte probe instead and
//! also catch a peer whose kernel is alive but whose application hangs.

use std::{
    cell::RefCell,
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    rc::Rc,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use lull::{ConnId, Engine, Event, Policy, Probe, Watched};
use tokio_uring::{
    buf::BoundedBuf,
    net::{TcpListener, TcpStream},
};

/// A TCP proxy whose connections lull keeps alive.
#[derive(Parser)]
struct Args {
    /// Address to accept clients on.
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// Address of the upstream server.
    #[arg(long)]
    upstream: SocketAddr,
    /// Silence after which a leg is probed, in seconds (kernel probes count in seconds).
    #[arg(long, default_value_t = 30)]
    idle: u64,
    /// Seconds between probes.
    #[arg(long, default_value_t = 5)]
    interval: u64,
    /// Unanswered probes before a peer is dead.
    #[arg(long, default_value_t = 3)]
    count: u32,
}

/// tokio-uring's stream does not implement `AsFd`; this leg does, for `Engine::watch`.
struct Leg(TcpStream);

impl AsFd for Leg {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd belongs to the stream inside `self`, which keeps it open for at least
        // as long as the borrow of `self`.
        unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) }
    }
}

/// Both legs of one proxied connection.
struct Pair {
    client: Watched<Leg>,
    upstream: Watched<Leg>,
}

impl Pair {
    /// Shuts both legs down: both copy directions see EOF or an error and end.
    fn close(&self) {
        let _ = self.client.0.shutdown(std::net::Shutdown::Both);
        let _ = self.upstream.0.shutdown(std::net::Shutdown::Both);
    }
}

type Pairs = Rc<RefCell<HashMap<ConnId, Rc<Pair>>>>;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let policy = Policy::detect_dead(
        Duration::from_secs(args.idle),
        Duration::from_secs(args.interval),
        args.count,
    )
    .with_probe(Probe::Kernel);
    policy
        .validate()
        .context("invalid --idle/--interval/--count")?;
    let engine = Rc::new(
        Engine::builder()
            .build()
            .context("starting the lull engine")?,
    );

    tokio_uring::start(async move {
        let listener = TcpListener::bind(args.listen)
            .with_context(|| format!("listening on {}", args.listen))?;
        eprintln!(
            "gateway: {} -> {} (activity source: {})",
            args.listen,
            args.upstream,
            engine.source_kind()
        );
        let pairs: Pairs = Rc::default();
        tokio_uring::spawn(reap(engine.clone(), pairs.clone()));
        loop {
            let (client, from) = listener.accept().await.context("accept")?;
            let upstream = match TcpStream::connect(args.upstream).await {
                Ok(s) => s,
                Err(err) => {
                    eprintln!("gateway: {from}: upstream {}: {err}", args.upstream);
                    continue;
                }
            };
            let (client, upstream) = match (
                engine.watch(Leg(client), &policy),
                engine.watch(Leg(upstream), &policy),
            ) {
                (Ok(c), Ok(u)) => (c, u),
                (Err(err), _) | (_, Err(err)) => {
                    eprintln!("gateway: {from}: cannot watch: {err}");
                    continue;
                }
            };
            let pair = Rc::new(Pair { client, upstream });
            let ids = [pair.client.id(), pair.upstream.id()];
            for id in ids {
                pairs.borrow_mut().insert(id, pair.clone());
            }
            let pairs = pairs.clone();
            tokio_uring::spawn(async move {
                tokio::select! {
                    _ = copy(&pair.client.0, &pair.upstream.0) => {}
                    _ = copy(&pair.upstream.0, &pair.client.0) => {}
                }
                pair.close();
                for id in ids {
                    pairs.borrow_mut().remove(&id);
                }
            });
        }
    })
}

/// Closes both legs of a pair when lull finds either peer dead (or its connection closed).
async fn reap(engine: Rc<Engine>, pairs: Pairs) {
    while let Ok(event) = engine.events().recv_async().await {
        let id = event.id();
        if let Event::Dead { after, .. } = event {
            eprintln!("gateway: connection {id} is dead (silent for {after:?}); closing both legs");
        }
        if matches!(event, Event::Dead { .. } | Event::Closed { .. })
            && let Some(pair) = pairs.borrow_mut().remove(&id)
        {
            pair.close();
        }
    }
}

/// Copies bytes from `from` to `to` until EOF or an error.
async fn copy(from: &TcpStream, to: &TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let (n, b) = from.read(buf).await;
        let n = n?;
        if n == 0 {
            return Ok(());
        }
        let (written, b) = to.write_all(b.slice(..n)).await;
        written?;
        buf = b.into_inner();
    }
}
