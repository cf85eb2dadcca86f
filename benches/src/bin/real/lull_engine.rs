//! lull as a strategy: one engine, every connection watched, verdicts from its event
//! channel. Three flavours: the eBPF source, the `TCP_INFO` source, and the eBPF source with
//! tiered probing.

use std::{
    collections::HashMap,
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lull::{
    ConnId, DeadTier, Engine, EngineStats, Event, Payload, Policy, Probe, SourceChoice, Watched,
    clock,
};

use crate::{
    proto::{LullCounters, Report, Role, Strategy, Tier, Timing, Verdict},
    running::Running,
};

/// The policy `strategy` (one of lull's) applies to every connection: the plan's timing, a
/// Redis `PING` (the same bytes the tokio engine sends), draining, and for lull-tiered
/// `hung_after` = [`Timing::hung_after`].
pub fn policy(strategy: Strategy, timing: Timing) -> Policy {
    let policy = Policy::detect_dead(timing.idle(), timing.interval(), timing.count)
        .with_probe(Probe::Bytes(Payload::redis_ping()))
        // Nobody else reads these sockets, so lull must, or the busy peers' bytes and the
        // answers to its probes would pile up in the receive buffers.
        .with_drain(true);
    match strategy {
        Strategy::LullTiered => policy.with_hung_after(timing.hung_after()),
        _ => policy,
    }
}

/// lull: one engine, every connection watched, verdicts from its event channel.
pub struct LullRun {
    engine: Engine,
    policy: Policy,
    /// Held so the watches (and the sockets) live as long as the worker.
    watched: Vec<Watched<TcpStream>>,
    /// Indices into `watched` of the answering connections, whose probes are compared with
    /// the policy's nominal rate.
    answering: Vec<usize>,
    ids: HashMap<ConnId, u64>,
    report: Report,
    /// At the window's start: the engine's counters and the answering connections' probes.
    marked: (EngineStats, u64),
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
            Strategy::LullTcpinfo => SourceChoice::TcpInfo,
            _ => SourceChoice::Ebpf,
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
        let policy = policy(strategy, timing);
        policy.validate().context("lull's policy")?;
        let conns = conns as usize;
        Ok(Self {
            engine,
            policy,
            watched: Vec::with_capacity(conns),
            answering: Vec::with_capacity(conns),
            ids: HashMap::with_capacity(conns),
            report: Report::default(),
            marked: (EngineStats::default(), 0),
        })
    }

    fn take(&mut self, event: Event) {
        let now = clock::monotonic_ns();
        match event {
            Event::Dead { id, tier, .. } => {
                if let Some(&global) = self.ids.get(&id) {
                    self.report.dead.push(Verdict {
                        global,
                        at: now,
                        tier: Some(match tier {
                            DeadTier::Transport => Tier::Transport,
                            DeadTier::Application => Tier::Application,
                        }),
                    });
                }
            }
            Event::Closed { .. } => self.report.closed += 1,
            Event::Revived { .. } => self.report.revived += 1,
            Event::ProbeDue { .. } => {}
        }
    }

    /// Probes sent so far to the answering connections.
    fn answering_probes(&self) -> u64 {
        self.answering
            .iter()
            .map(|&i| u64::from(self.watched[i].stats().probes_sent))
            .sum()
    }
}

impl Running for LullRun {
    fn add(&mut self, global: u64, role: Role, stream: TcpStream) -> Result<()> {
        let watched = self
            .engine
            .watch(stream, &self.policy)
            .context("watching a connection")?;
        self.ids.insert(watched.id(), global);
        if role == Role::Answering {
            self.answering.push(self.watched.len());
        }
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

    fn mark(&mut self) {
        self.marked = (self.engine.stats(), self.answering_probes());
    }

    fn report(&self) -> Report {
        let (s, (m, answering)) = (self.engine.stats(), &self.marked);
        if s.events_dropped > 0 {
            eprintln!(
                "real worker: lull dropped {} events (its channel was full)",
                s.events_dropped
            );
        }
        let mut report = self.report.clone();
        report.lull = Some(LullCounters {
            probes_answering: self.answering_probes().saturating_sub(*answering),
            probes_answered: s.probes_answered.saturating_sub(m.probes_answered),
            wakeups: s.wakeups.saturating_sub(m.wakeups),
            wakeups_rearmed: s.wakeups_rearmed.saturating_sub(m.wakeups_rearmed),
            drains: s.drains.saturating_sub(m.drains),
            drains_skipped: s.drains_skipped.saturating_sub(m.drains_skipped),
            dead_transport: s.dead_transport.saturating_sub(m.dead_transport),
            dead_application: s.dead_application.saturating_sub(m.dead_application),
            events_dropped: s.events_dropped.saturating_sub(m.events_dropped),
        });
        report
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
