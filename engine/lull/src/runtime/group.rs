//! [`EngineGroup`]: several engines, one per core, sharing one activity source.

use std::{
    os::fd::AsFd,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use crate::{
    activity::{EXTENT_ROWS, SourceKind},
    policy::Policy,
};

use super::{
    Engine, EngineBuilder, EngineError, EngineStats, Event, Observer, PeerSocket, VirtualConn,
    WatchError, Watched, WatchedPeer,
};

/// Configures an [`EngineGroup`].
#[derive(Debug, Clone)]
pub struct GroupBuilder {
    engines: usize,
    engine: EngineBuilder,
}

impl GroupBuilder {
    /// The number of engines (default: one per available CPU).
    pub fn engines(mut self, n: usize) -> Self {
        self.engines = n;
        self
    }

    /// The settings of each engine; `capacity` is per engine.
    pub fn engine(mut self, engine: EngineBuilder) -> Self {
        self.engine = engine;
        self
    }

    /// Starts the engines. They share one activity source (one set of BPF programs, with the
    /// table split between them) and one event channel.
    pub fn build(self) -> Result<EngineGroup, EngineError> {
        if self.engines == 0 || self.engines > 1024 {
            return Err(EngineError::Option {
                field: "engines",
                why: "must be between 1 and 1024",
            });
        }
        self.engine.check()?;
        let per_engine = self.engine.capacity;
        // Each engine's slots start on an extent boundary of the shared table, so that no
        // extent (and none of its close notices) is shared by two engines.
        let stride =
            per_engine
                .checked_next_multiple_of(EXTENT_ROWS)
                .ok_or(EngineError::Option {
                    field: "capacity",
                    why: "capacity exceeds 2^32 slots",
                })?;
        let total = stride
            .checked_mul(self.engines as u32)
            .ok_or(EngineError::Option {
                field: "capacity",
                why: "capacity times engines exceeds 2^32 slots",
            })?;
        let source = self.engine.resolve_source(total)?;
        let (events_tx, events_rx) = flume::bounded(self.engine.event_capacity);
        let mut engines = Vec::with_capacity(self.engines);
        for k in 0..self.engines {
            let builder = self
                .engine
                .clone()
                .name(format!("{}-{k}", self.engine.name));
            engines.push(builder.start(
                source.clone(),
                k as u32 * stride,
                events_tx.clone(),
                events_rx.clone(),
            )?);
        }
        Ok(EngineGroup {
            engines,
            next: AtomicUsize::new(0),
            events: events_rx,
        })
    }
}

/// Engines that share the work: each connection is watched by one of them, chosen round-robin.
pub struct EngineGroup {
    engines: Vec<Engine>,
    next: AtomicUsize,
    events: flume::Receiver<Event>,
}

impl EngineGroup {
    /// A builder: one engine per available CPU, default engine settings.
    pub fn builder() -> GroupBuilder {
        GroupBuilder {
            engines: std::thread::available_parallelism().map_or(1, usize::from),
            engine: EngineBuilder::default(),
        }
    }

    fn pick(&self) -> &Engine {
        let k = self.next.fetch_add(1, Ordering::Relaxed) % self.engines.len();
        &self.engines[k]
    }

    /// Watches `stream` on one of the engines. If that engine is full, the others are tried.
    pub fn watch<T: AsFd>(&self, stream: T, policy: &Policy) -> Result<Watched<T>, WatchError> {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut stream = Some(stream);
        let mut last = None;
        for i in 0..self.engines.len() {
            let engine = &self.engines[(first + i) % self.engines.len()];
            if engine.stats().watched >= u64::from(engine.capacity()) {
                last = Some(WatchError::Full {
                    capacity: engine.capacity(),
                });
                continue;
            }
            return engine.watch(stream.take().expect("taken once"), policy);
        }
        Err(last.unwrap_or(WatchError::EngineStopped))
    }

    /// Watches `peer` of `socket` on one of the engines (see [`Engine::watch_peer`]).
    pub fn watch_peer(
        &self,
        socket: &PeerSocket,
        peer: std::net::SocketAddr,
        policy: &Policy,
    ) -> Result<WatchedPeer, WatchError> {
        self.pick().watch_peer(socket, peer, policy)
    }

    /// Gets the shared source ready for UDP flows (see [`Engine::observe_datagrams`]).
    pub fn observe_datagrams(&self) -> Observer {
        self.engines[0].observe_datagrams()
    }

    /// Watches a simulated connection on one of the engines (see [`Engine::watch_virtual`]).
    pub fn watch_virtual(
        &self,
        policy: &Policy,
        last_activity_ns: u64,
    ) -> Result<VirtualConn, WatchError> {
        self.pick().watch_virtual(policy, last_activity_ns)
    }

    /// The shared event channel.
    pub fn events(&self) -> &flume::Receiver<Event> {
        &self.events
    }

    /// Totals of all engines.
    pub fn stats(&self) -> EngineStats {
        let mut total = EngineStats::default();
        for engine in &self.engines {
            total.merge(&engine.stats());
        }
        total
    }

    /// CPU time used by all engine threads so far.
    pub fn cpu_time(&self) -> Duration {
        self.engines.iter().filter_map(Engine::cpu_time).sum()
    }

    /// User and system CPU time of all engine threads (see [`Engine::cpu_split`]).
    pub fn cpu_split(&self) -> (Duration, Duration) {
        self.engines
            .iter()
            .filter_map(Engine::cpu_split)
            .fold((Duration::ZERO, Duration::ZERO), |a, b| {
                (a.0 + b.0, a.1 + b.1)
            })
    }

    /// Slots in use over all engines (see [`Engine::slots_in_use`]).
    pub fn slots_in_use(&self) -> u64 {
        self.engines
            .iter()
            .map(|e| u64::from(e.slots_in_use()))
            .sum()
    }

    /// Per-engine statistics.
    pub fn engine_stats(&self) -> Vec<EngineStats> {
        self.engines.iter().map(Engine::stats).collect()
    }

    /// The activity source of the first engine (all start with the same one).
    pub fn source_kind(&self) -> SourceKind {
        self.engines[0].source_kind()
    }

    /// Takes now what watching up to the group's capacity will need and only a privileged
    /// process may take (rows of the host's eBPF table, leased through lock files in `/run`):
    /// call it before giving up root or CAP_DAC_OVERRIDE, as `lull run --user` does.
    pub fn reserve(&self) -> Result<(), EngineError> {
        Ok(self.engines[0].source().reserve()?)
    }

    /// The number of engines.
    pub fn len(&self) -> usize {
        self.engines.len()
    }

    /// Always false: a group has at least one engine.
    pub fn is_empty(&self) -> bool {
        self.engines.is_empty()
    }

    /// Stops every engine.
    pub fn shutdown(self) {
        for engine in self.engines {
            engine.shutdown();
        }
    }
}
