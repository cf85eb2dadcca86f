//! The report's notes: what the figures include, what they leave out, what surprised, and
//! the extrapolation, each worded from the run's own figures.

use std::time::Duration;

use lull_benches::{BenchReport, thousands};

use crate::{
    env::{Background, Environment},
    measured::{Measured, Pass, Status},
    plan::Plan,
    proto::{Mix, Strategy},
};

pub fn notes(
    report: &mut BenchReport,
    plan: &Plan,
    env: &Environment,
    passes: &[&Pass],
    (backgrounds, backlog): (&[Background], Option<(u64, u64)>),
    elapsed: Duration,
) {
    let ran: Vec<(Mix, Strategy, &Measured)> = passes
        .iter()
        .flat_map(|p| {
            p.outcomes
                .iter()
                .filter_map(|o| o.measured().map(|m| (p.mix, o.strategy, m)))
        })
        .collect();
    let notes = &mut report.notes;

    for pass in passes {
        for outcome in &pass.outcomes {
            let what = format!(
                "{} in the {} mix",
                outcome.strategy.label(),
                pass.mix.label()
            );
            match &outcome.status {
                Status::Unavailable(why) => notes.push(format!(
                    "{what} was not measured: unavailable here ({why})."
                )),
                Status::Failed(why) => {
                    notes.push(format!("{what} was not measured: it failed ({why})."));
                }
                Status::Ran(_) => {}
            }
        }
    }
    notes.push(
        "real.json's \"figures\" holds the detailed pass's headline figures as plain numbers, \
         laid out both ways the issues name them: by figure, then mix, then strategy \
         (figures.ms_per_conn_hour.standard[\"lull-ebpf\"]) and by mix, then strategy, then \
         figure (figures.standard[\"lull-ebpf\"].ms_per_conn_hour). The figures: \
         ms_per_conn_hour, hung_caught and vanished_caught as [caught, total] (caught in the \
         window, whatever the latency), hung_p99_ms and vanished_p99_ms (null when none was \
         caught), worker_us_per_probe (the workers' own CPU per probe sent), and for lull \
         hung_by_tier and vanished_by_tier ({transport, application}). A strategy that did not \
         run has null figures."
            .into(),
    );
    let setups: Vec<String> = ran
        .iter()
        .filter(|(mix, _, _)| Some(*mix) == passes.first().map(|p| p.mix))
        .map(|(_, s, m)| {
            format!(
                "{} {} connections in {} worker + {} peer processes, up in {:.1} s{}{}",
                s.label(),
                thousands(m.conns),
                m.processes,
                m.processes,
                m.setup.as_secs_f64(),
                if m.failed > 0 {
                    format!(" ({} connects failed)", m.failed)
                } else {
                    String::new()
                },
                if m.detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", m.detail)
                },
            )
        })
        .collect();
    let mixes: Vec<String> = passes
        .iter()
        .map(|p| format!("{} ({})", p.mix.label(), p.mix.describe()))
        .collect();
    notes.push(format!(
        "Connections reached{}: {}. Asked for {} per strategy, at most {} per process (the fd \
         limit is 20,000 per process), one strategy at a time, each over a fresh population \
         with the same roles: in every mix 1% hung, {} the rest answering every read with \
         +PONG, and busy connections as the mix says: {}. Each worker opens its connections at \
         an even pace over one nominal probe period of its strategy (idle; for lull-tiered its \
         application tier's period, {:.1} s) and puts each under its strategy at once, so \
         timers are spread as after a long run rather than firing in step; the window opens \
         once all are up, and is a whole number of idle periods, {:.0} s, or longer where a \
         strategy's bound needs it to hold the hang and the verdict (lull-tiered: {:.0} s). \
         lull's tick: {}. Whole run: {:.0} s; {}.",
        passes
            .first()
            .map_or(String::new(), |p| format!(" ({} mix)", p.mix.label())),
        setups.join("; "),
        thousands(plan.conns),
        thousands(plan.per_process),
        if env.vanishing() {
            "1% vanishing,"
        } else {
            "no vanishing peers,"
        },
        mixes.join("; "),
        plan.spread(Strategy::LullTiered).as_secs_f64(),
        plan.base_window.as_secs_f64(),
        plan.window(Strategy::LullTiered).as_secs_f64(),
        plan.lull_tick
            .map_or("1 ms (its default)".into(), |t| format!("{t:?}")),
        elapsed.as_secs_f64(),
        env.describe(),
    ));
    let rates = |f: fn(&Background) -> Option<f64>| {
        backgrounds
            .iter()
            .map(|b| f(b).map_or("—".into(), |r| format!("{r:.0}")))
            .collect::<Vec<String>>()
            .join(", ")
    };
    let irq_note = match &env.softirq {
        Ok(_) => format!(
            "CPU ms is the CPU time of every process of the run over its strategy's window \
             (workers, peers answering the probes, this orchestrator; /proc/<pid>/stat, all \
             threads, user + system, which on loopback includes delivering each packet to the \
             other end and any softirq that interrupted them), plus the softirq time charged to \
             anything else, measured exactly by two BPF programs on the \
             softirq_entry/softirq_exit tracepoints, less its background. This kernel has no \
             IRQ time accounting: softirq is charged to whatever it interrupts. Kernel \
             keepalive does all its work in timer softirq (timer, probe, the peer's ACK), and so \
             do delayed ACKs and retransmissions for every strategy: on an idle CPU that is \
             charged to no process, on a busy one to whatever runs there (a kernel thread, \
             someone else's job), where it mixes with other people's traffic. So softirq outside \
             the run's processes was also read with nothing of the run's going, before the \
             first strategy and after each one (on idle CPUs {} ms/s, in other tasks {} ms/s, in \
             turn), and the mean of the two readings around a window is taken off: where that \
             background is large, the softirq part of CPU ms is as noisy as the background. \
             Kernel threads' own work (RCU, kworkers) is left out. For comparison, \"whole \
             less others\" is every CPU's time less idle (/proc/stat, exact with a tickless \
             idle) less the CPU of every user-space process outside the run (reaped children \
             included): it carries kernel threads and other people's kernel work ({} ms/s in \
             the same readings) and misses softirq charged to other jobs too.",
            rates(|b| b.softirq.map(|s| s[0])),
            rates(|b| b.softirq.map(|s| s[2])),
            rates(|b| Some(b.whole_less_others)),
        ),
        Err(why) => format!(
            "CPU ms is whole-system CPU over its strategy's window (every CPU's time less \
             idle, from /proc/stat, exact with a tickless idle) less the CPU of every \
             user-space process outside the run (from /proc/<pid>/stat at both ends of the \
             window, reaped children included), less the same measured with nothing of the \
             run's going before the first strategy and after each one ({} ms/s in turn; the \
             mean on either side of a window is taken off), because softirq time could not be \
             measured ({why}). It includes the workers, the peers, loopback delivery and kernel \
             threads; softirq charged to other people's jobs (kernel keepalive's timers, on a \
             busy machine) is missing from it.",
            rates(|b| Some(b.whole_less_others)),
        ),
    };
    notes.push(format!(
        "{irq_note} µs/probe divides CPU ms by the probes sent in the window, so it also carries \
         the busy connections' traffic, drains and timer wakeups; ms/conn-hour divides it by \
         connections x window. \"vs lull-ebpf\" is the ratio of ms/conn-hour. Other people's \
         jobs share this machine (\"other processes\"); they also compete for the CPUs, which \
         makes every figure here larger than on a quiet machine (cache and scheduling \
         effects), more so for strategies with more wakeups."
    ));
    notes.push(
        "What does not carry over to a real network: here both ends run on this machine, so \
         every row also pays for the peers' side (their application answering lull's and \
         tokio's probes, their kernels ACKing the kernel's keepalives) and for delivering each \
         packet, which on a real network happens on the other host and on a NIC (interrupts, \
         driver, GRO) that loopback does not have. Loopback never drops a packet and its round \
         trip is microseconds. Application-level probes (lull, tokio) cost the peer an \
         application wakeup that kernel keepalive does not; that is the price of seeing a hung \
         application."
            .into(),
    );
    crate::findings::attachment(notes, env, &ran);
    let stray: Vec<String> = ran
        .iter()
        .filter(|(_, s, _)| !s.kernel_probes())
        .map(|(mix, s, m)| format!("{} {} {}", mix.label(), s.label(), m.keepalives))
        .collect();
    notes.push(format!(
        "Probes sent: lull's and tokio's own counts between the window's start and end; the \
         kernel's are TcpExt TCPKeepAlive from /proc/net/netstat over the window, which counts \
         the whole network namespace ({}); lull-tiered's are both, its own probes (application \
         tier) and the kernel keepalives of its transport tier, and its CPU per probe divides \
         by both. lull's jitter spreads each idle timer over a window centred on idle, so its \
         probe rate is the policy's nominal rate (the probe-cycle table compares them).{}",
        if env.shared_netns.is_none() {
            "the run's own, holding nothing but its connections"
        } else {
            "the host's: other traffic may count too"
        },
        if stray.is_empty() {
            String::new()
        } else {
            format!(
                " TCPKeepAlive during the other strategies' windows, as a check: {}.",
                stray.join(", ")
            )
        },
    ));
    crate::findings::detection(notes, plan, &ran);
    crate::findings::repeats(notes, &ran);
    crate::findings::where_time_goes(notes, plan, &ran);
    let drops: u64 = ran.iter().map(|(_, _, m)| m.drops).sum();
    notes.push(match backlog {
        Some((before, now)) if now > before => format!(
            "net.core.netdev_max_backlog was raised from {before} to {now} for the run and put \
             back after (--keep-backlog leaves it). Loopback passes every packet through the \
             sending CPU's input backlog, and kernel keepalive sends its probes from timer \
             softirq, where the timer wheel (which at 250 Hz rounds a timer seconds away to \
             256 ms) fires thousands at once with none delivered until the batch is done: at \
             the default of 1,000 the backlog overflows, probes and ACKs are dropped, and kernel \
             keepalive kills healthy connections. A NIC does not pass outgoing packets through \
             that queue, so that is loopback's artefact, not keepalive's. Drops during the \
             windows: {drops}."
        ),
        Some((before, _)) => format!(
            "net.core.netdev_max_backlog was already {before}. Drops at the loopback backlog \
             during the windows: {drops}."
        ),
        None => format!(
            "net.core.netdev_max_backlog was left as it was; at the default of 1,000, kernel \
             keepalive's probe bursts (thousands from one timer-softirq batch) overflow \
             loopback's input backlog, so its verdicts on answering peers are loopback's \
             artefact. Drops at the loopback backlog during the windows: {drops}."
        ),
    });
    let wrong: Vec<String> = ran
        .iter()
        .filter(|(_, _, m)| m.wrongly_dead > 0 || m.closed > 0 || m.revived > 0)
        .map(|(mix, s, m)| {
            format!(
                "{} {}: {} answering or busy connections reported dead, {} ended otherwise, {} \
                 revived",
                mix.label(),
                s.label(),
                m.wrongly_dead,
                m.closed,
                m.revived
            )
        })
        .collect();
    notes.push(if wrong.is_empty() {
        "No strategy reported an answering or busy connection dead, and none saw a connection \
         end otherwise."
            .into()
    } else {
        format!("Unexpected verdicts: {}.", wrong.join("; "))
    });
    notes.push(
        "Kernel memory: /proc/meminfo Slab (and SUnreclaim) and /proc/slabinfo (active objects x \
         object size) read before the workers start and again once every connection is up and \
         accepted, divided by the connections. The main table's figure counts only the caches \
         that grew by at least one object per four connections (the readings also catch the \
         churn of other people's jobs, which this leaves out), less one proc_inode_cache \
         object and one dentry per /proc/<pid>/fd entry that appeared meanwhile (something on \
         this machine lists processes' fds now and then, leaving an inode and a dentry per fd \
         that have nothing to do with the connections; Slab and the all-caches column still \
         have them and the churn). Each connection is two sockets (the worker's and \
         the peer's) with their files, inodes and dentries, plus the peer's pending io_uring \
         read (the same for every strategy); epoll items for kernel and tokio; for lull-ebpf \
         and lull-tiered a socket-storage element per registered socket. Their table (24 B a \
         row, shared by every lull process on the host) is a vmalloc'd BPF array, outside \
         slab. Other processes' activity during setup moves these \
         a little. Worker RSS is the workers' own growth while they opened their connections; \
         what a worker took to start its strategy before the first one is a cost per process, \
         shown apart (\"start RSS\", in MB, with its shared part, RssFile + RssShmem, in \
         brackets: for lull-ebpf and lull-tiered mostly the mapping of lull's host-wide \
         activity table, which every lull process maps whole, one set of pages on the host)."
            .into(),
    );
    // The first mix's, the standard one in a default run.
    let first = passes.first().map(|p| p.mix);
    let extrapolated: Vec<String> = ran
        .iter()
        .filter(|(mix, _, _)| Some(*mix) == first)
        .map(|(_, s, m)| {
            let cores = m.per_conn_hour() * 1e6 / 3.6e6;
            format!(
                "{} {:.2} cores, {:.1} GiB slab, {:.2} GiB worker RSS",
                s.label(),
                cores,
                m.slab_per_conn() * 1e6 / f64::from(1u32 << 30),
                m.memory.rss as f64 / m.conns as f64 * 1e6 / f64::from(1u32 << 30),
            )
        })
        .collect();
    notes.push(format!(
        "Extrapolation to 1M real sockets (not measured: the per-connection figures above times \
         one million, at this policy and the {} mix, both ends on one host as here): {}. At \
         this fd limit 1M client sockets take about {} worker processes, each with its start \
         RSS on top; on a real network the peers' share of the CPU and half of the slab would \
         be on other hosts.",
        first.map_or("", Mix::label),
        extrapolated.join("; "),
        1_000_000u64.div_ceil(plan.per_process),
    ));
}
