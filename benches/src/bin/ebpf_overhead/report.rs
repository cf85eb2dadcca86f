//! The ebpf-overhead benchmark's report: ratios, per-packet costs, goals and notes.

use super::*;

/// Per-round figures for `config` against the detached run of the same round.
pub(super) fn paired(
    runs: &[Vec<Sample>; 3],
    config: Config,
    f: impl Fn(&Sample, &Sample) -> f64,
) -> Vec<f64> {
    let detached = &runs[Config::Detached.index()];
    runs[config.index()]
        .iter()
        .zip(detached)
        .map(|(c, d)| f(c, d))
        .collect()
}

/// Median over rounds of rate / detached rate, and its min–max across rounds.
pub(super) fn ratio(
    runs: &[Vec<Sample>; 3],
    config: Config,
    rate: fn(&Sample) -> f64,
) -> (f64, String) {
    let ratios = paired(runs, config, |c, d| rate(c) / rate(d));
    (median(&ratios), spread(&ratios, 3))
}

/// Median over rounds of the time added per round trip, spread over its packets, in ns.
pub(super) fn ns_per_packet(
    runs: &[Vec<Sample>; 3],
    config: Config,
    rate: fn(&Sample) -> f64,
) -> f64 {
    median(&paired(runs, config, |c, d| {
        (1.0 / rate(c) - 1.0 / rate(d)) * 1e9 / c.packets_per_op()
    }))
}

pub(super) fn build_report(
    mut report: BenchReport,
    samples: &[[Vec<Sample>; 3]; 2],
    bench: &Bench,
    (rounds, seconds, cpu): (usize, f64, usize),
) -> BenchReport {
    let [pp, bulk] = samples;
    let med =
        |runs: &[Sample], f: fn(&Sample) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());

    let mut table = Table::new(
        "ping-pong (1-byte round trips)",
        &[
            "configuration",
            "median rt/s",
            "ratio to detached",
            "packets per rt",
            "ns per packet vs detached",
            "CPU µs per rt",
            "CPU ns per packet vs detached",
        ],
    );
    for config in CONFIGS {
        let runs = &pp[config.index()];
        let added = |rate| match config {
            Config::Detached => "—".to_string(),
            _ => format!("{:+.1}", ns_per_packet(pp, config, rate)),
        };
        table.row(vec![
            config.label().into(),
            format!("{:.0}", med(runs, Sample::rate)),
            format!("{:.3}", ratio(pp, config, Sample::rate).0),
            format!("{:.3}", med(runs, Sample::packets_per_op)),
            added(Sample::rate),
            format!("{:.2}", 1e6 / med(runs, Sample::cpu_rate)),
            added(Sample::cpu_rate),
        ]);
    }
    report.tables.push(table);

    let mut table = Table::new(
        "bulk loopback throughput",
        &[
            "configuration",
            "median MB/s",
            "ratio to detached",
            "MB per CPU second",
            "ratio (CPU)",
        ],
    );
    for config in CONFIGS {
        let runs = &bulk[config.index()];
        table.row(vec![
            config.label().into(),
            format!("{:.0}", med(runs, Sample::rate) / 1e6),
            format!("{:.3}", ratio(bulk, config, Sample::rate).0),
            format!("{:.0}", med(runs, Sample::cpu_rate) / 1e6),
            format!("{:.3}", ratio(bulk, config, Sample::cpu_rate).0),
        ]);
    }
    report.tables.push(table);

    for config in [Config::Registered, Config::Unregistered] {
        let which = match config {
            Config::Registered => "registered sockets",
            _ => "unregistered sockets",
        };
        let lost = (1.0 - ratio(pp, config, Sample::rate).0) * 100.0;
        report.goal(
            &format!("round trips lost with the program attached ({which})"),
            "<= 3%",
            format!("{lost:.2}%"),
            lost <= 3.0,
        );
        for (rate, how) in [
            (Sample::rate as fn(&Sample) -> f64, ""),
            (Sample::cpu_rate, ", CPU time"),
        ] {
            let ns = ns_per_packet(pp, config, rate);
            report.goal(
                &format!("added cost per packet ({which}{how})"),
                "<= 50 ns",
                format!("{ns:.1} ns"),
                ns <= 50.0,
            );
        }
    }

    let all_pp: Vec<Sample> = pp.iter().flatten().copied().collect();
    let all_bulk: Vec<Sample> = bulk.iter().flatten().copied().collect();
    let notes = &mut report.notes;
    notes.push(format!(
        "Packets are `Tcp OutSegs` deltas from /proc/net/snmp over each window. On loopback the \
         sender and receiver share one network namespace, so each segment is counted once in \
         OutSegs when sent and again in InSegs when received: OutSegs alone counts each packet \
         once (OutSegs + InSegs would halve the per-packet cost). Each loopback packet runs \
         lull's egress program on the sending socket and its ingress program on the receiving \
         one, so \"per packet\" is one egress plus one ingress run. OutSegs is namespace-wide; \
         the two sockets' own tcpi_segs_out give {:.3} packets per round trip (median) against \
         {:.3} from OutSegs, the difference being other traffic on the host.",
        med(&all_pp, |s| s.socket_packets / s.ops),
        med(&all_pp, Sample::packets_per_op),
    ));
    notes.push(format!(
        "Each round runs the three configurations alternately in one process, in rotated order \
         (ABC, BCA, CAB, ...), {seconds} s each, each run on a fresh loopback connection pair \
         (TCP_NODELAY); an attached run loads a fresh table before connecting and drops it \
         (detaching the programs) after. Ratios are medians over {rounds} rounds of \
         rate / detached rate within a round, so they can differ a little from the ratio of the \
         median rates; ns per packet = (1/rate - 1/detached rate) / packets per round trip, \
         per round, median."
    ));
    let mut spread = Vec::new();
    for (runs, name) in [(pp, "ping-pong"), (bulk, "bulk")] {
        for (rate, how) in [
            (Sample::rate as fn(&Sample) -> f64, ""),
            (Sample::cpu_rate, " (CPU)"),
        ] {
            for config in [Config::Unregistered, Config::Registered] {
                let range = ratio(runs, config, rate).1;
                spread.push(format!("{name}{how} {} {range}", config.label()));
            }
        }
    }
    notes.push(format!(
        "Min–max of the ratio across rounds, to judge the noise: {}.",
        spread.join("; ")
    ));
    notes.push(format!(
        "Every thread is pinned to CPU {cpu}: on this 2-vCPU VM cross-CPU wakeups make unpinned \
         round trips bimodal (about 10k or 55k rt/s by thread placement), swamping the effect. \
         The CPU columns divide by this process's CPU time rather than wall time (loopback \
         delivery runs in the sender's context, so both programs' work is in it), leaving out \
         time lost to other processes on that CPU. This process had {:.0}% of it during \
         ping-pong windows (median): competition scales wall-clock ns per packet up by the \
         inverse of that share, but leaves ratios alone.",
        med(&all_pp, |s| s.cpu_ns / 1e7 / s.secs)
    ));
    notes.push(format!(
        "Bulk moves {:.0} KiB per packet, the receiver's ACKs included (loopback MTU is \
         64 KiB and the programs run once per GSO packet), so there the per-packet cost is \
         spread over many bytes.",
        med(&all_bulk, |s| s.ops / s.packets) / 1024.0
    ));
    notes.push(match bench.baseline {
        Some(base) => format!(
            "{base} cgroup_skb program attachment(s) not belonging to this benchmark ran for its \
             sockets in every configuration; {} run(s) saw others come or go (another process \
             loading a table) and were kept.",
            bench.disturbed
        ),
        None => "This process's cgroup could not be queried (BPF_PROG_QUERY), so runs were not \
                 checked for other processes' cgroup programs coming or going."
            .into(),
    });
    report
}
