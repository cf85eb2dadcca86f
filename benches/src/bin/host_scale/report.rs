//! host-scale's tables, goals, notes and the `figures` object of host-scale.json.

use std::{path::Path, time::Duration};

use anyhow::Result;
use lull_benches::{BenchReport, Series, Table};
use serde::Serialize;

use crate::RunArgs;

/// What the start of `lull host` did with the first step's connections.
#[derive(Debug)]
pub struct Pickup {
    pub conns: u64,
    pub picked: u64,
    pub start: Duration,
    /// Slab growth across the start, per connection: the socket storage lull adds.
    pub kernel_bytes_per_conn: f64,
    pub log: String,
}

/// One step of the ladder.
#[derive(Debug)]
pub struct Step {
    pub conns: u64,
    pub watched: u64,
    pub lull_cpu_percent: f64,
    pub lull_rss: u64,
    pub lull_rss_growth_per_conn: f64,
    pub slab_per_conn: f64,
    pub ls: Duration,
    pub ls_rows: u64,
    pub ls_no_process: Duration,
    pub sample: u64,
    pub verdicts: u64,
    /// keepalive_timeout latencies, sorted.
    pub latencies: Vec<Duration>,
    pub bound: Duration,
}

impl Step {
    fn within_bound(&self) -> u64 {
        self.latencies.iter().filter(|d| **d <= self.bound).count() as u64
    }

    fn latency_max(&self) -> Option<Duration> {
        self.latencies.last().copied()
    }

    fn latency_median(&self) -> Option<Duration> {
        self.latencies.get(self.latencies.len() / 2).copied()
    }
}

#[derive(Serialize)]
struct StepFigures {
    connections: u64,
    watched: u64,
    lull_cpu_percent_of_core: f64,
    lull_rss_bytes: u64,
    lull_rss_bytes_per_connection: f64,
    lull_rss_growth_bytes_per_added_connection: f64,
    kernel_slab_bytes_per_connection_both_ends: f64,
    ls_json_seconds: f64,
    ls_json_rows: u64,
    ls_json_no_process_seconds: f64,
    sampled_vanished: u64,
    sampled_verdicts: u64,
    sampled_keepalive_timeouts: u64,
    sampled_within_bound: u64,
    verdict_latency_median_seconds: Option<f64>,
    verdict_latency_max_seconds: Option<f64>,
    verdict_bound_seconds: f64,
}

#[derive(Serialize)]
struct Figures {
    ladder: Vec<u64>,
    max_connections_reached: u64,
    stopped_by: Option<String>,
    pickup_connections: u64,
    pickup_picked_up: u64,
    pickup_start_seconds: f64,
    lull_kernel_bytes_per_connection: f64,
    steps: Vec<StepFigures>,
}

#[derive(Serialize)]
struct Output<'a> {
    #[serde(flatten)]
    report: &'a BenchReport,
    figures: &'a Figures,
}

/// The report, plus the figures that go into host-scale.json.
pub struct HostScaleReport {
    report: BenchReport,
    figures: Figures,
}

impl HostScaleReport {
    /// Prints the report and writes host-scale.json (with a top-level `figures` object) and
    /// host-scale.md into `out`.
    pub fn emit(&self, out: Option<&Path>) -> Result<()> {
        self.report.emit(out)?;
        if let Some(dir) = out {
            let json = serde_json::to_string_pretty(&Output {
                report: &self.report,
                figures: &self.figures,
            })?;
            std::fs::write(dir.join("host-scale.json"), json)?;
        }
        Ok(())
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

pub fn build(
    args: &RunArgs,
    pickup: &Pickup,
    steps: &[Step],
    stopped_by: Option<String>,
    window: Duration,
) -> HostScaleReport {
    let mut report = BenchReport::new("host-scale");
    let mut table = Table::new(
        "lull host at each step of the ladder",
        &[
            "connections",
            "watched",
            "lull CPU (% core)",
            "lull RSS",
            "lull B/conn",
            "kernel B/conn (both ends)",
            "ls --json (s)",
            "rows",
            "ls --no-process (s)",
            "vanished: verdicts in bound",
            "latency median / max (s)",
        ],
    );
    for s in steps {
        table.row(vec![
            s.conns.to_string(),
            s.watched.to_string(),
            format!("{:.3}", s.lull_cpu_percent),
            format!("{:.1} MiB", s.lull_rss as f64 / (1 << 20) as f64),
            format!("{:.1}", s.lull_rss as f64 / s.conns as f64),
            format!("{:.0}", s.slab_per_conn),
            secs(s.ls),
            s.ls_rows.to_string(),
            secs(s.ls_no_process),
            format!("{}/{}", s.within_bound(), s.sample),
            match (s.latency_median(), s.latency_max()) {
                (Some(m), Some(x)) => format!("{} / {}", secs(m), secs(x)),
                _ => "-".into(),
            },
        ]);
    }
    report.tables.push(table);
    let mut start = Table::new(
        "lull host's start over connections that already existed",
        &[
            "connections",
            "picked up",
            "start (s)",
            "lull's kernel B/conn",
        ],
    );
    start.row(vec![
        pickup.conns.to_string(),
        pickup.picked.to_string(),
        secs(pickup.start),
        format!("{:.0}", pickup.kernel_bytes_per_conn),
    ]);
    report.tables.push(start);

    let top = steps.last();
    let reached = top.map_or(0, |s| s.conns);
    report.goal(
        "watched connections on this VM",
        ">= 1,000,000",
        reached.to_string(),
        top.is_some_and(|s| s.watched >= 1_000_000),
    );
    if let Some(s) = top {
        let worst_cpu = steps.iter().map(|s| s.lull_cpu_percent).fold(0.0, f64::max);
        report.goal(
            "lull host's own CPU while the connections idle (worst step)",
            "<= 1% of a core",
            format!("{worst_cpu:.3}%"),
            worst_cpu <= 1.0,
        );
        let per_conn = s.lull_rss as f64 / s.conns as f64;
        report.goal(
            &format!(
                "lull memory per connection at {} (RSS / connections)",
                s.conns
            ),
            "<= 64 B",
            format!("{per_conn:.1} B"),
            per_conn <= 64.0,
        );
        report.goal(
            &format!("`lull ls --json` over {} rows", s.ls_rows),
            "<= 2 s at 1M rows",
            format!("{} s", secs(s.ls)),
            s.ls <= Duration::from_secs(2) && s.ls_rows >= 1_000_000,
        );
        let (within, sampled): (u64, u64) = steps
            .iter()
            .fold((0, 0), |(w, n), s| (w + s.within_bound(), n + s.sample));
        report.goal(
            "sampled vanished clients with a keepalive_timeout verdict in the bound",
            "all",
            format!("{within}/{sampled}"),
            within == sampled && sampled > 0,
        );
    }
    if let Some(why) = &stopped_by {
        report
            .notes
            .push(format!("The ladder stopped short: {why}."));
    }
    report.notes.extend([
        format!(
            "Ladder {:?}, at most {} sockets per process (the fd limit is 20,000), clients from \
             127.0.0.2-9, all in a private network namespace. lull host holds no file \
             descriptor and no memory per connection: its RSS is fixed costs (the mapped \
             16 MiB verdict ring, BTF, the BPF object).",
            args.ladder, args.per_process
        ),
        format!(
            "lull CPU is its threads' schedstat time over a {}-s idle window; kernel memory is \
             the growth of Slab in /proc/meminfo since before the first connection, divided \
             by connections (each has two sockets here, both ends on this host).",
            window.as_secs()
        ),
        format!(
            "lull's own kernel memory per connection is the Slab growth across `lull host`'s \
             start, which picked up {} existing connections: their socket storage. lull host \
             said of them: \"{}\".",
            pickup.conns, pickup.log
        ),
        "`lull ls --json` is timed from its start to the end of its output, read through a \
         pipe; it walks the TCP tables of every network namespace (the client ends too) and \
         every open file on the host (for the process column; --no-process skips that)."
            .to_string(),
        format!(
            "Each step makes {} sample connections to a rule with idle 5 s, interval 1 s, count \
             3, lets one keepalive round pass, then drops all their traffic; latency is from \
             the drop to the verdict's line in lull's events file (bound 9 s).",
            args.sample
        ),
    ]);
    report.series.push(Series {
        chart: "host-scale-ls".into(),
        title: "lull ls --json wall time against watched connections".into(),
        name: "ls --json".into(),
        x_label: "connections".into(),
        y_label: "seconds".into(),
        log_x: false,
        points: steps
            .iter()
            .map(|s| (s.conns as f64, s.ls.as_secs_f64()))
            .collect(),
        lines_only: false,
    });
    let figures = Figures {
        ladder: args.ladder.clone(),
        max_connections_reached: reached,
        stopped_by,
        pickup_connections: pickup.conns,
        pickup_picked_up: pickup.picked,
        pickup_start_seconds: pickup.start.as_secs_f64(),
        lull_kernel_bytes_per_connection: pickup.kernel_bytes_per_conn,
        steps: steps
            .iter()
            .map(|s| StepFigures {
                connections: s.conns,
                watched: s.watched,
                lull_cpu_percent_of_core: s.lull_cpu_percent,
                lull_rss_bytes: s.lull_rss,
                lull_rss_bytes_per_connection: s.lull_rss as f64 / s.conns as f64,
                lull_rss_growth_bytes_per_added_connection: s.lull_rss_growth_per_conn,
                kernel_slab_bytes_per_connection_both_ends: s.slab_per_conn,
                ls_json_seconds: s.ls.as_secs_f64(),
                ls_json_rows: s.ls_rows,
                ls_json_no_process_seconds: s.ls_no_process.as_secs_f64(),
                sampled_vanished: s.sample,
                sampled_verdicts: s.verdicts,
                sampled_keepalive_timeouts: s.latencies.len() as u64,
                sampled_within_bound: s.within_bound(),
                verdict_latency_median_seconds: s.latency_median().map(|d| d.as_secs_f64()),
                verdict_latency_max_seconds: s.latency_max().map(|d| d.as_secs_f64()),
                verdict_bound_seconds: s.bound.as_secs_f64(),
            })
            .collect(),
    };
    HostScaleReport { report, figures }
}
