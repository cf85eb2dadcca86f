//! The worker driven by hand: commands go straight to `handle` and time is whatever the test
//! says, so a connection's whole life runs in microseconds and deterministically.

use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use crate::{
    activity::{Grace, SimulatedSource, flags},
    policy::OnDead,
};

use super::{
    super::{CloseReason, Event, shared::zeroed_stats},
    *,
};

const MS: u64 = 1_000_000;
const CAPACITY: u32 = 8;

struct Bench {
    worker: Worker,
    source: Arc<SimulatedSource>,
    events: flume::Receiver<Event>,
}

impl Bench {
    fn new() -> Self {
        let source = Arc::new(SimulatedSource::new(CAPACITY));
        let (commands, commands_rx) = crossbeam_channel::unbounded();
        let (events_tx, events) = flume::bounded(64);
        let shared = Arc::new(Shared {
            slots: SlotAllocator::new(0, CAPACITY, Grace::None),
            stats: zeroed_stats(CAPACITY as usize),
            counters: Default::default(),
            commands,
            events: events_tx,
            source: RwLock::new(source.clone()),
            policies: Mutex::default(),
            slot_base: 0,
            thread_id: Default::default(),
            datagram_rows: Default::default(),
        });
        let config = WorkerConfig {
            tick_ns: MS,
            max_probes_per_tick: 64,
            grid_ns: 0,
            capacity: CAPACITY,
        };
        let ring = ProbeRing::new(config.max_probes_per_tick).expect("io_uring");
        Self {
            worker: Worker::new(shared, commands_rx, ring, config),
            source,
            events,
        }
    }

    /// When the worker's tick 0 starts.
    fn start(&self) -> u64 {
        self.worker.placement.tick_start(0)
    }

    /// Watches a simulated connection with `policy` (as policy 0) from `now`.
    fn watch(&mut self, policy: &Policy, now: u64) -> Slot {
        let slot = self
            .worker
            .shared
            .slots
            .alloc()
            .unwrap()
            .expect("a free slot");
        self.source.attach(None, slot, now).unwrap();
        self.worker.handle(Command::AddPolicy {
            id: 0,
            policy: Box::new(policy.clone()),
            flow: FlowKind::Stream,
        });
        self.worker.handle(Command::Watch {
            slot,
            fd: VIRTUAL_FD,
            policy: 0,
            now_ns: now,
            dest: None,
        });
        slot
    }

    /// Does the loop's timer work at every tick of `[from, to]`.
    fn run(&mut self, from: u64, to: u64) {
        for now in (from..=to).step_by(MS as usize) {
            self.worker.fire_due(now, u64::MAX);
        }
    }

    fn phase(&self, slot: Slot) -> Phase {
        self.worker.conns[slot.index as usize].phase()
    }

    /// Whether the worker's wheel would ever fire again.
    fn anything_armed(&self) -> bool {
        self.worker.wheel.armed() != 0 || self.worker.wheel.next_expiration().is_some()
    }

    fn wakeups(&self) -> u64 {
        self.worker.shared.counters.wakeups.load(Ordering::Relaxed)
    }
}

fn policy() -> Policy {
    Policy::detect_dead(Duration::from_secs(1), Duration::from_secs(1), 2)
}

#[test]
fn an_inert_connection_keeps_no_timer_even_after_a_new_policy() {
    let mut bench = Bench::new();
    let t0 = bench.start();
    // A virtual connection has no socket to shut down: dead makes it inert at once.
    let slot = bench.watch(&policy().with_on_dead(OnDead::Shutdown), t0);
    bench.source.kill(slot.index);
    bench.run(t0, t0 + 4_000 * MS);
    assert!(matches!(bench.events.try_recv(), Ok(Event::Dead { .. })));
    assert_eq!(bench.phase(slot), Phase::Inert);
    assert!(!bench.anything_armed(), "dead and shut down: nothing armed");

    // A new policy asks for one more look; an inert connection must not be filed again,
    // least of all at the wheel's top level, where it would be cascaded for ever.
    bench.worker.handle(Command::SetPolicy { slot, policy: 0 });
    let before = bench.wakeups();
    bench.run(t0 + 4_001 * MS, t0 + 10_000 * MS);
    assert_eq!(bench.wakeups(), before + 1, "one look, then never again");
    assert_eq!(bench.phase(slot), Phase::Inert);
    assert!(!bench.anything_armed(), "the look left the timer filed");
    assert!(bench.events.try_recv().is_err(), "no second event");
}

#[test]
fn a_closed_connection_reports_its_close_once() {
    let mut bench = Bench::new();
    let t0 = bench.start();
    let slot = bench.watch(&policy(), t0);
    bench.source.set_flags(slot.index, flags::PEER_RST);
    // The first look comes by the far edge of the idle window, 1.05 s.
    bench.run(t0, t0 + 1_100 * MS);
    assert!(matches!(
        bench.events.try_recv(),
        Ok(Event::Closed {
            reason: CloseReason::PeerReset,
            ..
        })
    ));
    assert!(!bench.anything_armed());

    bench.worker.handle(Command::SetPolicy { slot, policy: 0 });
    bench.run(t0 + 1_101 * MS, t0 + 3_000 * MS);
    assert!(
        bench.events.try_recv().is_err(),
        "the close was reported again"
    );
    assert!(!bench.anything_armed());
}
