//! The final report of `lull run`: a table on stdout, the same as JSON with `--json`.

mod udp;

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use lull::{DeadTier, EngineGroup, EngineStats};
use serde::Serialize;

use super::tracker::Tracker;
use crate::schedule::Role;

pub use udp::{UdpFacts, UdpReport};

/// Found against expected, for dead and closed connections.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub found: u64,
    /// What the run started (demo only).
    pub expected: Option<u64>,
    /// Found among connections that were not expected to (demo only).
    pub unexpected: u64,
}

/// Detection latency summary, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The policy's bound for the verdicts measured: the hung bound (for a tiered policy,
    /// `hung_after`; otherwise the dead bound).
    pub bound_ms: f64,
    /// The dead bound of the transport tier, for a tiered policy.
    pub transport_bound_ms: Option<f64>,
    pub over_bound: u64,
}

/// Probes per idle connection-hour, measured and nominal.
#[derive(Debug, Serialize)]
pub struct ProbeRate {
    pub measured_per_conn_hour: f64,
    pub nominal_per_conn_hour: f64,
}

/// The policy the run used.
#[derive(Debug, Serialize)]
pub struct PolicyReport {
    pub mode: String,
    pub idle_ms: u64,
    pub interval_ms: u64,
    pub count: u32,
    pub jitter: f64,
    pub probe: String,
    pub hung_after_ms: Option<u64>,
    /// UDP: the start of the peer's answer to the probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_reply: Option<String>,
}

impl PolicyReport {
    pub fn of(p: &lull::Policy) -> Self {
        Self {
            mode: format!("{:?}", p.mode),
            idle_ms: p.idle.as_millis() as u64,
            interval_ms: p.interval.as_millis() as u64,
            count: p.count,
            jitter: p.jitter,
            hung_after_ms: p.hung_after.map(|d| d.as_millis() as u64),
            probe: match &p.probe {
                lull::Probe::Bytes(payload) => format!("{payload:?}"),
                lull::Probe::Kernel => "kernel".into(),
                lull::Probe::Callback => "callback".into(),
            },
            expect_reply: p.expect_reply.as_ref().map(|r| format!("{r:?}")),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub job: String,
    pub policy: PolicyReport,
    pub source: String,
    pub engines: usize,
    pub duration_s: f64,
    pub interrupted: bool,
    pub connections: u64,
    pub connections_by_role: BTreeMap<String, u64>,
    pub probes_sent: u64,
    pub probes_answered: u64,
    pub probes_deferred: u64,
    pub wakeups: u64,
    pub wakeups_found_traffic: u64,
    /// Probes per connection-hour to connections whose peer answered and sent nothing else
    /// (the demo's answering peers), against the policy's nominal rate, `3600 / period`.
    pub idle_probe_rate: Option<ProbeRate>,
    /// Reads submitted to drain what peers sent, and firings that needed none.
    pub drains: u64,
    pub drains_skipped: u64,
    pub dead: Outcome,
    /// Dead verdicts by the tier that caught them: `transport` (the kernel gave up) and
    /// `application` (lull's probes went unanswered).
    pub dead_by_tier: BTreeMap<String, u64>,
    pub closed: Outcome,
    pub revived: u64,
    pub reconnects: u64,
    pub detection_latency: Option<Latency>,
    pub engine_cpu_ms: f64,
    /// User time: lull's own work.
    pub engine_cpu_user_ms: f64,
    /// System time: inside the engine's system calls. On loopback this includes the kernel
    /// delivering each probe to the peer, which a real network does on the peer's host.
    pub engine_cpu_system_ms: f64,
    pub engine_cpu_per_probe_us: Option<f64>,
    pub engine_cpu_per_conn_hour_ms: f64,
    pub rss_growth_per_conn_bytes: Option<f64>,
    pub engine_bytes_per_conn: u64,
    pub events_dropped: u64,
    /// The run's UDP flows (`--connect udp://`, or the demo's UDP share), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpReport>,
    /// Everything that did not come out as expected; empty when all is well.
    pub mismatches: Vec<String>,
}

/// Bytes of engine state per connection: wheel entry (24), connection record (24), shared slot
/// word (4) and statistics (12). See `lull::engine::conn`.
pub const ENGINE_BYTES_PER_CONN: u64 = 64;

/// Inputs from the job that the engine does not know.
pub struct JobFacts<'a> {
    pub job: &'static str,
    pub policy: &'a lull::Policy,
    pub connections: u64,
    pub by_role: BTreeMap<Role, u64>,
    /// Probes sent to idle answering connections, and how many there were.
    pub idle_probes: Option<(u64, u64)>,
    pub expected_dead: Option<u64>,
    pub expected_closed: Option<u64>,
    pub reconnects: u64,
    pub rss_growth: Option<(u64, u64)>,
    pub elapsed: Duration,
    pub interrupted: bool,
    /// The run's UDP flows, if any.
    pub udp: Option<UdpFacts<'a>>,
}

pub fn build(engine: &EngineGroup, tracker: &Tracker, facts: JobFacts<'_>) -> Report {
    let stats: EngineStats = engine.stats();
    let cpu = engine.cpu_time();
    let (user, system) = engine.cpu_split();
    let tally = tracker.total();
    let demo = facts.expected_dead.is_some();
    let role_tally = |role: Role| tracker.found.get(&Some(role)).copied().unwrap_or_default();
    let dead = Outcome {
        found: tally.dead,
        expected: facts.expected_dead,
        unexpected: if demo {
            tally.dead - role_tally(Role::Hung).dead
        } else {
            0
        },
    };
    let closed = Outcome {
        found: tally.closed,
        expected: facts.expected_closed,
        unexpected: if demo {
            tally.closed - role_tally(Role::Closing).closed
        } else {
            0
        },
    };
    let mut mismatches = Vec::new();
    // A run cut short by a signal cannot be blamed for what it had no time to find; what it
    // found that it should not have still counts.
    let complete = !facts.interrupted;
    if let (Some(want), true) = (facts.expected_dead, demo) {
        let hung = role_tally(Role::Hung).dead;
        if complete && hung != want {
            mismatches.push(format!("{hung} of {want} hung peers found dead"));
        }
        if dead.unexpected > 0 {
            mismatches.push(format!(
                "{} connections that were not hung reported dead",
                dead.unexpected
            ));
        }
    }
    if let (Some(want), true) = (facts.expected_closed, demo) {
        let found = role_tally(Role::Closing).closed;
        if complete && found != want {
            mismatches.push(format!("{found} of {want} closing peers found closed"));
        }
        if closed.unexpected > 0 {
            mismatches.push(format!(
                "{} connections that did not close reported closed",
                closed.unexpected
            ));
        }
        if role_tally(Role::Busy).dead + role_tally(Role::Busy).closed > 0 {
            mismatches.push("busy connections were reported".into());
        }
    }
    if tracker.over_bound > 0 {
        mismatches.push(format!(
            "{} detections slower than the bound",
            tracker.over_bound
        ));
    }
    if stats.events_dropped > 0 {
        mismatches.push(format!("{} events dropped", stats.events_dropped));
    }
    let udp = facts.udp.as_ref().map(|udp| {
        udp::build(
            udp,
            &stats,
            tracker,
            facts.elapsed,
            complete,
            &mut mismatches,
        )
    });
    // The demo's UDP flows are watched beside its connections: the engine's cost is theirs too.
    let side_flows = facts
        .udp
        .as_ref()
        .filter(|u| !u.primary)
        .map_or(0, |u| u.flows);
    let h = &tracker.latency_us;
    let ms = |us: u64| us as f64 / 1_000.0;
    let detection_latency = (!h.is_empty()).then(|| Latency {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
        bound_ms: tracker.bound(DeadTier::Application).as_secs_f64() * 1e3,
        transport_bound_ms: facts
            .policy
            .hung_after
            .map(|_| tracker.bound(DeadTier::Transport).as_secs_f64() * 1e3),
        over_bound: tracker.over_bound,
    });
    let conn_hours =
        (facts.connections + side_flows) as f64 * facts.elapsed.as_secs_f64() / 3_600.0;
    Report {
        job: facts.job.into(),
        policy: PolicyReport::of(facts.policy),
        source: engine.source_kind().to_string(),
        engines: engine.len(),
        duration_s: facts.elapsed.as_secs_f64(),
        interrupted: facts.interrupted,
        connections: facts.connections,
        connections_by_role: facts
            .by_role
            .iter()
            .map(|(r, n)| (r.name().to_string(), *n))
            .collect(),
        probes_sent: stats.probes_sent,
        probes_answered: stats.probes_answered,
        probes_deferred: stats.probes_deferred,
        wakeups: stats.wakeups,
        wakeups_found_traffic: stats.wakeups_rearmed,
        idle_probe_rate: facts
            .idle_probes
            .filter(|&(_, conns)| conns > 0 && facts.elapsed > Duration::ZERO)
            .map(|(probes, conns)| ProbeRate {
                measured_per_conn_hour: probes as f64 * 3_600.0
                    / (conns as f64 * facts.elapsed.as_secs_f64()),
                nominal_per_conn_hour: 3_600.0 / facts.policy.nominal_probe_period().as_secs_f64(),
            }),
        drains: stats.drains,
        drains_skipped: stats.drains_skipped,
        dead,
        dead_by_tier: [
            (DeadTier::Transport, tracker.by_tier[0]),
            (DeadTier::Application, tracker.by_tier[1]),
        ]
        .into_iter()
        .map(|(tier, n)| (tier.name().to_string(), n))
        .collect(),
        closed,
        revived: tracker.revived,
        reconnects: facts.reconnects,
        detection_latency,
        engine_cpu_ms: cpu.as_secs_f64() * 1e3,
        engine_cpu_user_ms: user.as_secs_f64() * 1e3,
        engine_cpu_system_ms: system.as_secs_f64() * 1e3,
        engine_cpu_per_probe_us: (stats.probes_sent > 0)
            .then(|| cpu.as_secs_f64() * 1e6 / stats.probes_sent as f64),
        engine_cpu_per_conn_hour_ms: if conn_hours > 0.0 {
            cpu.as_secs_f64() * 1e3 / conn_hours
        } else {
            0.0
        },
        rss_growth_per_conn_bytes: facts
            .rss_growth
            .filter(|(_, n)| *n > 0)
            .map(|(bytes, n)| bytes as f64 / n as f64),
        engine_bytes_per_conn: ENGINE_BYTES_PER_CONN,
        events_dropped: stats.events_dropped,
        udp,
        mismatches,
    }
}

impl Report {
    /// The readable table.
    pub fn to_table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
        row("job", self.job.clone());
        let p = &self.policy;
        row(
            "policy",
            format!(
                "{}, idle {} ms, interval {} ms, count {}, jitter {}, probe {}{}",
                p.mode,
                p.idle_ms,
                p.interval_ms,
                p.count,
                p.jitter,
                p.probe,
                p.hung_after_ms
                    .map_or(String::new(), |ms| format!(", hung after {ms} ms (tiered)"))
                    + &p.expect_reply
                        .as_ref()
                        .map_or(String::new(), |r| format!(", expecting {r}"))
            ),
        );
        row(
            "activity source",
            format!("{} ({} engine thread(s))", self.source, self.engines),
        );
        row(
            "duration",
            format!(
                "{:.1} s{}",
                self.duration_s,
                if self.interrupted {
                    " (interrupted)"
                } else {
                    ""
                }
            ),
        );
        let roles = if self.connections_by_role.is_empty() {
            String::new()
        } else {
            let parts: Vec<String> = self
                .connections_by_role
                .iter()
                .map(|(r, n)| format!("{n} {r}"))
                .collect();
            format!(" ({})", parts.join(", "))
        };
        row("connections", format!("{}{roles}", self.connections));
        row(
            "probes sent",
            format!(
                "{} ({} answered, {} deferred: send buffer not empty)",
                self.probes_sent, self.probes_answered, self.probes_deferred
            ),
        );
        row(
            "timer wakeups",
            format!(
                "{} ({} found traffic and sent nothing)",
                self.wakeups, self.wakeups_found_traffic
            ),
        );
        let outcome = |o: &Outcome, what: &str| match o.expected {
            Some(want) => format!(
                "{} found / {} {what} expected{}",
                o.found,
                want,
                if o.found == want && o.unexpected == 0 {
                    ""
                } else {
                    "  <-- MISMATCH"
                }
            ),
            None => o.found.to_string(),
        };
        let tiers: Vec<String> = self
            .dead_by_tier
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(tier, n)| format!("{n} {tier}"))
            .collect();
        let tiers = if tiers.is_empty() {
            String::new()
        } else {
            format!(" (by tier: {})", tiers.join(", "))
        };
        row("dead", outcome(&self.dead, "hung") + &tiers);
        if let Some(rate) = &self.idle_probe_rate {
            row(
                "idle probe rate",
                format!(
                    "{:.1} per connection-hour (nominal {:.1}: one per period the policy sets)",
                    rate.measured_per_conn_hour, rate.nominal_per_conn_hour
                ),
            );
        }
        row("closed", outcome(&self.closed, "closing"));
        if self.revived > 0 {
            row("revived", self.revived.to_string());
        }
        if self.reconnects > 0 {
            row("reconnects", self.reconnects.to_string());
        }
        match &self.detection_latency {
            Some(l) => row(
                "detection latency",
                format!(
                    "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (bound {:.0} ms{})",
                    l.p50_ms,
                    l.p99_ms,
                    l.max_ms,
                    l.bound_ms,
                    if l.over_bound > 0 {
                        format!(", {} over", l.over_bound)
                    } else {
                        String::new()
                    }
                ),
            ),
            None => row("detection latency", "no dead peers".into()),
        }
        row(
            "engine CPU",
            format!(
                "{:.1} ms total ({:.0} ms user, {:.0} ms system), {} per probe, {:.3} ms per \
                 connection-hour",
                self.engine_cpu_ms,
                self.engine_cpu_user_ms,
                self.engine_cpu_system_ms,
                self.engine_cpu_per_probe_us
                    .map_or("-".into(), |us| format!("{us:.2} µs")),
                self.engine_cpu_per_conn_hour_ms
            ),
        );
        row(
            "engine memory",
            format!(
                "{} B per connection by layout; process RSS grew {} per watched connection",
                self.engine_bytes_per_conn,
                self.rss_growth_per_conn_bytes
                    .map_or("-".into(), |b| format!("{b:.0} B"))
            ),
        );
        if self.events_dropped > 0 {
            row("events dropped", self.events_dropped.to_string());
        }
        if let Some(udp) = &self.udp {
            udp.rows(&mut row);
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::from("\nlull run report\n");
        for (k, v) in rows {
            let _ = writeln!(out, "  {k:<width$}  {v}");
        }
        if self.mismatches.is_empty() {
            out.push_str("  result: as expected\n");
        } else {
            let _ = writeln!(out, "  result: MISMATCH: {}", self.mismatches.join("; "));
        }
        out
    }
}
