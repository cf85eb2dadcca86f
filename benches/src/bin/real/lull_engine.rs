//! lull as a strategy: one engine, every connection watched, verdicts from its event
//! channel.

use std::{
    collections::HashMap,
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lull::{ConnId, Engine, Event, Payload, Policy, Probe, SourceChoice, Watched, clock};

use crate::{
    proto::{Report, Strategy, Timing},
    running::Running,
};

/// lull: one engine, every connection watched, verdicts from its event channel.
pub struct LullRun {
    engine: Engine,
    policy: Policy,
    /// Held so the watches (and the sockets) live as long as the worker.
    watched: Vec<Watched<TcpStream>>,
    ids: HashMap<ConnId, u64>,
    report: Report,
}

impl LullRun {
    /// An engine with `strategy`'s activity source and room for `conns` connections.
    ///
    /// Fails where the source cannot run (eBPF without privileges): the worker says so
    /// before opening anything. The eBPF source attaches to the cgroup this process runs in,
    /// the run's, where every worker of the strategy shares one attachment.
    pub fn start(
        strategy: Strategy,
        timing: Timing,
        conns: u64,
        tick: Option<Duration>,
    ) -> Result<Self> {
        let source = match strategy {
            Strategy::LullEbpf => SourceChoice::Ebpf,
            _ => SourceChoice::TcpInfo,
        };
        let mut builder = Engine::builder();
        if let Some(tick) = tick {
            builder = builder.tick(tick);
        }
        let engine = builder
            .capacity(u32::try_from(conns)?.max(1))
            .source(source)
            .name("real-lull")
            .build()?;
        let conns = conns as usize;
        let policy = Policy::detect_dead(timing.idle(), timing.interval(), timing.count)
            .with_probe(Probe::Bytes(Payload::redis_ping()))
            // Nobody else reads these sockets, so lull must, or the busy peers' bytes and the
            // answers to its probes would pile up in the receive buffers.
            .with_drain(true);
        Ok(Self {
            engine,
            policy,
            watched: Vec::with_capacity(conns),
            ids: HashMap::with_capacity(conns),
            report: Report::default(),
        })
    }

    fn take(&mut self, event: Event) {
        let now = clock::monotonic_ns();
        match event {
            Event::Dead { id, .. } => {
                if let Some(&global) = self.ids.get(&id) {
                    self.report.dead.push((global, now));
                }
            }
            Event::Closed { .. } => self.report.closed += 1,
            Event::Revived { .. } => self.report.revived += 1,
            Event::ProbeDue { .. } => {}
        }
    }
}

impl Running for LullRun {
    fn add(&mut self, global: u64, stream: TcpStream) -> Result<()> {
        let watched = self
            .engine
            .watch(stream, &self.policy)
            .context("watching a connection")?;
        self.ids.insert(watched.id(), global);
        self.watched.push(watched);
        Ok(())
    }

    fn settle(&mut self, conns: u64) -> Result<()> {
        // The engine takes each watch from a queue; READY means every connection is on its
        // wheel.
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.engine.stats().watched < conns && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn poll(&mut self, wait: Duration) -> Result<()> {
        if let Ok(event) = self.engine.events().recv_timeout(wait) {
            self.take(event);
            // Bounded: the channel holds at most its capacity.
            let more: Vec<Event> = self.engine.events().try_iter().take(1 << 16).collect();
            for event in more {
                self.take(event);
            }
        }
        Ok(())
    }

    fn probes(&self) -> Option<u64> {
        Some(self.engine.stats().probes_sent)
    }

    fn report(&self) -> Report {
        let dropped = self.engine.stats().events_dropped;
        if dropped > 0 {
            eprintln!("real worker: lull dropped {dropped} events (its channel was full)");
        }
        self.report.clone()
    }

    fn detail(&self) -> String {
        format!("source {}", self.engine.source_kind())
    }

    fn finish(self: Box<Self>) {
        // Every watch first (each unregisters its socket), then the engine, whose source is
        // this process's use of the shared attachment: the last worker to let go detaches
        // lull's programs, so that the next strategy's sockets do not run them.
        let Self {
            engine, watched, ..
        } = *self;
        drop(watched);
        engine.shutdown();
    }
}
