//! The report's tables: one row per strategy in each, figures absolute and as ratios to
//! lull-ebpf (the notes are in `notes.rs`).

use std::time::Duration;

use lull_benches::{BenchReport, Series, Table, thousands};

use crate::{
    env::{Background, Environment},
    measured::{Measured, Outcome, Status},
    plan::Plan,
    proto::{Role, Strategy},
};

/// `values` at quantile `q` (nearest rank), or `None` if empty.
fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied()
}

fn caught(found: usize, of: u64) -> String {
    if of == 0 {
        "—".into()
    } else {
        format!("{found}/{of}")
    }
}

fn latencies(ms: &[f64]) -> String {
    match (quantile(ms, 0.5), quantile(ms, 0.99)) {
        (Some(p50), Some(p99)) => format!("{p50:.0} / {p99:.0}"),
        _ => "—".into(),
    }
}

/// A row for a strategy that did not run: its name and why, then dashes.
fn missing_row(outcome: &Outcome, columns: usize) -> Vec<String> {
    let what = match &outcome.status {
        Status::Unavailable(_) => "unavailable",
        Status::Failed(_) => "failed",
        Status::Ran(_) => "",
    };
    let mut row = vec![outcome.strategy.label().to_string(), what.to_string()];
    row.resize(columns, "—".into());
    row
}

/// A table with a row per strategy, in run order: its name, then `cells` of what it measured,
/// or [`missing_row`] if it did not run.
fn per_strategy(
    title: impl Into<String>,
    columns: &[&str],
    outcomes: &[Outcome],
    cells: impl Fn(&Measured) -> Vec<String>,
) -> Table {
    let mut table = Table::new(title, columns);
    for outcome in outcomes {
        table.row(match outcome.measured() {
            Some(m) => [vec![outcome.strategy.label().to_string()], cells(m)].concat(),
            None => missing_row(outcome, columns.len()),
        });
    }
    table
}

/// lull-ebpf's CPU per connection-hour among `outcomes`, the base of every "vs lull-ebpf".
fn lull_ebpf_per_conn_hour(outcomes: &[Outcome]) -> Option<f64> {
    outcomes
        .iter()
        .find(|o| o.strategy == Strategy::LullEbpf)
        .and_then(Outcome::measured)
        .map(Measured::per_conn_hour)
}

/// `m`'s CPU per connection-hour as a multiple of `baseline`.
fn vs(m: &Measured, baseline: Option<f64>) -> String {
    match baseline {
        Some(b) if b > 0.0 => format!("{:.2}x", m.per_conn_hour() / b),
        _ => "—".into(),
    }
}

/// Every strategy at one connection count.
pub struct Pass {
    pub conns: u64,
    pub outcomes: Vec<Outcome>,
}

pub fn build(
    mut report: BenchReport,
    plan: &Plan,
    env: &Environment,
    passes: &[Pass],
    backgrounds: &[Background],
    backlog: Option<(u64, u64)>,
    elapsed: Duration,
) -> BenchReport {
    // The detailed tables are for the largest pass, the last.
    let outcomes: &[Outcome] = passes.last().map_or(&[], |p| &p.outcomes);
    report.tables.extend([
        main_table(plan, outcomes),
        cpu_table(outcomes),
        work_table(outcomes),
        memory_table(outcomes),
    ]);
    scaling(&mut report, plan, passes);
    latency_distribution(&mut report, outcomes);

    crate::notes::notes(
        &mut report,
        plan,
        env,
        outcomes,
        (backgrounds, backlog),
        elapsed,
    );
    report
}

/// Cost, detection and kernel memory: the table the others explain.
fn main_table(plan: &Plan, outcomes: &[Outcome]) -> Table {
    let t = plan.timing;
    let baseline = lull_ebpf_per_conn_hour(outcomes);
    let title = format!(
        "keepalive over real loopback sockets: idle {} s, interval {} s, count {} (bound {} s), \
         {:.0} s window per strategy",
        t.idle().as_secs_f64(),
        t.interval().as_secs_f64(),
        t.count,
        t.bound().as_secs_f64(),
        plan.window.as_secs_f64(),
    );
    let columns = [
        "strategy",
        "connections",
        "probes sent",
        "CPU ms",
        "CPU µs/probe",
        "CPU ms/conn-hour",
        "vs lull-ebpf",
        "hung caught",
        "hung p50 / p99 ms",
        "vanished caught",
        "vanished p50 / p99 ms",
        "kernel B/conn",
    ];
    per_strategy(title, &columns, outcomes, |m| {
        vec![
            thousands(m.conns),
            thousands(m.probes),
            format!("{:.0}", m.cpu.ours()),
            m.per_probe_us().map_or("—".into(), |us| format!("{us:.1}")),
            format!("{:.1}", m.per_conn_hour()),
            vs(m, baseline),
            caught(m.hung_ms.len(), m.roles[Role::Hung.index()]),
            latencies(&m.hung_ms),
            caught(m.vanished_ms.len(), m.roles[Role::Vanishing.index()]),
            latencies(&m.vanished_ms),
            format!("{:.0}", m.slab_per_conn()),
        ]
    })
}

/// Where each strategy's CPU figure comes from.
fn cpu_table(outcomes: &[Outcome]) -> Table {
    let title = "where the CPU went over each window (CPU = the run's processes + softirq charged \
                 to anything else - that softirq's background; softirq in them is already in \
                 their times)";
    let columns = [
        "strategy",
        "workers usr/sys ms",
        "peers usr/sys ms",
        "orchestrator ms",
        "softirq in them ms",
        "softirq on idle CPUs ms",
        "softirq in other tasks ms",
        "- background",
        "= CPU ms",
        "whole system ms",
        "other processes ms",
        "whole less others ms",
    ];
    per_strategy(title, &columns, outcomes, |m| {
        let c = &m.cpu;
        let ms = |x: Option<f64>| x.map_or("—".into(), |x| format!("{x:.0}"));
        let background = match c.softirq_elsewhere() {
            Some((_, background)) => background,
            None => c.background.whole_less_others * c.window_s,
        };
        vec![
            format!("{:.0} / {:.0}", c.workers_user, c.workers_sys),
            format!("{:.0} / {:.0}", c.peers_user, c.peers_sys),
            format!("{:.0}", c.orchestrator),
            ms(c.softirq(1).map(|s| s.0)),
            ms(c.softirq(0).map(|s| s.0)),
            ms(c.softirq(2).map(|s| s.0)),
            format!("{background:.0}"),
            format!("{:.0}", c.ours()),
            format!("{:.0}", c.whole),
            format!("{:.0}", c.others),
            format!("{:.0}", c.whole_less_others()),
        ]
    })
}

/// Probes, wakeups and packets: the work behind the CPU figures.
fn work_table(outcomes: &[Outcome]) -> Table {
    let title = "the work over each window (workers are the client side, the part that stays on \
                 this host on a real network)";
    let columns = [
        "strategy",
        "probes/conn-hour",
        "workers CPU µs/probe",
        "worker wakeups/s",
        "peer wakeups/s",
        "TCP segments",
        "segments/probe",
        "backlog drops",
    ];
    per_strategy(title, &columns, outcomes, |m| {
        let per_probe = |x: f64| {
            if m.probes > 0 {
                format!("{:.1}", x / m.probes as f64)
            } else {
                "—".into()
            }
        };
        let secs = m.window.as_secs_f64();
        vec![
            format!("{:.0}", m.probes as f64 / m.hours()),
            per_probe((m.cpu.workers_user + m.cpu.workers_sys) * 1e3),
            format!("{:.0}", m.wakeups.0 as f64 / secs),
            format!("{:.0}", m.wakeups.1 as f64 / secs),
            thousands(m.segments),
            per_probe(m.segments as f64),
            thousands(m.drops),
        ]
    })
}

/// Kernel and worker memory per connection, by every reading taken.
fn memory_table(outcomes: &[Outcome]) -> Table {
    let title = "memory per connection (growth from before the workers started to every \
                 connection up; a connection is both ends' sockets)";
    let columns = [
        "strategy",
        "Slab B/conn",
        "SUnreclaim B/conn",
        "slab objects B/conn",
        "caches that grew with them",
        "worker RSS B/conn",
        "largest slab growth, B/conn",
    ];
    per_strategy(title, &columns, outcomes, |m| {
        let per = |b: i64| format!("{:.0}", b as f64 / m.conns as f64);
        let top: Vec<String> = m
            .memory
            .top
            .iter()
            .filter(|(_, b)| *b > 0)
            .map(|(name, b)| format!("{name} {}", per(*b)))
            .collect();
        vec![
            per(m.memory.slab),
            per(m.memory.unreclaimable),
            m.memory.objects.map_or("—".into(), |(all, _)| per(all)),
            m.memory
                .objects
                .map_or("—".into(), |(_, sockets)| per(sockets)),
            per(m.memory.rss),
            top.join(", "),
        ]
    })
}

/// CPU against connection count: a table and a chart, one line per strategy.
fn scaling(report: &mut BenchReport, plan: &Plan, passes: &[Pass]) {
    let columns = [
        "strategy",
        "connections",
        "CPU ms",
        "CPU, % of one core",
        "CPU ms/conn-hour",
        "vs lull-ebpf",
    ];
    let mut table = Table::new(
        format!(
            "CPU against connection count (same timing and mix at every count; {:.0} s window)",
            plan.window.as_secs_f64()
        ),
        &columns,
    );
    let mut lines: Vec<(Strategy, Vec<(f64, f64)>)> = Vec::new();
    for pass in passes {
        let baseline = lull_ebpf_per_conn_hour(&pass.outcomes);
        for outcome in &pass.outcomes {
            let Some(m) = outcome.measured() else {
                let mut row = missing_row(outcome, columns.len());
                row[1] = thousands(pass.conns);
                table.row(row);
                continue;
            };
            let core_pct = m.cpu.ours() / (m.window.as_secs_f64() * 1e3) * 100.0;
            table.row(vec![
                outcome.strategy.label().into(),
                thousands(m.conns),
                format!("{:.0}", m.cpu.ours()),
                format!("{core_pct:.1}"),
                format!("{:.1}", m.per_conn_hour()),
                vs(m, baseline),
            ]);
            match lines.iter_mut().find(|(s, _)| *s == outcome.strategy) {
                Some((_, points)) => points.push((m.conns as f64, core_pct)),
                None => lines.push((outcome.strategy, vec![(m.conns as f64, core_pct)])),
            }
        }
    }
    report.tables.push(table);
    for (strategy, points) in lines {
        report.series.push(Series {
            chart: "real-cpu-vs-connections".into(),
            title: "Whole-system CPU against connection count, real loopback sockets".into(),
            name: strategy.label().into(),
            x_label: "connections (both ends on this host)".into(),
            y_label: "CPU, % of one core".into(),
            log_x: true,
            points,
            lines_only: false,
        });
    }
}

/// Most points a distribution line keeps: enough for its shape, few enough for an SVG.
const CDF_POINTS: usize = 200;

/// The detection-latency distribution: for each strategy, the fraction of all dead peers
/// (hung and vanished together) reported by each time after they died. A strategy that cannot
/// see hung peers levels off at their share.
fn latency_distribution(report: &mut BenchReport, outcomes: &[Outcome]) {
    for outcome in outcomes {
        let Some(m) = outcome.measured() else {
            continue;
        };
        let dead = m.roles[Role::Hung.index()] + m.roles[Role::Vanishing.index()];
        if dead == 0 {
            continue;
        }
        let mut ms: Vec<f64> = m.hung_ms.iter().chain(&m.vanished_ms).copied().collect();
        ms.sort_by(f64::total_cmp);
        let step = ms.len().div_ceil(CDF_POINTS).max(1);
        let mut points: Vec<(f64, f64)> = ms
            .iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0 || *i + 1 == ms.len())
            .map(|(i, &t)| (t, (i + 1) as f64 / dead as f64))
            .collect();
        points.insert(0, (0.0, 0.0));
        report.series.push(Series {
            chart: "real-detection-latency".into(),
            title: "Dead peers reported, by time since they died (hung + vanished)".into(),
            name: format!(
                "{} ({}/{} caught)",
                outcome.strategy.label(),
                ms.len(),
                dead
            ),
            x_label: "ms since the peer hung or vanished".into(),
            y_label: "fraction of dead peers reported".into(),
            log_x: false,
            points,
            lines_only: true,
        });
    }
}
