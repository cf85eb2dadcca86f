//! The run: one sink, three strategies' flows side by side, the application's traffic and the
//! eager sender's keepalives from one driver thread, and the counts at the sink.

use std::{
    collections::HashMap,
    net::UdpSocket,
    ops::Deref,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lull::{Engine, Payload, Policy, Probe, SourceChoice, Watched};
use lull_harness::udp::{UDP_PROBE, UdpBehaviour, UdpPeer};

/// What is measured.
pub struct Mix {
    /// Flows per strategy.
    pub flows: usize,
    /// Of which busy (the first `busy`).
    pub busy: usize,
    /// How often a busy flow sends.
    pub busy_every: Duration,
    /// The keep-warm interval.
    pub interval: Duration,
    /// How long the flows are held.
    pub held: Duration,
    /// Not counted at the start.
    pub warmup: Duration,
}

/// Who keeps the flows warm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    LullEbpf,
    LullWrapper,
    Eager,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Self::LullEbpf => "lull-ebpf",
            Self::LullWrapper => "lull-wrapper",
            Self::Eager => "eager",
        }
    }
}

/// Datagrams the sink counted for one strategy, in the window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub keep_warm_busy: u64,
    pub keep_warm_idle: u64,
    pub app_busy: u64,
}

pub struct StrategyResult {
    pub strategy: Strategy,
    /// Who saw the flows' datagrams (`-` for the eager sender).
    pub observer: String,
    pub counts: Counts,
    /// The lull engine's CPU time over the whole run.
    pub engine_cpu: Option<Duration>,
}

pub struct RunResult {
    pub strategies: Vec<StrategyResult>,
    /// The counting window.
    pub window: Duration,
    /// Why a strategy did not run, if one did not.
    pub skipped: Option<String>,
}

/// A flow's socket, as its strategy holds it.
enum FlowSocket {
    /// Watched; sends through the bare socket (`bare`: only the kernel sees them) or the handle.
    Watched {
        socket: Watched<UdpSocket>,
        bare: bool,
    },
    Plain(UdpSocket),
}

impl FlowSocket {
    fn send(&self, bytes: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Watched { socket, bare: true } => socket.deref().send(bytes),
            Self::Watched {
                socket,
                bare: false,
            } => socket.send(bytes),
            Self::Plain(socket) => socket.send(bytes),
        }
    }
}

struct Flow {
    socket: FlowSocket,
    strategy: Strategy,
    busy: bool,
    next_app: Instant,
    next_keepalive: Instant,
}

/// A sink with room for bursts: a full receive buffer would drop what is being counted.
fn sink() -> Result<UdpPeer> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    socket.set_recv_buffer_size(16 << 20)?;
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    Ok(UdpPeer::start_on(socket.into(), UdpBehaviour::silent())?)
}

pub fn run(mix: &Mix) -> Result<RunResult> {
    let sink = sink().context("binding the sink")?;
    let policy =
        Policy::keep_warm(mix.interval).with_probe(Probe::Bytes(Payload::datagram(UDP_PROBE)?));
    let builder = || Engine::builder().capacity(mix.flows as u32 * 2 + 16);
    let mut skipped = None;
    let ebpf = match builder().source(SourceChoice::Ebpf).build() {
        Ok(engine) => Some(engine),
        Err(err) => {
            skipped = Some(format!("lull-ebpf did not run: {err}"));
            None
        }
    };
    let wrapper = builder().source(SourceChoice::TcpInfo).build()?;
    let mut engines: Vec<(Strategy, &Engine)> = vec![(Strategy::LullWrapper, &wrapper)];
    if let Some(ebpf) = &ebpf {
        engines.insert(0, (Strategy::LullEbpf, ebpf));
    }
    let mut strategies: Vec<Strategy> = engines.iter().map(|(s, _)| *s).collect();
    strategies.push(Strategy::Eager);

    let mut flows = Vec::new();
    let mut by_port: HashMap<u16, (Strategy, bool)> = HashMap::new();
    let mut observers: HashMap<Strategy, String> = HashMap::new();
    let now = Instant::now();
    for &strategy in &strategies {
        for i in 0..mix.flows {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            socket.connect(sink.addr())?;
            let port = socket.local_addr()?.port();
            let busy = i < mix.busy;
            let socket = match engines.iter().find(|(s, _)| *s == strategy) {
                Some((_, engine)) => {
                    let watched = engine.watch(socket, &policy)?;
                    observers.insert(
                        strategy,
                        watched.observer().map_or("-".into(), |o| o.to_string()),
                    );
                    FlowSocket::Watched {
                        socket: watched,
                        bare: strategy == Strategy::LullEbpf,
                    }
                }
                None => FlowSocket::Plain(socket),
            };
            by_port.insert(port, (strategy, busy));
            // Staggered over a period, as independent flows would be.
            let phase = i as f64 / mix.flows as f64;
            flows.push(Flow {
                socket,
                strategy,
                busy,
                next_app: now + mix.busy_every.mul_f64(phase),
                next_keepalive: now + mix.interval.mul_f64(phase),
            });
        }
    }
    // A busy flow is busy from the start.
    for flow in flows.iter().filter(|f| f.busy) {
        flow.socket.send(b"app")?;
    }
    let start = Instant::now();
    while start.elapsed() < mix.held {
        let now = Instant::now();
        for flow in &mut flows {
            if flow.busy && now >= flow.next_app {
                flow.socket.send(b"app")?;
                flow.next_app += mix.busy_every;
            }
            if flow.strategy == Strategy::Eager && now >= flow.next_keepalive {
                flow.socket.send(UDP_PROBE)?;
                flow.next_keepalive += mix.interval;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let end = Instant::now();
    let cpu: HashMap<Strategy, Option<Duration>> = engines
        .iter()
        .map(|(s, engine)| (*s, engine.cpu_time()))
        .collect();
    // Nothing is sent once the watches end; let the sink read what is in flight.
    drop(flows);
    std::thread::sleep(Duration::from_millis(200));

    let from = start + mix.warmup;
    let mut counts: HashMap<Strategy, Counts> = HashMap::new();
    for d in sink.datagrams() {
        if d.at < from || d.at > end {
            continue;
        }
        let Some(&(strategy, busy)) = by_port.get(&d.from.port()) else {
            continue;
        };
        let c = counts.entry(strategy).or_default();
        match (d.bytes.starts_with(UDP_PROBE), busy) {
            (true, true) => c.keep_warm_busy += 1,
            (true, false) => c.keep_warm_idle += 1,
            (false, true) => c.app_busy += 1,
            (false, false) => {}
        }
    }
    Ok(RunResult {
        strategies: strategies
            .iter()
            .map(|&strategy| StrategyResult {
                strategy,
                observer: observers.get(&strategy).cloned().unwrap_or("-".into()),
                counts: counts.get(&strategy).copied().unwrap_or_default(),
                engine_cpu: cpu.get(&strategy).copied().flatten(),
            })
            .collect(),
        window: end.saturating_duration_since(from),
        skipped,
    })
}
