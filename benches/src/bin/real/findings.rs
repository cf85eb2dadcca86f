//! The notes on what this run found, worded from its own figures: where lull's programs ran,
//! detection against each strategy's bound, where the time goes, and whether the machine had
//! room for the work.

use crate::{
    env::Environment,
    measured::{Measured, quantile},
    plan::Plan,
    proto::{Mix, Role, Strategy, Tier},
};

/// Every strategy that ran in the detailed passes, with its mix.
type Ran<'a> = [(Mix, Strategy, &'a Measured)];

/// Where lull's programs ran: one shared attachment on the run's cgroup, none on the peers'.
pub fn attachment(notes: &mut Vec<String>, env: &Environment, ran: &Ran) {
    let cgroup = match &env.cgroup {
        Ok(cgroup) => cgroup,
        Err(why) => {
            notes.push(format!(
                "The workers ran in the orchestrator's own cgroup, not one made for the run \
                 ({why}): each lull-ebpf and lull-tiered worker attached lull's programs where \
                 lull decides (a cgroup of its own when it runs in the root), so their packets \
                 may have run more than one program pair."
            ));
            return;
        }
    };
    let checks: Vec<String> = ran
        .iter()
        .filter(|(_, s, _)| s.uses_ebpf())
        .map(|(mix, s, m)| {
            let what = match &m.attachment {
                Some(Ok(a)) if a.shared() => format!("one shared link pair: {}", a.describe()),
                Some(Ok(a)) => format!("NOT one shared link pair: {}", a.describe()),
                Some(Err(why)) => format!("could not be read ({why})"),
                None => "not read".into(),
            };
            format!("{} {}: {what}", mix.label(), s.label())
        })
        .collect();
    let stale: Vec<String> = ran
        .iter()
        .filter_map(|(mix, s, m)| {
            let stale = m.stale.as_ref()?;
            Some(format!("{} {} ({stale})", mix.label(), s.label()))
        })
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
            "no lull eBPF strategy ran".to_string()
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

/// Connections reported dead more than once, and lull-tiered's vanished peers that its
/// application tier reported first.
pub fn repeats(notes: &mut Vec<String>, ran: &Ran) {
    let repeated: Vec<String> = ran
        .iter()
        .filter(|(_, _, m)| m.repeated.iter().sum::<u64>() > 0)
        .map(|(mix, s, m)| {
            let [t, a, u] = m.repeated;
            let by = if s.is_lull() {
                format!(" (the repeat by the transport tier {t}, the application tier {a})")
            } else {
                format!(" ({u})")
            };
            format!("{} {}{by}", mix.label(), s.label())
        })
        .collect();
    if !repeated.is_empty() {
        notes.push(format!(
            "Connections reported dead more than once, of which the tables count only the \
             first verdict: {}.",
            repeated.join("; ")
        ));
    }
    let early: Vec<String> = ran
        .iter()
        .filter(|(_, s, m)| {
            *s == Strategy::LullTiered && m.vanished_tiers[Tier::Application.index()] > 0
        })
        .map(|(mix, _, m)| {
            format!(
                "{} mix {} of {} (the latest {:.0} ms after the vanish)",
                mix.label(),
                m.vanished_tiers[Tier::Application.index()],
                m.vanished_ms.len(),
                quantile(&m.vanished_ms, 1.0).unwrap_or(0.0),
            )
        })
        .collect();
    if !early.is_empty() {
        notes.push(format!(
            "lull-tiered's application tier reported vanished peers first: {}. Where lull's own \
             probe is still unacknowledged when a peer vanishes (or goes out after), the \
             kernel sends no keepalive probe while data is in flight, so the transport verdict \
             waits for TCP_USER_TIMEOUT counted from that probe, and can fall past the dead \
             bound; the application tier, count intervals after its probe, may then come \
             first.",
            early.join("; ")
        ));
    }
}

/// How each strategy's detection is bounded, and what the latencies are measured from.
pub fn detection(notes: &mut Vec<String>, plan: &Plan, ran: &Ran) {
    let vanishing = match ran.iter().find_map(|(_, _, m)| m.blackhole_ms) {
        Some(ms) => format!(
            "; vanishing peers lose every packet from the same instant (an iptables DROP rule \
             in the run's namespace, which took {ms:.0} ms to add)"
        ),
        None => String::new(),
    };
    let s = |d: std::time::Duration| format!("{:.2} s", d.as_secs_f64());
    let lull = plan.bounds(Strategy::LullEbpf);
    let tiered = plan.bounds(Strategy::LullTiered);
    notes.push(format!(
        "Detection: hung peers stop answering (socket open, kernel still ACKing) at a fixed \
         instant {:.1} s into the window{vanishing}. Latency runs from that instant to the \
         verdict; a peer was last heard from at or before it, so each verdict must fall within \
         its strategy's bound, counted from the peer's last activity: lull-ebpf and \
         lull-tcpinfo idle x (1 + jitter/2) + count x interval = {} (the first probe can go \
         out at the far edge of the jitter window); lull-tiered, hung peers by its application \
         tier within hung_after + interval = {} (hung_after = {} x the dead bound), vanished \
         ones by its transport tier (kernel keepalive armed with the policy's idle, interval \
         and count, plus TCP_USER_TIMEOUT) within idle + count x interval = {}; kernel \
         keepalive, vanished peers within {} and no hung peer ever, since the hung peer's \
         kernel ACKs its probes; tokio, {}. The detection table checks every catch against its \
         bound and splits lull's by tier.",
        plan.hang_after.as_secs_f64(),
        s(lull.vanished),
        s(tiered.hung.unwrap_or_default()),
        crate::proto::HUNG_AFTER_BOUNDS,
        s(tiered.vanished),
        s(plan.bounds(Strategy::Kernel).vanished),
        s(plan.bounds(Strategy::Tokio).vanished),
    ));
}

/// Where the time goes in each mix, and whether the machine had room for the work.
pub fn where_time_goes(notes: &mut Vec<String>, plan: &Plan, ran: &Ran) {
    let get = |mix: Mix, s: Strategy| {
        ran.iter()
            .find(|(m, x, _)| *m == mix && *x == s)
            .map(|(_, _, m)| *m)
    };
    let mut mixes: Vec<Mix> = ran.iter().map(|(mix, _, _)| *mix).collect();
    mixes.dedup();
    for mix in mixes {
        let (Some(lull), Some(tokio)) = (get(mix, Strategy::LullEbpf), get(mix, Strategy::Tokio))
        else {
            continue;
        };
        let busy = lull.of(Role::Busy);
        let messages = busy as f64 / mix.busy_every(&plan.timing).as_secs_f64();
        let wakeups =
            |m: &Measured| m.wakeups.0 as f64 / m.window.as_secs_f64() / m.processes as f64;
        let drains = lull.lull.map_or(String::new(), |c| {
            format!(
                " ({} drains in the window; {} firings skipped the read, nothing having \
                 arrived since the connection's last probe)",
                c.drains, c.drains_skipped
            )
        });
        notes.push(format!(
            "Where the time goes, {} mix: {busy} busy connections carry {messages:.0} messages \
             a second in all. The tokio engine reads each and resets a timer for it, and kernel \
             keepalive's epoll loop reads each too; lull reads nothing until a connection's \
             timer fires, then re-arms if the activity table shows traffic, and drains what \
             piled up{drains}. lull-ebpf learns of activity from its programs, run on every \
             packet of the workers' sockets; lull-tcpinfo makes a TCP_INFO getsockopt at every \
             timer firing. Wakeups per worker process a second: {:.0} for lull-ebpf's engine \
             (it sleeps until its next due timer, at a {} tick), {:.0} for tokio's runtime. \
             BENCHMARKS.md has a profile of where each strategy's time goes; --lull-tick sets \
             lull's tick for a run.",
            mix.label(),
            wakeups(lull),
            plan.lull_tick
                .map_or("1 ms (its default)".into(), |t| format!("{t:?}")),
            wakeups(tokio),
        ));
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy: Vec<String> = ran
        .iter()
        .filter_map(|(mix, s, m)| {
            let pct = m.cpu.whole / (m.window.as_secs_f64() * 1e3 * cpus) * 100.0;
            (pct >= 85.0).then(|| format!("{} {} {pct:.0}%", mix.label(), s.label()))
        })
        .collect();
    if !busy.is_empty() {
        notes.push(format!(
            "The machine was nearly saturated (whole-system CPU, all {cpus:.0} CPUs) during: \
             {}. There the CPUs, not the strategy, limit the work done, and the figures \
             understate what the strategy would use with room to run.",
            busy.join(", ")
        ));
    }
}
