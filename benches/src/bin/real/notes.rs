//! The report's notes: what the figures include, what they leave out, what surprised, and
//! the extrapolation, each worded from the run's own figures.

use std::time::Duration;

use lull_benches::{BenchReport, thousands};

use crate::{
    env::{Background, Environment},
    measured::{Measured, Outcome, Status},
    plan::Plan,
    proto::{Role, Strategy},
};

pub fn notes(
    report: &mut BenchReport,
    plan: &Plan,
    env: &Environment,
    outcomes: &[Outcome],
    (backgrounds, backlog): (&[Background], Option<(u64, u64)>),
    elapsed: Duration,
) {
    let ran: Vec<(Strategy, &Measured)> = outcomes
        .iter()
        .filter_map(|o| o.measured().map(|m| (o.strategy, m)))
        .collect();
    let window_s = plan.window.as_secs_f64();
    let notes = &mut report.notes;

    for outcome in outcomes {
        match &outcome.status {
            Status::Unavailable(why) => notes.push(format!(
                "{} was not measured: unavailable here ({why}).",
                outcome.strategy.label()
            )),
            Status::Failed(why) => notes.push(format!(
                "{} was not measured: it failed ({why}).",
                outcome.strategy.label()
            )),
            Status::Ran(_) => {}
        }
    }
    let setups: Vec<String> = ran
        .iter()
        .map(|(s, m)| {
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
    notes.push(format!(
        "Connections reached: {}. Asked for {} per strategy, at most {} per process (the fd \
         limit is 20,000 per process), one strategy at a time, each over a fresh population \
         with the same roles: 5% busy (a byte every idle/4), 1% hung, {} the rest answering \
         every read with +PONG. Each worker opens its connections at an even pace over one \
         idle period and puts each under its strategy at once, so timers are spread as after a \
         long run rather than firing in step; the window opens once all are up, and is a whole \
         number of idle periods. lull's tick: {}. Whole run: {:.0} s; {}.",
        setups.join("; "),
        thousands(plan.conns),
        thousands(plan.per_process),
        if env.vanishing() {
            "1% vanishing,"
        } else {
            "no vanishing peers,"
        },
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
            "CPU ms is the CPU time of every process of the run over the {window_s:.0} s window \
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
            "CPU ms is whole-system CPU over the {window_s:.0} s window (every CPU's time less \
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
    attachment_note(notes, env, &ran);
    let stray: Vec<String> = ran
        .iter()
        .filter(|(s, _)| *s != Strategy::Kernel)
        .map(|(s, m)| format!("{} {}", s.label(), m.keepalives))
        .collect();
    notes.push(format!(
        "Probes sent: lull's and tokio's own counts between the window's start and end; the \
         kernel's are TcpExt TCPKeepAlive from /proc/net/netstat over the window, which counts \
         the whole network namespace ({}). lull brings each timer forward by up to 10% of idle \
         at random (its default jitter), so it probes a connection about 5% more often than \
         kernel keepalive or the tokio engine.{}",
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
    let vanishing = match ran.iter().find_map(|(_, m)| m.blackhole_ms) {
        Some(ms) => format!(
            "; vanishing peers lose every packet from the same instant (an iptables DROP rule \
             in the run's namespace, which took {ms:.0} ms to add)"
        ),
        None => String::new(),
    };
    notes.push(format!(
        "Detection: hung peers stop answering (socket open, kernel still ACKing) at a fixed \
         instant {:.1} s into the window{vanishing}. Latency runs from that instant to the \
         verdict, so with a peer silent since up to one idle period before it, anything from \
         count x interval ({} s) to the bound ({} s) is expected. Kernel keepalive's probes are \
         ACKed by a hung peer's kernel, so it cannot catch hung peers; it can catch vanished \
         ones, through the error (ETIMEDOUT) epoll reports.",
        plan.hang_after.as_secs_f64(),
        (plan.timing.interval() * plan.timing.count).as_secs_f64(),
        plan.timing.bound().as_secs_f64(),
    ));
    // Wakeups per worker process a second, for the first of these that ran.
    let wakeups = |of: &[Strategy]| {
        ran.iter().find(|(s, _)| of.contains(s)).map(|(s, m)| {
            let rate = m.wakeups.0 as f64 / m.window.as_secs_f64() / m.processes as f64;
            (s.label(), rate)
        })
    };
    let lull = wakeups(&[Strategy::LullEbpf, Strategy::LullTcpinfo]);
    if let (Some((lull, lull_rate)), Some((_, tokio_rate))) = (lull, wakeups(&[Strategy::Tokio])) {
        let busy = ran.first().map_or(0, |(_, m)| m.roles[Role::Busy.index()]);
        notes.push(format!(
            "With this mix nearly all the work is probes and their answers, which lull and tokio \
             send alike (about the same count, one write and one read each, and the peer's \
             answer). lull's laziness pays on busy connections, which here are {busy} carrying a \
             byte every idle/4: the tokio engine resets {:.0} timers a second for them, which \
             costs little next to the probes. So lull has little to save here, and it pays for \
             how it learns of activity, which tokio gets from the reads it makes anyway: \
             lull-tcpinfo makes a TCP_INFO getsockopt at every timer firing, and lull-ebpf's \
             programs run on every packet of the workers' sockets (see the note on lull's \
             programs). lull also drains with a non-blocking RECV at every firing, including \
             those where nothing arrived, where tokio reads only when epoll reports data. Wakeups per process a second: \
             {lull_rate:.0} for {lull}'s engine (it sleeps until its next due timer, at a {} \
             tick), {tokio_rate:.0} for tokio's runtime. BENCHMARKS.md has a profile of where \
             each strategy's time goes. \
             --lull-tick sets lull's tick for a run.",
            busy as f64 * 4.0 / plan.timing.idle().as_secs_f64(),
            plan.lull_tick
                .map_or("1 ms (its default)".into(), |t| format!("{t:?}")),
        ));
    }
    let drops: u64 = ran.iter().map(|(_, m)| m.drops).sum();
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
        .filter(|(_, m)| m.wrongly_dead > 0 || m.closed > 0 || m.revived > 0)
        .map(|(s, m)| {
            format!(
                "{}: {} answering or busy connections reported dead, {} ended otherwise, {} \
                 revived",
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
         read (the same for every strategy); epoll items for kernel and tokio; for lull-ebpf a \
         socket-storage element per registered socket. lull-ebpf's table (24 B a slot) is a \
         vmalloc'd BPF array, outside slab. Other processes' activity during setup moves these \
         a little. Worker RSS is the workers' own user-space growth over the same span."
            .into(),
    );
    let extrapolated: Vec<String> = ran
        .iter()
        .map(|(s, m)| {
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
         one million, at this policy and traffic mix, both ends on one host as here): {}. At \
         this fd limit 1M client sockets take about {} worker processes; on a real network the \
         peers' share of the CPU and half of the slab would be on other hosts.",
        extrapolated.join("; "),
        1_000_000u64.div_ceil(plan.per_process),
    ));
}

/// Where lull's programs ran: one shared attachment on the run's cgroup, none on the peers'.
fn attachment_note(notes: &mut Vec<String>, env: &Environment, ran: &[(Strategy, &Measured)]) {
    let cgroup = match &env.cgroup {
        Ok(cgroup) => cgroup,
        Err(why) => {
            notes.push(format!(
                "The workers ran in the orchestrator's own cgroup, not one made for the run \
                 ({why}): each lull-ebpf worker attached lull's programs where lull decides (a \
                 cgroup of its own when it runs in the root), so their packets may have run \
                 more than one program pair."
            ));
            return;
        }
    };
    let checks: Vec<String> = ran
        .iter()
        .filter(|(s, _)| *s == Strategy::LullEbpf)
        .map(|(s, m)| {
            let what = match &m.attachment {
                Some(Ok(a)) if a.shared() => format!("one shared link pair: {}", a.describe()),
                Some(Ok(a)) => format!("NOT one shared link pair: {}", a.describe()),
                Some(Err(why)) => format!("could not be read ({why})"),
                None => "not read".into(),
            };
            format!("{}: {what}", s.label())
        })
        .collect();
    let stale: Vec<String> = ran
        .iter()
        .filter_map(|(s, m)| Some(format!("{} ({})", s.label(), m.stale.as_ref()?)))
        .collect();
    notes.push(format!(
        "lull's programs: every worker process ran in {} (made for the run, a child of the \
         orchestrator's cgroup {}, and removed at its end), which it entered between fork and \
         exec; every peer process ran in the orchestrator's cgroup. lull's eBPF source attaches \
         to the cgroup its process runs in and pins the attachment once per host, so the \
         workers of a strategy share one link pair (cgroup_skb ingress and sock_ops), each of \
         their packets runs one program pair, and no peer socket runs any; each worker lets go \
         of its engine before it exits, and the last one detaches. Checked once every worker \
         was up, from lull's link pins under /sys/fs/bpf/lull/engine-*/links/ and \
         BPF_PROG_QUERY on both cgroups: {}. {}",
        cgroup.path().display(),
        cgroup.home().display(),
        if checks.is_empty() {
            "lull-ebpf did not run".to_string()
        } else {
            checks.join("; ")
        },
        if stale.is_empty() {
            "No program was left attached to the run's cgroup when a strategy started.".into()
        } else {
            format!(
                "Programs were still attached to the run's cgroup when these strategies \
                 started, so their sockets ran them too: {}.",
                stale.join("; ")
            )
        },
    ));
}
