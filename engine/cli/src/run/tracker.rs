//! Follows the engine's events for a run: what each connection was expected to do, what was
//! found, detection latency, and the live progress line.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use lull::{ConnId, DeadTier, EngineStats, Event, Policy};

use crate::schedule::Role;

/// What is known about one connection.
struct Expect {
    role: Option<Role>,
    /// When its peer was scheduled to hang (demo, hung peers).
    hangs_at: Option<Instant>,
    /// One of the demo's UDP flows, counted apart from its TCP connections.
    udp: bool,
}

/// Counts per role: (expected, found).
#[derive(Default, Clone, Copy)]
pub struct Tally {
    pub dead: u64,
    pub closed: u64,
}

/// Everything a run learns from the event channel.
pub struct Tracker {
    expect: HashMap<ConnId, Expect>,
    /// Found dead/closed, by role (`None` for --connect).
    pub found: BTreeMap<Option<Role>, Tally>,
    /// The same for the demo's UDP flows.
    pub found_udp: BTreeMap<Option<Role>, Tally>,
    pub revived: u64,
    /// Detection latency in microseconds: from the hang (demo) or from the last payload
    /// (--connect) to the verdict.
    pub latency_us: Histogram<u64>,
    /// The same for the demo's UDP flows.
    pub latency_udp_us: Histogram<u64>,
    /// Dead verdicts by tier: transport, application.
    pub by_tier: [u64; 2],
    /// Latencies above the policy's bound for their tier.
    pub over_bound: u64,
    /// The policy's bounds: transport tier (the dead bound), application tier (hung bound).
    bounds: [Duration; 2],
    last_progress: (Instant, u64),
    pub progress_lines: u64,
    tty: bool,
}

impl Tracker {
    /// A tracker for connections watched with `policy`.
    pub fn new(policy: &Policy, expected_conns: usize) -> Self {
        Self {
            expect: HashMap::with_capacity(expected_conns),
            found: BTreeMap::new(),
            found_udp: BTreeMap::new(),
            revived: 0,
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid histogram bounds"),
            latency_udp_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid histogram bounds"),
            by_tier: [0; 2],
            over_bound: 0,
            bounds: [policy.detection_bound(), policy.hung_bound()],
            last_progress: (Instant::now(), 0),
            progress_lines: 0,
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }

    /// The policy's bound for a verdict of `tier`.
    pub fn bound(&self, tier: DeadTier) -> Duration {
        self.bounds[tier_index(tier)]
    }

    /// Registers a watched connection with its role and, for a hung peer, its hang instant.
    pub fn expect(&mut self, id: ConnId, role: Option<Role>, hangs_at: Option<Instant>) {
        self.expect.insert(
            id,
            Expect {
                role,
                hangs_at,
                udp: false,
            },
        );
    }

    /// Registers one of the demo's UDP flows, counted apart from the TCP connections.
    pub fn expect_udp(&mut self, id: ConnId, role: Role, hangs_at: Option<Instant>) {
        self.expect.insert(
            id,
            Expect {
                role: Some(role),
                hangs_at,
                udp: true,
            },
        );
    }

    /// Forgets a connection (--connect drops and reconnects them).
    pub fn forget(&mut self, id: ConnId) {
        self.expect.remove(&id);
    }

    /// Records an event; returns the latency it measured, if any.
    pub fn on_event(&mut self, event: &Event, at: Instant) -> Option<Duration> {
        let expect = self.expect.get(&event.id());
        let role = expect.and_then(|e| e.role);
        let udp = expect.is_some_and(|e| e.udp);
        let (found, latencies) = if udp {
            (&mut self.found_udp, &mut self.latency_udp_us)
        } else {
            (&mut self.found, &mut self.latency_us)
        };
        match *event {
            Event::Dead { after, tier, .. } => {
                found.entry(role).or_default().dead += 1;
                if !udp {
                    self.by_tier[tier_index(tier)] += 1;
                }
                // The demo knows when the peer hung; --connect knows the silence lull measured.
                let latency = match expect.and_then(|e| e.hangs_at) {
                    Some(hung) => at.saturating_duration_since(hung),
                    None => after,
                };
                let _ = latencies.record((latency.as_micros() as u64).max(1));
                if latency > self.bound(tier) + Duration::from_millis(50) {
                    self.over_bound += 1;
                }
                Some(latency)
            }
            Event::Closed { .. } => {
                found.entry(role).or_default().closed += 1;
                None
            }
            Event::Revived { .. } => {
                self.revived += 1;
                None
            }
            Event::ProbeDue { .. } => None,
        }
    }

    /// Totals over every role (the demo's UDP flows apart).
    pub fn total(&self) -> Tally {
        sum(&self.found)
    }

    /// Totals over every role of the demo's UDP flows.
    pub fn total_udp(&self) -> Tally {
        sum(&self.found_udp)
    }

    /// Prints the progress line (on stderr, overwriting itself) about once a second.
    pub fn progress(
        &mut self,
        elapsed: Duration,
        stats: &EngineStats,
        expected: Option<Tally>,
        force: bool,
    ) {
        let now = Instant::now();
        // On a terminal the line rewrites itself every second; in a log, a line every 5 s.
        let every = if self.tty {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        if !force && now.duration_since(self.last_progress.0) < every {
            return;
        }
        let dt = now
            .duration_since(self.last_progress.0)
            .as_secs_f64()
            .max(1e-3);
        let rate = (stats.probes_sent - self.last_progress.1) as f64 / dt;
        self.last_progress = (now, stats.probes_sent);
        let total = self.total();
        let of = |found: u64, want: Option<u64>| match want {
            Some(w) => format!("{found}/{w}"),
            None => found.to_string(),
        };
        let watching = stats
            .watched
            .saturating_sub(stats.probing + stats.dead_now + stats.inert_now);
        let line = format!(
            "[{:>5.1}s] {} conns: {} watching, {} probing, {} dead, {} closed | {:>7.0} probes/s | \
             dead found {} closed found {}",
            elapsed.as_secs_f64(),
            stats.watched,
            watching,
            stats.probing,
            stats.dead_now,
            stats.inert_now,
            rate,
            of(total.dead, expected.map(|e| e.dead)),
            of(total.closed, expected.map(|e| e.closed)),
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line:<118}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
        self.progress_lines += 1;
    }

    /// Ends the progress line so that what follows starts on a fresh line.
    pub fn finish_progress(&self) {
        if self.tty && self.progress_lines > 0 {
            eprintln!();
        }
    }
}

fn sum(found: &BTreeMap<Option<Role>, Tally>) -> Tally {
    found.values().fold(Tally::default(), |a, t| Tally {
        dead: a.dead + t.dead,
        closed: a.closed + t.closed,
    })
}

fn tier_index(tier: DeadTier) -> usize {
    match tier {
        DeadTier::Transport => 0,
        DeadTier::Application => 1,
    }
}
