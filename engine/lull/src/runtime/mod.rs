//! [`Engine`]: one thread, one timing wheel, one io_uring, many watched connections.

mod conn;
mod events;
mod flow;
mod group;
mod shared;
mod udp;
mod watched;
mod worker;

use std::{
    os::fd::AsFd,
    sync::{Arc, Mutex, RwLock},
    thread::JoinHandle,
    time::Duration,
};

pub use events::{CloseReason, ConnId, ConnStats, DeadTier, EngineStats, Event};
pub use flow::Observer;
pub use group::{EngineGroup, GroupBuilder};
pub use udp::{PeerSocket, WatchedPeer};
pub use watched::{VirtualConn, WatchError, Watched};

use crate::{
    activity::{
        ActivityError, ActivitySource, ActivityTable, CgroupScope, DEFAULT_HOST_ROWS, Grace,
        SlotAllocator, SourceKind, TableOptions, TcpInfoSource, bpf_object_embedded,
    },
    clock::monotonic_ns,
    policy::{Policy, Probe},
    probe::ring::ProbeRing,
    socket::{SocketKind, check_socket, enable_kernel_keepalive},
};

use self::{
    flow::FlowRequest,
    shared::{Command, PolicyRegistry, Shared, watched_sockets, zeroed_stats},
    watched::Registration,
    worker::{VIRTUAL_FD, Worker, WorkerConfig},
};

/// Which activity source an engine uses.
#[derive(Clone)]
pub enum SourceChoice {
    /// eBPF when this build has the object and the process may load it; `TCP_INFO` otherwise.
    /// One log line says which, and why.
    Auto,
    /// eBPF or fail: [`Engine::builder`]'s `build` returns the reason it is unavailable.
    Ebpf,
    /// `TCP_INFO`, even when eBPF would work.
    TcpInfo,
    /// A source supplied by the caller (e.g. [`SimulatedSource`](crate::activity::SimulatedSource)).
    Custom(Arc<dyn ActivitySource>),
}

impl std::fmt::Debug for SourceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("Auto"),
            Self::Ebpf => f.write_str("Ebpf"),
            Self::TcpInfo => f.write_str("TcpInfo"),
            Self::Custom(s) => write!(f, "Custom({})", s.kind()),
        }
    }
}

/// Why an engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The activity source requested could not be set up.
    #[error("activity source: {0}")]
    Source(#[from] ActivityError),
    /// `io_uring_setup` failed (io_uring disabled by `kernel.io_uring_disabled`, or seccomp).
    #[error("io_uring_setup: {0}")]
    Ring(#[source] std::io::Error),
    /// The engine thread could not be started.
    #[error("spawning the engine thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A builder option is out of range.
    #[error("{field}: {why}")]
    Option {
        /// The option.
        field: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

/// Configures and starts an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineBuilder {
    capacity: u32,
    tick: Duration,
    coalesce: Duration,
    max_probes_per_tick: u32,
    source: SourceChoice,
    cgroup: CgroupScope,
    host_rows: u32,
    event_capacity: usize,
    name: String,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        Self {
            capacity: 1 << 18,
            tick: Duration::from_millis(1),
            coalesce: Duration::from_millis(8),
            max_probes_per_tick: 1024,
            source: SourceChoice::Auto,
            cgroup: CgroupScope::Current,
            host_rows: DEFAULT_HOST_ROWS,
            event_capacity: 1 << 16,
            name: "lull-engine".into(),
        }
    }
}

impl EngineBuilder {
    /// The most connections watched at once (default 262,144). Memory is reserved but only
    /// touched as connections arrive; the eBPF table allocates 24 bytes per slot in the kernel.
    pub fn capacity(mut self, capacity: u32) -> Self {
        self.capacity = capacity;
        self
    }

    /// The timing wheel's resolution (default 1 ms). Timers fire within one tick after their
    /// deadline.
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    /// The coalescing grid (default 8 ms). An idle arm may fire anywhere in its jitter window;
    /// the engine puts it on a point of this grid when the window holds one, so that
    /// connections due around the same moment share one wake-up instead of waking the engine
    /// every tick. Nothing fires later for it: arms that count an interval or wait for an
    /// answer stay exact. `Duration::ZERO` (or the tick) turns it off.
    pub fn coalesce(mut self, grid: Duration) -> Self {
        self.coalesce = grid;
        self
    }

    /// The most probes sent in one tick (default 1024); more due probes wait for the next tick.
    pub fn max_probes_per_tick(mut self, n: u32) -> Self {
        self.max_probes_per_tick = n;
        self
    }

    /// The activity source (default [`SourceChoice::Auto`]).
    pub fn source(mut self, source: SourceChoice) -> Self {
        self.source = source;
        self
    }

    /// Where the eBPF programs attach (default [`CgroupScope::Current`]: the cgroup this
    /// process runs in).
    ///
    /// The programs run for every socket of that cgroup and its descendants, and for no
    /// other, so they should attach where the watched sockets are. A socket belongs to the
    /// cgroup of the process that created it (an accepted one to its listener's):
    /// - [`CgroupScope::Current`] suits a service, which has a cgroup of its own;
    /// - [`CgroupScope::Own`] moves this process into a new child cgroup, so that only the
    ///   sockets it opens from then on run the programs (`lull run` does this);
    /// - [`CgroupScope::Path`] names one;
    /// - [`CgroupScope::Root`] makes every socket on the host run them, and is never chosen
    ///   implicitly.
    pub fn cgroup(mut self, cgroup: CgroupScope) -> Self {
        self.cgroup = cgroup;
        self
    }

    /// Rows of the host's shared activity table, if this engine is the first lull on the
    /// host and makes it (default [`DEFAULT_HOST_ROWS`], 24 bytes of kernel memory each).
    pub fn host_rows(mut self, rows: u32) -> Self {
        self.host_rows = rows;
        self
    }

    /// Room in the event channel (default 65,536). When it is full, events are dropped and
    /// counted in [`EngineStats::events_dropped`] rather than stalling the engine.
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.event_capacity = n;
        self
    }

    /// The engine thread's name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    fn check(&self) -> Result<(), EngineError> {
        if self.capacity == 0 {
            return Err(EngineError::Option {
                field: "capacity",
                why: "must be at least 1",
            });
        }
        if self.tick < Duration::from_micros(10) || self.tick > Duration::from_secs(1) {
            return Err(EngineError::Option {
                field: "tick",
                why: "must be between 10 µs and 1 s",
            });
        }
        if self.coalesce > Duration::from_secs(10) {
            return Err(EngineError::Option {
                field: "coalesce",
                why: "must be at most 10 s",
            });
        }
        if self.max_probes_per_tick == 0 || self.max_probes_per_tick > 32_768 {
            return Err(EngineError::Option {
                field: "max_probes_per_tick",
                why: "must be between 1 and 32768",
            });
        }
        if self.event_capacity == 0 {
            return Err(EngineError::Option {
                field: "event_capacity",
                why: "must be at least 1",
            });
        }
        Ok(())
    }

    /// Resolves the source choice for `slots` slots, logging which source is used and why.
    fn resolve_source(&self, slots: u32) -> Result<Arc<dyn ActivitySource>, EngineError> {
        let table = || {
            ActivityTable::load(&TableOptions {
                capacity: slots,
                cgroup: self.cgroup.clone(),
                host_rows: self.host_rows,
            })
        };
        let source: Arc<dyn ActivitySource> = match &self.source {
            SourceChoice::Custom(source) => source.clone(),
            SourceChoice::TcpInfo => {
                tracing::info!("activity source: tcp_info (chosen explicitly)");
                Arc::new(TcpInfoSource)
            }
            SourceChoice::Ebpf => {
                let table = table()?;
                tracing::info!(cgroup = %table.cgroup().display(), "activity source: ebpf");
                Arc::new(table)
            }
            SourceChoice::Auto if !bpf_object_embedded() => {
                tracing::warn!(
                    "activity source: tcp_info (fallback: this build has no BPF object; run \
                     `cargo xtask build-ebpf` and rebuild for the eBPF source)"
                );
                Arc::new(TcpInfoSource)
            }
            SourceChoice::Auto => match table() {
                Ok(table) => {
                    tracing::info!(cgroup = %table.cgroup().display(), "activity source: ebpf");
                    Arc::new(table)
                }
                Err(err) => {
                    tracing::warn!("activity source: tcp_info (fallback: {err})");
                    Arc::new(TcpInfoSource)
                }
            },
        };
        Ok(source)
    }

    /// Starts the engine on its own thread.
    pub fn build(self) -> Result<Engine, EngineError> {
        self.check()?;
        let source = self.resolve_source(self.capacity)?;
        let (events_tx, events_rx) = flume::bounded(self.event_capacity);
        self.start(source, 0, events_tx, events_rx)
    }

    fn start(
        &self,
        source: Arc<dyn ActivitySource>,
        slot_base: u32,
        events_tx: flume::Sender<Event>,
        events_rx: flume::Receiver<Event>,
    ) -> Result<Engine, EngineError> {
        let (commands_tx, commands_rx) = crossbeam_channel::unbounded();
        let grace = if source.detach_needs_grace() {
            Grace::Rcu
        } else {
            Grace::None
        };
        let shared = Arc::new(Shared {
            slots: SlotAllocator::new(slot_base, self.capacity, grace),
            stats: zeroed_stats(self.capacity as usize),
            counters: Default::default(),
            commands: commands_tx,
            events: events_tx,
            source: RwLock::new(source),
            policies: Mutex::new(PolicyRegistry::default()),
            slot_base,
            thread_id: Default::default(),
            datagram_rows: Default::default(),
        });
        let ring = ProbeRing::new(self.max_probes_per_tick).map_err(EngineError::Ring)?;
        let tick_ns = u64::try_from(self.tick.as_nanos()).unwrap_or(1_000_000);
        let grid_ns = u64::try_from(self.coalesce.as_nanos()).unwrap_or(0);
        let config = WorkerConfig {
            tick_ns,
            // A whole number of ticks, so grid points are tick boundaries.
            grid_ns: grid_ns / tick_ns * tick_ns,
            max_probes_per_tick: self.max_probes_per_tick,
            capacity: self.capacity,
        };
        let worker = Worker::new(shared.clone(), commands_rx, ring, config);
        let thread = std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || worker.run())
            .map_err(EngineError::Thread)?;
        Ok(Engine {
            shared,
            events: events_rx,
            thread: Some(thread),
        })
    }
}

/// A keepalive engine: one thread with its own timing wheel and io_uring.
///
/// ```no_run
/// use std::{net::TcpStream, time::Duration};
/// use lull::{Engine, Event, Policy};
///
/// let engine = Engine::builder().build()?;
/// let stream = TcpStream::connect("127.0.0.1:6379")?;
/// let policy = Policy::detect_dead(Duration::from_secs(30), Duration::from_secs(5), 3);
/// let stream = engine.watch(stream, &policy)?;
/// for event in engine.events().iter() {
///     if let Event::Dead { id, .. } = event {
///         assert_eq!(id, stream.id());
///         break;
///     }
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Engine {
    shared: Arc<Shared>,
    events: flume::Receiver<Event>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// A builder with the defaults.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// Starts watching `stream` with `policy`. The returned handle owns the stream; drop it
    /// (or call [`Watched::into_inner`]) to stop.
    ///
    /// `stream` is a connected TCP socket, or a connected UDP socket: a UDP flow, whose
    /// datagrams the eBPF source sees whatever sends them, and otherwise only those through the
    /// handle's [`send`](Watched::send) and [`recv`](Watched::recv) ([`Watched::observer`]
    /// says which). For an unconnected UDP socket, see [`Engine::watch_peer`].
    ///
    /// Refuses anything else, and a socket already watched in this process, with a
    /// [`WatchError`] that says what it got instead.
    pub fn watch<T: AsFd>(&self, stream: T, policy: &Policy) -> Result<Watched<T>, WatchError> {
        policy.validate()?;
        let fd = stream.as_fd();
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let identity = check_socket(fd)?;
        let request = match identity.kind {
            SocketKind::Stream => {
                policy.validate_stream()?;
                FlowRequest::Stream
            }
            SocketKind::ConnectedDatagram => {
                policy.validate_datagram(false)?;
                FlowRequest::Connected
            }
            SocketKind::UnconnectedDatagram => return Err(WatchError::UnconnectedUdp(raw)),
        };
        if !watched_sockets().insert(identity.inode) {
            return Err(WatchError::AlreadyWatched(raw));
        }
        let registration = self.register(
            Some(fd),
            policy,
            Some(identity.inode),
            monotonic_ns(),
            request,
        );
        match registration {
            Ok(registration) => Ok(Watched::new(stream, registration)),
            Err(err) => {
                watched_sockets().remove(&identity.inode);
                Err(err)
            }
        }
    }

    /// Watches a simulated connection with no socket, last active at `last_activity_ns`
    /// (`CLOCK_MONOTONIC`; pass [`monotonic_ns`] for "now"). Its activity comes from the
    /// engine's [`SourceChoice::Custom`] source (a
    /// [`SimulatedSource`](crate::activity::SimulatedSource)), its byte probes complete as
    /// io_uring no-ops, and the source is told of each one so that a simulated peer can answer.
    /// For benchmarks and simulations.
    pub fn watch_virtual(
        &self,
        policy: &Policy,
        last_activity_ns: u64,
    ) -> Result<VirtualConn, WatchError> {
        policy.validate()?;
        if policy.probe == Probe::Kernel {
            return Err(WatchError::Activity(ActivityError::NoSocket));
        }
        self.register(None, policy, None, last_activity_ns, FlowRequest::Stream)
            .map(VirtualConn::new)
    }

    fn register(
        &self,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
        policy: &Policy,
        inode: Option<u64>,
        now_ns: u64,
        request: FlowRequest,
    ) -> Result<Registration, WatchError> {
        let shared = &self.shared;
        // The thread owns the command receiver: once it has finished, nothing reads commands.
        if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
            return Err(WatchError::EngineStopped);
        }
        // The kernel watches the transport of kernel-probed and tiered connections.
        if let Some(fd) =
            fd.filter(|_| policy.probe == Probe::Kernel || policy.hung_after.is_some())
        {
            enable_kernel_keepalive(fd, policy)?;
        }
        let slot = shared
            .slots
            .alloc()
            .map_err(|source| WatchError::Syscall {
                call: "membarrier",
                fd: -1,
                source,
            })?
            .ok_or(WatchError::Full {
                capacity: shared.slots.capacity(),
            })?;
        let flow = match shared.attach_flow(fd, slot, now_ns, request) {
            Ok(flow) => flow,
            Err(err) => {
                shared.slots.free(slot);
                return Err(err);
            }
        };
        // Once attached, the registration undoes it if anything below fails.
        let registration = Registration {
            shared: shared.clone(),
            slot,
            inode,
            flow,
        };
        let policy_id = match shared.policy_id(policy, flow) {
            Some(id) => id,
            None => {
                registration.abandon(fd);
                return Err(WatchError::TooManyPolicies);
            }
        };
        if let Some(cell) = shared.stats_cell(slot) {
            cell.reset();
        }
        let raw = fd.map_or(VIRTUAL_FD, |fd| std::os::fd::AsRawFd::as_raw_fd(&fd));
        shared
            .commands
            .send(Command::Watch {
                slot,
                fd: raw,
                policy: policy_id,
                now_ns,
                dest: match request {
                    FlowRequest::Addressed(peer) => Some(peer),
                    FlowRequest::Stream | FlowRequest::Connected => None,
                },
            })
            .map_err(|_| WatchError::EngineStopped)?;
        Ok(registration)
    }

    /// The event channel. Every event goes to one receiver; clone it only to share the work.
    pub fn events(&self) -> &flume::Receiver<Event> {
        &self.events
    }

    /// Totals so far.
    pub fn stats(&self) -> EngineStats {
        self.shared.counters.snapshot(self.source_kind())
    }

    /// The activity source in use now (it changes from eBPF to `TCP_INFO` if the BPF
    /// programs are detached underneath the engine).
    pub fn source_kind(&self) -> SourceKind {
        self.shared.source_kind()
    }

    /// The source itself, e.g. to stamp a [`SimulatedSource`](crate::activity::SimulatedSource).
    pub fn source(&self) -> Arc<dyn ActivitySource> {
        self.shared.source()
    }

    /// CPU time the engine thread has used so far (user and system), from its per-thread CPU
    /// clock. `None` once the engine has shut down.
    pub fn cpu_time(&self) -> Option<Duration> {
        use std::os::unix::thread::JoinHandleExt;
        let thread = self.thread.as_ref()?.as_pthread_t();
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `thread` is a live thread (we hold its JoinHandle and have not joined it);
        // `clock` is a valid out-pointer.
        if unsafe { libc::pthread_getcpuclockid(thread, &mut clock) } != 0 {
            return None;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `clock` names that thread's CPU clock; `ts` is a valid out-pointer.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return None;
        }
        Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// The engine thread's CPU time split into user and system time, from
    /// `/proc/self/task/<tid>/stat` (clock-tick resolution). System time includes what the
    /// kernel does inside the engine's system calls; on loopback that includes delivering a
    /// probe to the peer's socket, which on a real network happens on the receiving host.
    pub fn cpu_split(&self) -> Option<(Duration, Duration)> {
        let tid = self
            .shared
            .thread_id
            .load(std::sync::atomic::Ordering::Relaxed);
        if tid == 0 || self.thread.is_none() {
            return None;
        }
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let rest = &stat[stat.rfind(')')? + 2..];
        let mut fields = rest.split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        // SAFETY: sysconf takes a name, touches no memory of ours, and returns -1 for a name it
        // does not know.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let ticks = |t: u64| Duration::from_nanos(t * 1_000_000_000 / hz);
        Some((ticks(utime), ticks(stime)))
    }

    /// Slots allocated and not yet freed: watched connections, plus dropped ones the engine
    /// thread has not processed yet. Once the engine is idle this equals
    /// [`EngineStats::watched`]; anything more is a leak.
    pub fn slots_in_use(&self) -> u32 {
        self.shared.slots.in_use()
    }

    /// The most connections this engine watches at once.
    pub fn capacity(&self) -> u32 {
        self.shared.slots.capacity()
    }

    /// Stops the engine thread and waits for it. Handles still alive stay valid: dropping them
    /// later is harmless, and no probe is sent after this returns. Dropping the engine does
    /// the same.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.shared.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the engine thread panicked");
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("source", &self.source_kind())
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}
