//! `udp`: keep-warm datagrams per flow-hour, lull against an eager fixed-period sender (issue
//! 14).
//!
//! Every UDP keepalive we know of (WireGuard's persistent keepalive aside, whose timer traffic
//! resets) goes out on a fixed period, traffic or not. lull sends one only after a
//! whole interval with nothing sent. Here real loopback flows, 20% of them carrying traffic
//! more often than the interval, are held side by side for the same time by:
//!
//! - `lull-ebpf`: connected sockets on the eBPF engine; the busy flows send through the bare
//!   socket, and the kernel's egress program sees it;
//! - `lull-wrapper`: connected sockets on the `TCP_INFO` engine; the busy flows send through
//!   the watched handle, which stamps the flow;
//! - `eager`: the same sockets and traffic, and a keepalive on every flow every interval.
//!
//! One sink receives everything and counts, per source port, keep-warm datagrams and the
//! application's own, in a window that starts once every sender is in its steady state.
//! Goals: no keep-warm datagram at all on the busy flows, and on the idle ones the eager
//! sender's count, no more.

mod flows;

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, ensure};
use clap::Parser;
use lull_benches::{BenchReport, Table, net_counter};
use serde_json::json;

use crate::flows::{Counts, Mix, Strategy, run};

/// Keep-warm datagrams per flow-hour: lull against an eager fixed-period sender.
#[derive(Parser, Debug)]
#[command(name = "udp")]
struct Args {
    /// Short run: fewer flows, 20 s.
    #[arg(long)]
    quick: bool,
    /// Flows per strategy [default: 1000, quick: 200].
    #[arg(long)]
    flows: Option<usize>,
    /// Seconds held [default: 60, quick: 20].
    #[arg(long)]
    seconds: Option<u64>,
    /// The keep-warm interval, in ms [default: 1000].
    #[arg(long)]
    interval_ms: Option<u64>,
    /// Directory for `udp.json` and `udp.md`.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The share of flows that carry traffic, and how often they send, as a fraction of the
/// interval (more often than it).
const BUSY_SHARE: f64 = 0.2;
const BUSY_PERIOD: f64 = 0.5;

fn main() -> Result<()> {
    let args = Args::parse();
    let flows = args.flows.unwrap_or(if args.quick { 200 } else { 1_000 });
    let seconds = args.seconds.unwrap_or(if args.quick { 20 } else { 60 });
    let interval = Duration::from_millis(args.interval_ms.unwrap_or(1_000));
    ensure!(flows >= 5, "--flows must be at least 5");
    ensure!(
        Duration::from_secs(seconds) >= interval * 8,
        "--seconds must be at least 8 intervals"
    );
    let mix = Mix {
        flows,
        busy: (flows as f64 * BUSY_SHARE).round() as usize,
        busy_every: interval.mul_f64(BUSY_PERIOD),
        interval,
        held: Duration::from_secs(seconds),
        // Counted once every sender is in its steady state: the eager sender's first
        // keepalives are staggered over an interval, lull's first come 1 to 1.1 intervals in.
        warmup: interval * 2,
    };
    let drops_before = net_counter("/proc/net/snmp", "Udp:", "RcvbufErrors")?;
    let result = run(&mix)?;
    let drops = net_counter("/proc/net/snmp", "Udp:", "RcvbufErrors")? - drops_before;

    let mut report = BenchReport::new("udp");
    let hours = |n: usize| n as f64 * result.window.as_secs_f64() / 3_600.0;
    let per_hour = |count: u64, n: usize| count as f64 / hours(n);
    let mut table = Table::new(
        format!(
            "Datagrams per flow-hour: {flows} flows per strategy, {} busy (traffic every {:?}), \
             keep-warm interval {interval:?}, counted over {:.0?}",
            mix.busy, mix.busy_every, result.window
        ),
        &[
            "strategy",
            "observer",
            "keep-warm, busy flows",
            "keep-warm, idle flows",
            "keep-warm, all flows",
            "application, busy flows",
            "engine CPU ms/flow-hour",
        ],
    );
    let mut figures = serde_json::Map::new();
    let mut all = serde_json::Map::new();
    let eager_idle = result
        .strategies
        .iter()
        .find(|s| s.strategy == Strategy::Eager)
        .map(|s| per_hour(s.counts.keep_warm_idle, mix.flows - mix.busy));
    for s in &result.strategies {
        let Counts {
            keep_warm_busy,
            keep_warm_idle,
            app_busy,
        } = s.counts;
        let busy = per_hour(keep_warm_busy, mix.busy);
        let idle = per_hour(keep_warm_idle, mix.flows - mix.busy);
        let every = per_hour(keep_warm_busy + keep_warm_idle, mix.flows);
        let cpu = s
            .engine_cpu
            .map(|cpu| cpu.as_secs_f64() * 1e3 / hours(mix.flows));
        table.row(vec![
            s.strategy.name().into(),
            s.observer.clone(),
            format!("{busy:.1}"),
            format!("{idle:.1}"),
            format!("{every:.1}"),
            format!("{:.1}", per_hour(app_busy, mix.busy)),
            cpu.map_or("-".into(), |ms| format!("{ms:.2}")),
        ]);
        figures.insert(
            s.strategy.name().into(),
            json!({ "busy": busy, "idle": idle }),
        );
        all.insert(s.strategy.name().into(), json!(every));
        if s.strategy != Strategy::Eager {
            report.goal(
                &format!(
                    "{}: keep-warm datagrams on flows busier than the interval",
                    s.strategy.name()
                ),
                "0",
                keep_warm_busy.to_string(),
                keep_warm_busy == 0,
            );
            if let Some(eager) = eager_idle {
                report.goal(
                    &format!(
                        "{}: keep-warm datagrams per idle flow-hour",
                        s.strategy.name()
                    ),
                    &format!("<= the eager sender's ({eager:.1})"),
                    format!("{idle:.1}"),
                    idle <= eager * 1.001,
                );
            }
        }
    }
    report.tables.push(table);
    report.figures = json!({
        "interval_s": interval.as_secs_f64(),
        "flows_per_strategy": mix.flows,
        "busy_share": BUSY_SHARE,
        "busy_every_s": mix.busy_every.as_secs_f64(),
        "window_s": result.window.as_secs_f64(),
        "keep_warm_per_flow_hour": figures,
        "keep_warm_per_flow_hour_all_flows": all,
        "sink_drops": drops,
    });
    report.notes.push(format!(
        "A fixed-period sender sends {:.0} keep-warm datagrams per flow-hour, busy or not; lull \
         sends none to a flow that sent something within the interval, and then one per \
         interval of silence. The first keep-warm datagram after the application's last goes \
         out between one interval and one interval plus the jitter (10%) after it, never \
         before: the window is late, so that traffic close to the interval draws nothing.",
        3_600.0 / interval.as_secs_f64()
    ));
    report.notes.push(format!(
        "The sink's receive buffer dropped {drops} datagrams during the run (UDP RcvbufErrors \
         on this host, any process's): counts are exact when it is 0."
    ));
    if let Some(why) = &result.skipped {
        report.notes.push(why.clone());
    }
    report.emit(args.out.as_deref())
}
