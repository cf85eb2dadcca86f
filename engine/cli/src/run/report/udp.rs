//! The UDP part of the report: the run's UDP flows (`--connect udp://`'s, or the demo's UDP
//! share), what lull sent them against what a fixed-period sender would, and what it found.

use std::{collections::BTreeMap, time::Duration};

use lull::EngineStats;
use serde::Serialize;

use super::{Outcome, PolicyReport};
use crate::{run::tracker::Tracker, schedule::Role};

/// The UDP flows of a run.
#[derive(Debug, Serialize)]
pub struct UdpReport {
    pub flows: u64,
    pub flows_by_role: BTreeMap<String, u64>,
    /// Who saw each flow's datagrams: flows per observer (`ebpf`: the kernel programs, for
    /// connected sockets; `wrapper`: the handles' own send and receive calls).
    pub observers: BTreeMap<String, u64>,
    pub policy: PolicyReport,
    /// Datagrams lull sent: keep-warm datagrams, or liveness probes.
    pub probes_sent: u64,
    /// The same per flow-hour, against a fixed-period sender's: one datagram per interval
    /// (keep-warm) or per idle period (detect-dead) on every flow, busy or not.
    pub probes_per_flow_hour: f64,
    pub eager_per_flow_hour: f64,
    /// Probes sent to flows whose own traffic is more frequent than the policy's period
    /// (the demo's busy peers): 0 is the goal.
    pub busy_probes: Option<u64>,
    /// Datagrams read from the peers that start with the expected reply, and the others.
    pub replies: u64,
    pub other_datagrams: u64,
    pub dead: Outcome,
    /// Detection latency of the demo's hung UDP peers (for `--connect udp://`, the report's
    /// own `detection_latency`): p50, p99 and max, in ms.
    pub detection_latency_ms: Option<[f64; 3]>,
}

/// What the job knows of its UDP flows that the engine does not.
pub struct UdpFacts<'a> {
    pub policy: &'a lull::Policy,
    pub flows: u64,
    pub by_role: BTreeMap<Role, u64>,
    pub observers: BTreeMap<String, u64>,
    pub replies: u64,
    pub other_datagrams: u64,
    pub busy_probes: Option<u64>,
    /// Hung flows the demo started; `None` for `--connect`.
    pub expected_dead: Option<u64>,
    /// The flows are the job's own population (`--connect udp://`), tracked like its
    /// connections, rather than the demo's share beside its TCP connections.
    pub primary: bool,
}

/// Builds the UDP report, and adds what did not come out as expected to `mismatches`.
pub fn build(
    facts: &UdpFacts<'_>,
    stats: &EngineStats,
    tracker: &Tracker,
    elapsed: Duration,
    complete: bool,
    mismatches: &mut Vec<String>,
) -> UdpReport {
    let (total, found) = if facts.primary {
        (tracker.total(), &tracker.found)
    } else {
        (tracker.total_udp(), &tracker.found_udp)
    };
    let role = |r: Role| found.get(&Some(r)).copied().unwrap_or_default();
    let demo = facts.expected_dead.is_some();
    let dead = Outcome {
        found: total.dead,
        expected: facts.expected_dead,
        unexpected: if demo {
            total.dead - role(Role::Hung).dead
        } else {
            0
        },
    };
    if let Some(want) = facts.expected_dead {
        let hung = role(Role::Hung).dead;
        if complete && hung != want {
            mismatches.push(format!("{hung} of {want} hung UDP peers found dead"));
        }
        if dead.unexpected > 0 {
            mismatches.push(format!(
                "{} UDP flows that were not hung reported dead",
                dead.unexpected
            ));
        }
    }
    if let Some(busy) = facts.busy_probes.filter(|&n| n > 0) {
        mismatches.push(format!(
            "{busy} probes to UDP flows whose own traffic is more frequent than the policy's period"
        ));
    }
    if facts.primary && facts.policy.expect_reply.is_some() && facts.other_datagrams > 0 {
        mismatches.push(format!(
            "{} datagrams from the peer did not start with --expect-reply",
            facts.other_datagrams
        ));
    }
    let flow_hours = facts.flows as f64 * elapsed.as_secs_f64() / 3_600.0;
    let period = match facts.policy.mode {
        lull::Mode::KeepWarm => facts.policy.interval,
        lull::Mode::DetectDead => facts.policy.nominal_probe_period(),
    };
    UdpReport {
        flows: facts.flows,
        flows_by_role: facts
            .by_role
            .iter()
            .map(|(r, n)| (r.name().to_string(), *n))
            .collect(),
        observers: facts.observers.clone(),
        policy: PolicyReport::of(facts.policy),
        probes_sent: stats.datagram_probes_sent,
        probes_per_flow_hour: if flow_hours > 0.0 {
            stats.datagram_probes_sent as f64 / flow_hours
        } else {
            0.0
        },
        eager_per_flow_hour: 3_600.0 / period.as_secs_f64(),
        busy_probes: facts.busy_probes,
        replies: facts.replies,
        other_datagrams: facts.other_datagrams,
        dead,
        detection_latency_ms: {
            let h = &tracker.latency_udp_us;
            let ms = |us: u64| us as f64 / 1_000.0;
            (!h.is_empty()).then(|| {
                [
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    ms(h.max()),
                ]
            })
        },
    }
}

impl UdpReport {
    /// Rows of the readable table.
    pub fn rows(&self, row: &mut impl FnMut(&str, String)) {
        let observers: Vec<String> = self
            .observers
            .iter()
            .map(|(o, n)| format!("{n} {o}"))
            .collect();
        let roles: Vec<String> = self
            .flows_by_role
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect();
        row(
            "UDP flows",
            format!(
                "{}{}; seen by: {}",
                self.flows,
                if roles.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", roles.join(", "))
                },
                observers.join(", ")
            ),
        );
        row(
            "UDP probes",
            format!(
                "{} sent, {:.1} per flow-hour (a fixed-period sender: {:.1}){}",
                self.probes_sent,
                self.probes_per_flow_hour,
                self.eager_per_flow_hour,
                self.busy_probes
                    .map_or(String::new(), |n| format!("; {n} to busy flows"))
            ),
        );
        row(
            "UDP replies",
            format!(
                "{} matching the expected reply, {} other datagrams",
                self.replies, self.other_datagrams
            ),
        );
        let dead = match self.dead.expected {
            Some(want) => format!(
                "{} found / {want} hung expected{}",
                self.dead.found,
                if self.dead.found == want && self.dead.unexpected == 0 {
                    ""
                } else {
                    "  <-- MISMATCH"
                }
            ),
            None => self.dead.found.to_string(),
        };
        let latency = self
            .detection_latency_ms
            .map_or(String::new(), |[p50, p99, max]| {
                format!(", detected in p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms")
            });
        row("UDP dead", dead + &latency);
    }
}
