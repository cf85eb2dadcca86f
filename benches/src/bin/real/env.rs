//! What the machine lets the run do and measure, and what it does with nothing of the run's
//! going on.

use std::collections::HashSet;

use anyhow::Result;

use crate::{
    cgroup::RunCgroup,
    child::Kid,
    plan::Plan,
    softirq::{Softirq, SoftirqTime},
    system::{CpuStat, ProcScan, blackhole, ticks_to_ms},
};

/// What the machine lets the run do.
pub struct Environment {
    /// Why the run shares the host's network namespace, if it does.
    pub shared_netns: Option<String>,
    /// Why there are no vanishing peers, if there are none.
    pub no_vanishing: Option<String>,
    /// Softirq time by context, or why it cannot be measured.
    pub softirq: std::result::Result<Softirq, String>,
    /// The cgroup the workers run in, or why there is none (then they run in the
    /// orchestrator's, and each lull-ebpf worker attaches where lull decides).
    pub cgroup: std::result::Result<RunCgroup, String>,
}

impl Environment {
    pub fn probe(netns: Result<()>, refused: bool) -> Self {
        let shared_netns = netns.err().map(|e| format!("{e:#}"));
        // Firewall rules only ever go into a namespace of our own.
        let no_vanishing = match &shared_netns {
            _ if refused => Some("--no-vanishing".to_string()),
            Some(_) => Some("no private network namespace for the firewall rule".to_string()),
            None => blackhole("-I")
                .and_then(|()| blackhole("-D"))
                .err()
                .map(|e| format!("{e:#}")),
        };
        Self {
            shared_netns,
            no_vanishing,
            softirq: Softirq::attach().map_err(|e| format!("{e:#}")),
            cgroup: RunCgroup::create().map_err(|e| format!("{e:#}")),
        }
    }

    /// Starts a worker, in the run's cgroup.
    pub fn spawn_worker(&self, name: String, args: &[String]) -> Result<Kid> {
        self.spawn(name, args, true)
    }

    /// Starts a peer, in the orchestrator's cgroup: outside the run's.
    pub fn spawn_peer(&self, name: String, args: &[String]) -> Result<Kid> {
        self.spawn(name, args, false)
    }

    /// Starts a child and, if softirq is measured, counts it as one of the run's processes.
    fn spawn(&self, name: String, args: &[String], worker: bool) -> Result<Kid> {
        let kid = Kid::spawn(name, args, |command| {
            if let (true, Ok(cgroup)) = (worker, &self.cgroup) {
                cgroup.enter_on_exec(command);
            }
        })?;
        if let Ok(softirq) = &self.softirq {
            softirq.add_process(kid.pid)?;
        }
        Ok(kid)
    }

    pub fn softirq_now(&self) -> Option<SoftirqTime> {
        self.softirq.as_ref().ok().and_then(|s| s.read().ok())
    }

    pub fn vanishing(&self) -> bool {
        self.no_vanishing.is_none()
    }

    pub fn describe(&self) -> String {
        let ns = match &self.shared_netns {
            None => "private network namespace".to_string(),
            Some(why) => format!("host network namespace ({why})"),
        };
        let vanishing = match &self.no_vanishing {
            None => "vanishing peers by iptables".to_string(),
            Some(why) => format!("no vanishing peers ({why})"),
        };
        let cgroup = match &self.cgroup {
            Ok(cgroup) => format!("workers in cgroup {}", cgroup.path().display()),
            Err(why) => format!("workers in this process's cgroup ({why})"),
        };
        format!("{ns}, {vanishing}, {cgroup}")
    }
}

/// The machine with nothing of the run's going on, in ms per second.
#[derive(Debug, Clone, Copy, Default)]
pub struct Background {
    /// Whole-system CPU less other processes: kernel threads and interrupts.
    pub whole_less_others: f64,
    /// Softirq on idle CPUs, in the run's processes (none here) and in anything else: other
    /// people's traffic, which lands in every row's softirq figures too.
    pub softirq: Option<[f64; 3]>,
}

impl Background {
    /// The mean of the readings before and after a strategy.
    pub fn mean(a: Self, b: Self) -> Self {
        Self {
            whole_less_others: (a.whole_less_others + b.whole_less_others) / 2.0,
            softirq: a
                .softirq
                .zip(b.softirq)
                .map(|(x, y)| [0, 1, 2].map(|i| (x[i] + y[i]) / 2.0)),
        }
    }
}

/// Reads [`Background`] over `plan.background`, with none of the run's children alive.
pub fn background(plan: &Plan, env: &Environment) -> Result<Background> {
    let ours: HashSet<u32> = [std::process::id()].into();
    let (cpu0, scan0, irq0) = (CpuStat::read()?, ProcScan::read(), env.softirq_now());
    std::thread::sleep(plan.background);
    let (cpu1, scan1, irq1) = (CpuStat::read()?, ProcScan::read(), env.softirq_now());
    let secs = cpu1.at.duration_since(cpu0.at).as_secs_f64();
    let whole = ticks_to_ms(cpu1.busy_since(&cpu0).0);
    let others = ticks_to_ms(scan1.others_since(&scan0, &ours));
    Ok(Background {
        whole_less_others: (whole - others) / secs,
        softirq: irq0
            .zip(irq1)
            .map(|(a, b)| b.ms_since(&a).map(|ms| ms / secs)),
    })
}
