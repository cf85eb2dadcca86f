//! What the orchestrator reads from the kernel: CPU time of the whole system and of every
//! process, slab memory, TCP counters; and the private network namespace the run lives in.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::fd::AsRawFd,
};

use anyhow::{Context as _, Result, ensure};
use lull_benches::net_counter;
use socket2::{Domain, Socket, Type};

/// `USER_HZ`: the unit of `/proc/stat` and `/proc/<pid>/stat` times.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as u64
}

pub fn ticks_to_ms(ticks: u64) -> f64 {
    ticks as f64 * 1000.0 / ticks_per_second() as f64
}

/// Moves this process into a network namespace of its own with `lo` up, so that the run's
/// TCP counters (`TCPKeepAlive`, `OutSegs`) count its own traffic only, its ephemeral ports
/// and firewall rules are its own, and it cannot disturb the host's. Children inherit it, and
/// it disappears when the last of them exits. Must run before any thread is started, since
/// `unshare` moves the calling thread only.
pub fn private_netns() -> Result<()> {
    // SAFETY: no pointers; affects this (so far single-threaded) process only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
    }
    // Any socket will do: the ioctls act on the interface it names.
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, None).context("socket(AF_INET)")?;
    let fd = socket.as_raw_fd();
    // SAFETY: all-zero is a valid `ifreq`.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid `ifreq` naming `lo`; the ioctls read and write only it; `fd`
    // stays open until `socket` drops.
    let ok = unsafe {
        let got = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0;
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        got && libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) == 0
    };
    ensure!(ok, "bringing up lo: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Adds (`-I`) or deletes (`-D`) the rules that drop every packet to and from the vanishing
/// peers. Only ever called inside [`private_netns`].
pub fn blackhole(action: &str) -> Result<()> {
    lull_benches::drop_traffic_of(action, crate::proto::VANISH_SUBNET)
}

/// Whole-system CPU time from `/proc/stat`, in ticks.
///
/// The busy fields are sampled at each timer tick (this kernel has no IRQ time accounting),
/// but with a tickless idle the idle field is measured exactly, so busy time is taken as
/// elapsed time on every CPU less idle, iowait and steal.
#[derive(Debug, Clone, Copy)]
pub struct CpuStat {
    /// Sampled: irq + softirq.
    pub irq: u64,
    /// idle + iowait + steal, summed over CPUs.
    pub idle: u64,
    pub cpus: u64,
    pub at: std::time::Instant,
}

impl CpuStat {
    pub fn read() -> Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let at = std::time::Instant::now();
        let line = stat.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        ensure!(v.len() >= 8, "short /proc/stat line: {line}");
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count() as u64;
        // user nice system idle iowait irq softirq steal
        Ok(Self {
            irq: v[5] + v[6],
            idle: v[3] + v[4] + v[7],
            cpus: cpus.max(1),
            at,
        })
    }

    /// Busy ticks and sampled irq + softirq ticks since `earlier`.
    pub fn busy_since(&self, earlier: &Self) -> (u64, u64) {
        let elapsed = self.at.duration_since(earlier.at).as_secs_f64();
        let capacity = elapsed * (ticks_per_second() * self.cpus) as f64;
        let idle = self.idle.saturating_sub(earlier.idle) as f64;
        (
            (capacity - idle).max(0.0).round() as u64,
            self.irq.saturating_sub(earlier.irq),
        )
    }
}

/// Loopback packets the kernel dropped because a CPU's input backlog was full (the second
/// column of `/proc/net/softnet_stat`, summed over CPUs).
pub fn backlog_drops() -> u64 {
    fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .sum()
}

/// `net.core.netdev_max_backlog` raised for the run, put back when dropped.
///
/// Loopback delivers every packet through the sending CPU's input backlog, which holds 1,000
/// by default. Kernel keepalive probes are sent from timer softirq, where the kernel's timer
/// wheel fires thousands of them in one batch (a 3 to 16 s timer is rounded to 256 ms), and
/// none is delivered until the batch is done: the backlog overflows, probes and their ACKs
/// are dropped, and healthy connections are killed. A NIC does not pass what it sends
/// through that queue, so this is loopback's artefact, and the run raises the limit rather
/// than measure it.
pub struct Backlog {
    pub before: u64,
    pub now: u64,
    /// Opened before leaving the host's network namespace, whose `/proc/sys/net` is the only
    /// one that has this (global) setting.
    file: fs::File,
}

impl Backlog {
    pub fn raise(to: u64) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/sys/net/core/netdev_max_backlog")
            .context("opening netdev_max_backlog")?;
        let mut text = String::new();
        file.read_to_string(&mut text)
            .context("reading netdev_max_backlog")?;
        let before: u64 = text.trim().parse().context("parsing netdev_max_backlog")?;
        if before < to {
            file.rewind()?;
            file.write_all(to.to_string().as_bytes())
                .context("writing netdev_max_backlog")?;
        }
        Ok(Self {
            before,
            now: before.max(to),
            file,
        })
    }
}

impl Drop for Backlog {
    fn drop(&mut self) {
        use std::io::{Seek, Write};
        if self.now != self.before {
            let restored = self
                .file
                .rewind()
                .and_then(|()| self.file.write_all(self.before.to_string().as_bytes()));
            if let Err(err) = restored {
                eprintln!(
                    "real: restoring netdev_max_backlog to {}: {err}",
                    self.before
                );
            }
        }
    }
}

/// One process's CPU times from `/proc/<pid>/stat`, in ticks (all its threads).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcCpu {
    pub user: u64,
    pub system: u64,
    /// Children it has reaped (user + system).
    pub children: u64,
    pub start: u64,
    pub kernel_thread: bool,
}

impl ProcCpu {
    pub fn read(pid: u32) -> Option<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name, which may itself hold spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        const PF_KTHREAD: u64 = 0x0020_0000;
        Some(Self {
            user: *f.get(11)?,
            system: *f.get(12)?,
            children: f.get(13)? + f.get(14)?,
            start: *f.get(19)?,
            kernel_thread: f.get(6)? & PF_KTHREAD != 0,
        })
    }

    fn total(&self) -> u64 {
        self.user + self.system + self.children
    }
}

/// Every process on the machine, to subtract the CPU of those that are not part of the run.
pub struct ProcScan(HashMap<u32, ProcCpu>);

impl ProcScan {
    pub fn read() -> Self {
        let mut all = HashMap::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(cpu) = ProcCpu::read(pid) {
                all.insert(pid, cpu);
            }
        }
        Self(all)
    }

    /// Ticks used since `earlier` by user-space processes outside `ours`.
    ///
    /// A process that started in between counts whole. One that ended in between reaches its
    /// parent's reaped children whole, lifetime included (a 40 s benchmark of someone else's
    /// ending in the window adds 40 s there), so what it had used by `earlier` is taken back
    /// out.
    pub fn others_since(&self, earlier: &Self, ours: &HashSet<u32>) -> u64 {
        let same = |a: &ProcCpu, b: &ProcCpu| a.start == b.start;
        let mut total: i64 = 0;
        for (pid, now) in &self.0 {
            if now.kernel_thread || ours.contains(pid) {
                continue;
            }
            total += match earlier.0.get(pid) {
                Some(then) if same(then, now) => now.total() as i64 - then.total() as i64,
                _ => now.total() as i64,
            };
        }
        for (pid, then) in &earlier.0 {
            if then.kernel_thread || ours.contains(pid) {
                continue;
            }
            if !self.0.get(pid).is_some_and(|now| same(then, now)) {
                total -= then.total() as i64;
            }
        }
        total.max(0) as u64
    }
}

/// `Slab` and `SUnreclaim` from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Meminfo {
    pub slab: u64,
    pub unreclaimable: u64,
}

impl Meminfo {
    pub fn read() -> Result<Self> {
        let text = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let field = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map(|kib| kib * 1024)
                .with_context(|| format!("no {name} in /proc/meminfo"))
        };
        Ok(Self {
            slab: field("Slab")?,
            unreclaimable: field("SUnreclaim")?,
        })
    }
}

/// Allocated objects and object size per slab cache, from `/proc/slabinfo` (root only; empty
/// if it cannot be read).
pub struct SlabInfo(HashMap<String, (u64, u64)>);

/// What the slab caches grew by.
pub struct SlabGrowth {
    /// Every cache, in bytes.
    pub total: i64,
    /// The caches that grew with the connections, less `/proc/<pid>/fd` entries, in bytes.
    pub sockets: i64,
    /// The caches that grew most, largest first.
    pub top: Vec<(String, i64)>,
}

impl SlabInfo {
    pub fn read() -> Self {
        let text = fs::read_to_string("/proc/slabinfo").unwrap_or_default();
        let caches = text
            .lines()
            .skip(2)
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let name = f.next()?.to_string();
                let active: u64 = f.next()?.parse().ok()?;
                let _total = f.next()?;
                let size: u64 = f.next()?.parse().ok()?;
                Some((name, (active, size)))
            })
            .collect();
        Self(caches)
    }

    pub fn available(&self) -> bool {
        !self.0.is_empty()
    }

    /// Growth since `earlier`, over which `conns` connections were opened.
    ///
    /// `sockets` counts only the caches that grew by at least one object per four
    /// connections, which leaves out the churn of other people's jobs (processes starting and
    /// ending, files opened) that these readings also catch. It also leaves out the inodes
    /// and dentries of `/proc/<pid>/fd` entries: something on this machine lists the fds of
    /// processes now and then, which leaves one of each behind per fd, with nothing to do
    /// with the connections.
    pub fn growth_since(&self, earlier: &Self, conns: u64, top: usize) -> SlabGrowth {
        let mut deltas: Vec<(String, i64, i64)> = self
            .0
            .iter()
            .map(|(name, &(n, size))| {
                let then = earlier.0.get(name).map_or(0, |&(m, _)| m);
                let objects = n as i64 - then as i64;
                (name.clone(), objects, objects * size as i64)
            })
            .collect();
        let total: i64 = deltas.iter().map(|(_, _, b)| b).sum();
        let threshold = (conns / 4).max(1) as i64;
        let grew = |name: &str| {
            deltas
                .iter()
                .find(|(n, _, _)| n == name)
                .map_or(0, |&(_, o, _)| o)
        };
        let proc_entries = grew("proc_inode_cache").max(0);
        let dentry_size = self.0.get("dentry").map_or(0, |&(_, s)| s as i64);
        let mut sockets: i64 = deltas
            .iter()
            .filter(|(name, objects, _)| name != "proc_inode_cache" && *objects >= threshold)
            .map(|(_, _, bytes)| bytes)
            .sum();
        if grew("dentry") >= threshold {
            sockets -= proc_entries.min(grew("dentry")) * dentry_size;
        }
        deltas.sort_by_key(|(_, _, b)| -b);
        SlabGrowth {
            total,
            sockets,
            top: deltas
                .into_iter()
                .take(top)
                .map(|(name, _, bytes)| (name, bytes))
                .collect(),
        }
    }
}

/// Namespace-wide TCP counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpCounters {
    /// `TcpExt: TCPKeepAlive`: keepalive probes the kernel sent.
    pub keepalive: u64,
    /// `Tcp: OutSegs`: segments sent (each loopback segment is counted once here).
    pub out_segs: u64,
}

impl TcpCounters {
    pub fn read() -> Result<Self> {
        Ok(Self {
            keepalive: net_counter("/proc/net/netstat", "TcpExt:", "TCPKeepAlive")?,
            out_segs: net_counter("/proc/net/snmp", "Tcp:", "OutSegs")?,
        })
    }
}

/// Times process `pid`'s threads have gone to sleep voluntarily (so been woken since):
/// `voluntary_ctxt_switches` summed over `/proc/<pid>/task/*/status`.
pub fn wakeups(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Ends this process after `secs` whatever it is doing: a child's last line of defence, so
/// that no peer or worker can outlive a run that went wrong.
pub fn watchdog(secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(secs));
        eprintln!(
            "real: child {} ran past {secs} s; exiting",
            std::process::id()
        );
        std::process::exit(3);
    });
}
