//! The report's tables: one row per mix and strategy in each, figures absolute and as ratios
//! to lull-ebpf in the same mix (the figures and goals are in `figures.rs`, the notes in
//! `notes.rs`).

use std::time::Duration;

use lull_benches::{BenchReport, Series, Table, thousands};

use crate::{
    env::{Background, Environment},
    measured::{Measured, Outcome, Pass, Status, quantile},
    plan::{Plan, VERDICT_SLACK},
    proto::{Mix, Role, Strategy, Tier},
};

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

/// A row for a strategy that did not run: its mix and name and why, then dashes.
fn missing_row(mix: Mix, outcome: &Outcome, columns: usize) -> Vec<String> {
    let what = match &outcome.status {
        Status::Unavailable(_) => "unavailable",
        Status::Failed(_) => "failed",
        Status::Ran(_) => "",
    };
    let mut row = vec![
        mix.label().to_string(),
        outcome.strategy.label().to_string(),
        what.to_string(),
    ];
    row.resize(columns, "—".into());
    row
}

/// A table with a row per mix and strategy, in run order: the mix, the strategy's name, then
/// `cells` of what it measured (given the pass, for ratios within it), or [`missing_row`].
/// `columns` leaves out the first two, which every such table has.
fn per_strategy(
    title: impl Into<String>,
    columns: &[&str],
    passes: &[&Pass],
    cells: impl Fn(&Pass, Strategy, &Measured) -> Option<Vec<String>>,
) -> Table {
    let all: Vec<&str> = ["mix", "strategy"].iter().chain(columns).copied().collect();
    let mut table = Table::new(title, &all);
    for pass in passes {
        for outcome in &pass.outcomes {
            let row = match outcome.measured() {
                Some(m) => match cells(pass, outcome.strategy, m) {
                    Some(cells) => [
                        vec![pass.mix.label().into(), outcome.strategy.label().into()],
                        cells,
                    ]
                    .concat(),
                    None => continue,
                },
                None => missing_row(pass.mix, outcome, all.len()),
            };
            table.row(row);
        }
    }
    table
}

/// `m`'s CPU per connection-hour as a multiple of lull-ebpf's in the same pass.
fn vs_lull_ebpf(pass: &Pass, m: &Measured) -> String {
    match pass
        .measured(Strategy::LullEbpf)
        .map(Measured::per_conn_hour)
    {
        Some(b) if b > 0.0 => format!("{:.2}x", m.per_conn_hour() / b),
        _ => "—".into(),
    }
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
    // The detailed tables are for the largest connection count: one pass per mix.
    let detailed: Vec<&Pass> = passes.iter().filter(|p| p.conns == plan.conns).collect();
    report.tables.extend([
        main_table(plan, &detailed),
        detection_table(&detailed),
        probe_cycle_table(&detailed),
        cpu_table(&detailed),
        work_table(&detailed),
        memory_table(&detailed),
    ]);
    scaling(&mut report, passes);
    for pass in &detailed {
        latency_distribution(&mut report, pass);
    }
    crate::figures::figures(&mut report, &detailed);
    crate::figures::goals(&mut report, &detailed);
    crate::notes::notes(
        &mut report,
        plan,
        env,
        &detailed,
        (backgrounds, backlog),
        elapsed,
    );
    report
}

/// Cost, detection and kernel memory: the table the others explain.
fn main_table(plan: &Plan, passes: &[&Pass]) -> Table {
    let t = plan.timing;
    let title = format!(
        "keepalive over real loopback sockets: idle {} s, interval {} s, count {} (dead bound {} \
         s; lull-tiered's hung_after {} s)",
        t.idle().as_secs_f64(),
        t.interval().as_secs_f64(),
        t.count,
        t.bound().as_secs_f64(),
        t.hung_after().as_secs_f64(),
    );
    let columns = [
        "connections",
        "window s",
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
    per_strategy(title, &columns, passes, |pass, _, m| {
        Some(vec![
            thousands(m.conns),
            format!("{:.0}", m.window.as_secs_f64()),
            thousands(m.probes),
            format!("{:.0}", m.cpu.ours()),
            m.per_probe_us().map_or("—".into(), |us| format!("{us:.1}")),
            format!("{:.1}", m.per_conn_hour()),
            vs_lull_ebpf(pass, m),
            caught(m.hung_ms.len(), m.of(Role::Hung)),
            latencies(&m.hung_ms),
            caught(m.vanished_ms.len(), m.of(Role::Vanishing)),
            latencies(&m.vanished_ms),
            format!("{:.0}", m.slab_per_conn()),
        ])
    })
}

/// Each strategy's detection against its own bound, and which of lull's tiers caught what.
fn detection_table(passes: &[&Pass]) -> Table {
    let title = format!(
        "detection against each strategy's bound (ms from the instant the peer hung or \
         vanished; lull-ebpf and lull-tcpinfo: idle x (1 + jitter/2) + count x interval; \
         lull-tiered: hung_after + interval for hung peers, idle + count x interval for vanished \
         ones; kernel and tokio: idle + count x interval; within bound allows {} ms for timers; \
         a connection's first verdict counts, T / A its tier, transport or application)",
        VERDICT_SLACK.as_millis()
    );
    let columns = [
        "hung bound ms",
        "hung within bound",
        "hung max ms",
        "hung by tier T / A",
        "vanished bound ms",
        "vanished within bound",
        "vanished max ms",
        "vanished by tier T / A",
        "reported again",
        "others reported dead",
    ];
    let max = |ms: &[f64]| quantile(ms, 1.0).map_or("—".into(), |x| format!("{x:.0}"));
    let tiers = |s: Strategy, t: [u64; 2]| {
        if s.is_lull() {
            format!(
                "{} / {}",
                t[Tier::Transport.index()],
                t[Tier::Application.index()]
            )
        } else {
            "—".into()
        }
    };
    per_strategy(title, &columns, passes, |_, s, m| {
        let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e3);
        Some(vec![
            m.bounds.hung.map_or("cannot see".into(), ms),
            match m.hung_within() {
                Some(within) => caught(within, m.of(Role::Hung)),
                None => format!("{} caught", m.hung_ms.len()),
            },
            max(&m.hung_ms),
            tiers(s, m.hung_tiers),
            ms(m.bounds.vanished),
            caught(m.vanished_within(), m.of(Role::Vanishing)),
            max(&m.vanished_ms),
            tiers(s, m.vanished_tiers),
            thousands(m.repeated.iter().sum()),
            thousands(m.wrongly_dead),
        ])
    })
}

/// lull's probe cycle: its probes to answering connections against the policy's nominal rate,
/// and its drains.
fn probe_cycle_table(passes: &[&Pass]) -> Table {
    let title = "lull's probe cycle over each window: probes to answering connections against \
                 the policy's nominal rate (one per Policy::nominal_probe_period: idle, or for \
                 lull-tiered its application tier's period), and its drains";
    let columns = [
        "answering conns",
        "nominal period s",
        "probes to them",
        "per conn-hour",
        "nominal per conn-hour",
        "vs nominal",
        "probes answered",
        "timer firings",
        "re-armed only",
        "drains",
        "drains skipped",
        "kernel keepalives",
    ];
    per_strategy(title, &columns, passes, |_, s, m| {
        let (lull, period) = (m.lull?, m.nominal_period?);
        let (rate, nominal) = m.probe_rate().unwrap_or((0.0, 0.0));
        Some(vec![
            thousands(m.of(Role::Answering)),
            format!("{:.2}", period.as_secs_f64()),
            thousands(lull.probes_answering),
            format!("{rate:.0}"),
            format!("{nominal:.0}"),
            if nominal > 0.0 {
                format!("{:.3}x", rate / nominal)
            } else {
                "—".into()
            },
            thousands(lull.probes_answered),
            thousands(lull.wakeups),
            thousands(lull.wakeups_rearmed),
            thousands(lull.drains),
            thousands(lull.drains_skipped),
            if s.kernel_probes() {
                thousands(m.keepalives)
            } else {
                "—".into()
            },
        ])
    })
}

/// Where each strategy's CPU figure comes from.
fn cpu_table(passes: &[&Pass]) -> Table {
    let title = "where the CPU went over each window (CPU = the run's processes + softirq charged \
                 to anything else - that softirq's background; softirq in them is already in \
                 their times)";
    let columns = [
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
    per_strategy(title, &columns, passes, |_, _, m| {
        let c = &m.cpu;
        let ms = |x: Option<f64>| x.map_or("—".into(), |x| format!("{x:.0}"));
        let background = match c.softirq_elsewhere() {
            Some((_, background)) => background,
            None => c.background.whole_less_others * c.window_s,
        };
        Some(vec![
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
        ])
    })
}

/// Probes, wakeups and packets: the work behind the CPU figures.
fn work_table(passes: &[&Pass]) -> Table {
    let title = "the work over each window (workers are the client side, the part that stays on \
                 this host on a real network; a probe is one of the strategy's own or a kernel \
                 keepalive)";
    let columns = [
        "own probes",
        "kernel keepalives",
        "probes/conn-hour",
        "workers CPU µs/probe",
        "worker wakeups/s",
        "peer wakeups/s",
        "TCP segments",
        "segments/probe",
        "backlog drops",
    ];
    per_strategy(title, &columns, passes, |_, _, m| {
        let per_probe = |x: f64| {
            if m.probes > 0 {
                format!("{:.1}", x / m.probes as f64)
            } else {
                "—".into()
            }
        };
        let secs = m.window.as_secs_f64();
        Some(vec![
            m.own_probes.map_or("—".into(), thousands),
            thousands(m.keepalives),
            format!("{:.0}", m.probes as f64 / m.hours()),
            m.worker_us_per_probe()
                .map_or("—".into(), |us| format!("{us:.1}")),
            format!("{:.0}", m.wakeups.0 as f64 / secs),
            format!("{:.0}", m.wakeups.1 as f64 / secs),
            thousands(m.segments),
            per_probe(m.segments as f64),
            thousands(m.drops),
        ])
    })
}

/// Kernel and worker memory per connection, by every reading taken.
fn memory_table(passes: &[&Pass]) -> Table {
    let title = "memory per connection (growth from before the workers started to every \
                 connection up; a connection is both ends' sockets)";
    let columns = [
        "Slab B/conn",
        "SUnreclaim B/conn",
        "slab objects B/conn",
        "caches that grew with them",
        "worker RSS B/conn",
        "worker start RSS MB (shared)",
        "largest slab growth, B/conn",
    ];
    per_strategy(title, &columns, passes, |_, _, m| {
        let per = |b: i64| format!("{:.0}", b as f64 / m.conns as f64);
        let top: Vec<String> = m
            .memory
            .top
            .iter()
            .filter(|(_, b)| *b > 0)
            .map(|(name, b)| format!("{name} {}", per(*b)))
            .collect();
        Some(vec![
            per(m.memory.slab),
            per(m.memory.unreclaimable),
            m.memory.objects.map_or("—".into(), |(all, _)| per(all)),
            m.memory
                .objects
                .map_or("—".into(), |(_, sockets)| per(sockets)),
            per(m.memory.rss),
            format!(
                "{:.1} ({:.1})",
                m.memory.start_rss.0 / 1e6,
                m.memory.start_rss.1 / 1e6
            ),
            top.join(", "),
        ])
    })
}

/// A chart's file stem for `mix`: the standard mix keeps the name BENCHMARKS.md links to.
fn chart(stem: &str, mix: Mix) -> String {
    match mix {
        Mix::Standard => stem.to_string(),
        Mix::BusyHeavy => format!("{stem}-busy-heavy"),
    }
}

/// A chart line's (x, y) points.
type Points = Vec<(f64, f64)>;

/// CPU against connection count: a table, and a chart per mix with one line per strategy.
fn scaling(report: &mut BenchReport, passes: &[Pass]) {
    let columns = [
        "connections",
        "CPU ms",
        "CPU, % of one core",
        "CPU ms/conn-hour",
        "vs lull-ebpf",
    ];
    let refs: Vec<&Pass> = passes.iter().collect();
    let table = per_strategy(
        "CPU against connection count (same timing and mix at every count, each strategy over \
         its window as in the first table)",
        &columns,
        &refs,
        |pass, _, m| {
            Some(vec![
                thousands(m.conns),
                format!("{:.0}", m.cpu.ours()),
                format!("{:.1}", m.core_pct()),
                format!("{:.1}", m.per_conn_hour()),
                vs_lull_ebpf(pass, m),
            ])
        },
    );
    report.tables.push(table);
    let mut lines: Vec<(Mix, Strategy, Points)> = Vec::new();
    for pass in passes {
        for outcome in &pass.outcomes {
            let Some(m) = outcome.measured() else {
                continue;
            };
            let point = (m.conns as f64, m.core_pct());
            match lines
                .iter_mut()
                .find(|(mix, s, _)| *mix == pass.mix && *s == outcome.strategy)
            {
                Some((_, _, points)) => points.push(point),
                None => lines.push((pass.mix, outcome.strategy, vec![point])),
            }
        }
    }
    for (mix, strategy, points) in lines {
        report.series.push(Series {
            chart: chart("real-cpu-vs-connections", mix),
            title: format!(
                "Whole-system CPU against connection count, real loopback sockets, {} mix",
                mix.label()
            ),
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

/// The detection-latency distribution of one mix: for each strategy, the fraction of all dead
/// peers (hung and vanished together) reported by each time after they died. A strategy that
/// cannot see hung peers levels off at their share.
fn latency_distribution(report: &mut BenchReport, pass: &Pass) {
    for outcome in &pass.outcomes {
        let Some(m) = outcome.measured() else {
            continue;
        };
        let dead = m.of(Role::Hung) + m.of(Role::Vanishing);
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
            chart: chart("real-detection-latency", pass.mix),
            title: format!(
                "Dead peers reported, by time since they died (hung + vanished), {} mix",
                pass.mix.label()
            ),
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
