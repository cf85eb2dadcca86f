//! The probe-path benchmark's report: tables, ratios, goals and notes.

use std::{collections::HashMap, time::Instant};

use lull_benches::{BenchReport, Table, median, spread};

use crate::{
    batch::{PAIRS, STRATEGIES, Sample, Strategy},
    callgrind::{CALLGRIND_PROBES, Callgrind},
    ring::nanos,
    run::{CYCLE_PROBES, Run},
};

/// CONFIG_HZ=250 on these VMs: getrusage's user/system split rests on one sample per tick.
const TICK_NS: f64 = 4e6;

pub fn build_report(mut report: BenchReport, run: &Run, cg: &Callgrind) -> BenchReport {
    type Field = fn(&Sample) -> u64;
    let none = HashMap::new();
    let ir = cg.as_ref().map_or(&none, |c| &c.0);
    let per = |runs: &[Sample], f: Field| -> Vec<f64> {
        runs.iter().map(|s| s.per_probe(f(s))).collect()
    };
    let med = |runs: &[Sample], f: Field| median(&per(runs, f));
    let sum = |runs: &[Sample], f: Field| runs.iter().map(f).sum::<u64>() as f64;
    // getrusage's user ns per probe, pooled over repetitions, and the ticks it rests on.
    let user = |r: &[Sample]| {
        let ns = sum(r, |s| s.user_ns);
        (ns / sum(r, |s| s.probes), ns / TICK_NS)
    };
    let error = |ticks: f64| format!("±{:.0}%", 100.0 / ticks.max(1.0).sqrt());
    // The clock overhead that each of a batch's two user-mode stretches holds.
    let clock: Vec<f64> = (0..10_000).map(|_| nanos(Instant::now()) as f64).collect();
    let clock_ns = median(&clock);
    let phase = |s: &Sample| (s.batch_user_ns - 2.0 * clock_ns) / s.b as f64;
    let ir_of = |st, b| ir.get(&(st, b)).copied();
    let fmt_ir = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.0}"));

    let columns = concat!(
        "B|strategy|CPU ns|CPU min–max|system ns|",
        "user ns (getrusage)|user ticks|user ns (clock)|instructions"
    );
    let title =
        "per probe: CPU (exact; median and min–max over repetitions), system, and user three ways";
    let mut table = Table::new(title, &columns.split('|').collect::<Vec<_>>());
    let columns = "B|CPU|CPU min–max|system|instructions|sendmmsg / send(2) CPU";
    let title =
        "send(2) loop / io_uring, per probe (> 1: io_uring cheaper; CPU paired by repetition)";
    let mut ratios = Table::new(title, &columns.split('|').collect::<Vec<_>>());
    let (mut user_goal, mut ratio_goal) = (None::<(f64, usize)>, None::<(f64, usize)>);
    for (i, &b) in run.sizes.iter().enumerate() {
        let clock = median(&run.timed[i].iter().map(phase).collect::<Vec<_>>());
        for st in STRATEGIES {
            let runs = &run.samples[i][st as usize];
            let (cpu, (user_ns, ticks)) = (per(runs, |s| s.cpu_ns), user(runs));
            let clock = (st == Strategy::Uring).then(|| format!("{clock:.1}"));
            table.row(vec![
                b.to_string(),
                st.label().into(),
                format!("{:.0}", median(&cpu)),
                spread(&cpu, 0),
                format!("{:.0}", med(runs, |s| s.sys_ns)),
                format!("{user_ns:.0} {}", error(ticks)),
                format!("{ticks:.0}"),
                clock.unwrap_or("—".into()),
                fmt_ir(ir_of(st, b)),
            ]);
        }
        let [u, s, m] = &run.samples[i];
        let paired = |a: &[Sample], z: &[Sample]| -> Vec<f64> {
            let ratio = |(a, z): (&Sample, &Sample)| a.per_probe(a.cpu_ns) / z.per_probe(z.cpu_ns);
            a.iter().zip(z).map(ratio).collect()
        };
        let cpu_r = paired(s, u);
        let ir_r = ir_of(Strategy::Send, b).zip(ir_of(Strategy::Uring, b));
        ratios.row(vec![
            b.to_string(),
            format!("{:.2}x", median(&cpu_r)),
            spread(&cpu_r, 2),
            format!("{:.2}x", med(s, |x| x.sys_ns) / med(u, |x| x.sys_ns)),
            ir_r.map_or("—".into(), |(s, u)| format!("{:.2}x", s / u)),
            format!("{:.2}x", median(&paired(m, s))),
        ]);
        if b >= 64 {
            let r = median(&cpu_r);
            user_goal = user_goal.filter(|g| g.0 >= clock).or(Some((clock, b)));
            ratio_goal = ratio_goal.filter(|g| g.0 <= r).or(Some((r, b)));
        }
    }
    report.tables.push(table);
    report.tables.push(ratios);

    let at = |b| &run.samples[run.sizes.iter().position(|&x| x == b).unwrap_or(0)];
    if let Some((ns, b)) = user_goal {
        let ((user_ns, ticks), instructions) = (user(&at(b)[0]), fmt_ir(ir_of(Strategy::Uring, b)));
        let error = error(ticks);
        report.goal(
            "userspace ns per probe, io_uring, batch >= 64 (worst B)",
            "<= 150 ns",
            format!(
                "{ns:.1} ns at B={b} (clock around the user-mode phases); there getrusage says \
                 {user_ns:.0} ns {error} ({ticks:.0} ticks) and callgrind {instructions} \
                 instructions"
            ),
            ns <= 150.0,
        );
    }
    if let Some((r, b)) = ratio_goal {
        let what = "io_uring vs send(2) loop, per probe (user+system CPU), batch >= 64 (worst B)";
        let measured = format!("{r:.2}x at B={b} (exact thread CPU)");
        report.goal(what, ">= 1.5x cheaper", measured, r >= 1.5);
        let [u, s, _] = at(b);
        let (uring, send) = (med(u, |x| x.cpu_ns), med(s, |x| x.cpu_ns));
        let sys = |r: &[Sample]| 100.0 * sum(r, |x| x.sys_ns) / sum(r, |x| x.user_ns + x.sys_ns);
        let (sys_s, sys_u, ticks) = (sys(s), sys(u), sum(u, |x| x.sys_ns) / TICK_NS);
        let diff = send - uring;
        if r < 1.5 {
            report.notes.push(format!(
                "Where the time goes (B={b}, measured): a probe costs {send:.0} ns of CPU with \
                 send(2) and {uring:.0} ns with io_uring, {sys_s:.1}% and {sys_u:.1}% of it system \
                 time (getrusage, {ticks:.0} ticks). One io_uring_enter per batch instead of one \
                 syscall per probe changes the cost by {diff:.0} ns, a small share of either: the \
                 kernel's per-probe work, which both pay (tcp_sendmsg, and on loopback the peer's \
                 TCP input), is the cost, not userspace. Hypothesis, not measured here: io_uring's \
                 per-request work (SQE decode, fget, request setup, CQE fill) takes back part of \
                 the syscall entries it saves."
            ));
        }
    }

    let all: Vec<&Sample> = run.samples.iter().flatten().flatten().collect();
    let handoff = |s: &&Sample| 100.0 - 100.0 * s.cpu_ns as f64 / (s.user_ns + s.sys_ns) as f64;
    let handoff = median(&all.iter().map(handoff).collect::<Vec<_>>());
    let probes: u64 = all.iter().map(|s| s.probes).sum();
    let eagain: u64 = all.iter().map(|s| s.eagain).sum();
    let max_b = run.sizes[run.sizes.len() - 1];
    let ((send_cpu, drain_cpu), reps) = (run.cpus, run.reps);
    let (secs, timed_secs) = (run.window.as_secs_f64(), run.window.as_secs_f64() / 4.0);
    let wall = run.wall.as_secs_f64();
    let mut notes = vec![
        format!(
            "Setup: {PAIRS} loopback TCP connections (TCP_NODELAY); a probe is `PING\\r\\n` from \
             one static buffer, MSG_NOSIGNAL | MSG_DONTWAIT, batches visiting the connections \
             round robin. The sender is pinned to CPU {send_cpu}; every {CYCLE_PROBES} probes it \
             waits while a drain thread on CPU {drain_cpu} empties the peers with MSG_DONTWAIT \
             reads, so no reader runs during a send and no epoll wakeup rides on delivery. Each \
             cell runs on a fresh thread for {secs} s of its CPU; {reps} repetitions, strategies \
             alternating within each batch size in rotated order; {wall:.0} s of measurement."
        ),
        format!(
            "CPU: CLOCK_THREAD_CPUTIME_ID around the send cycles (exact). System and user: \
             getrusage(RUSAGE_THREAD) over the thread's life, which the kernel splits by the 4 ms \
             ticks (CONFIG_HZ=250) that found it in either mode: user, near 1% of the time, rests \
             on few ticks (pooled over repetitions; ± is 1/sqrt(ticks)) and is a rough figure. \
             Compare the syscall loops' user ns with their instruction counts: it reads high there \
             (hypothesis: ticks that arrive while the kernel has interrupts off are taken on the \
             way back to user mode). Both include the hand-offs to the drain thread, {handoff:.2}% \
             of the thread's CPU (median)."
        ),
        format!(
            "User ns (clock), io_uring only: separate cells ({timed_secs} s of CPU per repetition) \
             read Instant::now around each batch and each io_uring_enter; user = (median over \
             batches of batch - kernel time, less {clock_ns:.0} ns of clock overhead per stretch) \
             / B, so rough at small B. It includes the cache misses that follow the kernel's work \
             and leaves out only the syscall wrapper."
        ),
        "System time includes delivery: on loopback the receiving socket's TCP input (and often an \
         ACK back) runs in softirq on the sender's CPU, charged to the sender. On a real network \
         that runs on the peer's host, so system ns overstates the sender's kernel cost per probe \
         and dilutes the CPU ratio with work both strategies pay."
            .into(),
        "sendmmsg does not apply: it sends a vector of messages on one socket (it batches \
         datagrams), while a tick sends one probe to each of B connections; across sockets it is \
         one call per probe, a send(2) with more argument marshalling, as its rows show."
            .into(),
        match cg {
            Ok((_, (a, b))) => format!(
                "Instructions: callgrind on this binary (`--callgrind-child`), counting only \
                 inside the measured function, {CALLGRIND_PROBES} probes per cell; userspace only. \
                 The io_uring B={max_b} cell, run twice, counted {a} and {b}."
            ),
            Err(e) => format!("No instruction counts: {e:#}."),
        },
        format!(
            "{eagain} of {probes} sends returned EAGAIN (full send buffer); all others wrote 6 \
             bytes, and the peers read every byte sent."
        ),
    ];
    if let Some(ns) = run.softirq_ns {
        let (ms, per) = (ns as f64 / 1e6, ns as f64 / probes as f64);
        notes.push(format!(
            "ksoftirqd/{send_cpu} ran {ms:.1} ms while cells ran ({per:.1} ns per probe): delivery \
             work deferred off the sending thread, so missing from its figures."
        ));
    }
    report.notes.extend(notes);
    report
}
