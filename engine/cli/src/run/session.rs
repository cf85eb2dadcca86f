//! [`Session`]: what the jobs of one `lull run` share, and how they take the engine's events.

use std::{
    cell::Cell,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use lull::EngineGroup;

use super::{cgroup::RunCgroup, config::RunConfig, tracker::Tracker};
use crate::metrics::Metrics;

/// What the jobs share.
pub struct Session<'a> {
    pub config: &'a RunConfig,
    pub engine: &'a EngineGroup,
    pub stop: &'a AtomicBool,
    pub metrics: Option<&'a Metrics>,
    /// Where lull's sockets live, when it attaches eBPF programs.
    pub cgroup: Option<&'a RunCgroup>,
    /// When the timed part of the run began (after the connections were set up).
    pub started: Cell<Instant>,
}

impl Session<'_> {
    /// Whether the run should end: its duration is over or a signal arrived.
    pub fn over(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            || self.config.duration.is_some_and(|d| self.elapsed() >= d)
    }

    /// Starts the run's clock now: `--duration` counts from here.
    pub fn restart(&self) {
        self.started.set(Instant::now());
    }

    /// Time since the run's clock started.
    pub fn elapsed(&self) -> Duration {
        self.started.get().elapsed()
    }

    /// Whether a signal ended the run early.
    pub fn interrupted(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Feeds the engine's events to the tracker and the metrics: waits up to `wait` for the
    /// first, then takes whatever else is queued. Returns the events, for jobs that act on them.
    pub fn pump_events(&self, tracker: &mut Tracker, wait: Duration) -> Vec<lull::Event> {
        let events = self.engine.events();
        let mut got = Vec::new();
        if let Ok(first) = events.recv_timeout(wait) {
            got.push(first);
        }
        got.extend(events.try_iter());
        let now = Instant::now();
        for event in &got {
            let latency = tracker.on_event(event, now);
            if let (Some(metrics), Some(latency)) = (self.metrics, latency) {
                metrics.observe_detection(latency);
            }
        }
        if let Some(metrics) = self.metrics {
            metrics.update(&self.engine.stats());
        }
        got
    }
}
