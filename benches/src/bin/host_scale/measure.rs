//! What host-scale measures, and the private network namespace it measures in.

use std::{
    collections::HashMap,
    io::Read as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use crate::fleet::SAMPLE_SOURCE;

/// Moves this process into a network namespace of its own with `lo` up: its connections,
/// ephemeral ports and firewall rules are its own and cannot disturb the host's. Children
/// inherit it. Must run before any thread starts (`unshare` moves the calling thread only).
pub fn private_netns() -> Result<()> {
    // SAFETY: no pointers; affects this (still single-threaded) process only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
    }
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: all-zero is a valid `ifreq`.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid `ifreq` naming `lo`; the ioctls read and write only it; `fd`
    // is ours and closed once.
    let ok = unsafe {
        let got = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0;
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let set = got && libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) == 0;
        libc::close(fd);
        set
    };
    ensure!(ok, "bringing up lo: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Raises the soft fd limit to the hard one (20,000 here) and returns it.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer; setrlimit with values the kernel just gave.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// The kernel's slab memory (`Slab:` of /proc/meminfo), in bytes: where sockets, their files
/// and inodes, and BPF socket storage live.
pub fn slab_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .context("no Slab: in /proc/meminfo")
}

/// A process's CPU time (all threads, ns, from schedstat) and resident memory.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub cpu_ns: u64,
    pub rss: u64,
    pub at: Instant,
}

impl Usage {
    pub fn read(pid: u32) -> Result<Self> {
        let mut cpu_ns = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("process {pid} is gone"))?
            .flatten()
        {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            cpu_ns += stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .context("VmRSS")?
            * 1024;
        Ok(Self {
            cpu_ns,
            rss,
            at: Instant::now(),
        })
    }

    /// CPU used since `earlier`, as a percentage of one core.
    pub fn cpu_percent_since(&self, earlier: &Self) -> f64 {
        let wall = self.at.duration_since(earlier.at).as_nanos() as f64;
        100.0 * self.cpu_ns.saturating_sub(earlier.cpu_ns) as f64 / wall.max(1.0)
    }
}

/// Runs `lull ls --json` (plus `extra`) and returns its wall time and row count.
pub fn time_ls(lull: &Path, instance: &str, extra: &[&str]) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let mut child = Command::new(lull)
        .args(["ls", "--json", "--instance", instance])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running lull ls")?;
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .context("ls stdout")?
        .read_to_end(&mut out)?;
    let mut err = String::new();
    child
        .stderr
        .take()
        .context("ls stderr")?
        .read_to_string(&mut err)?;
    let status = child.wait()?;
    let took = started.elapsed();
    ensure!(
        status.success(),
        "lull ls failed ({status}): {}",
        err.trim()
    );
    let rows = memchr_count(&out, b"{\"cookie\":");
    Ok((took, rows))
}

fn memchr_count(haystack: &[u8], needle: &[u8]) -> u64 {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count() as u64
}

/// Firewall rules, in the run's private namespace, that drop everything to and from the
/// sample clients' address: their host has vanished. Removed on drop.
pub struct Blackhole;

impl Blackhole {
    pub fn start() -> Result<Self> {
        iptables("-I")?;
        Ok(Self)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = iptables("-D");
    }
}

fn iptables(action: &str) -> Result<()> {
    lull_benches::drop_traffic_of(action, &SAMPLE_SOURCE.to_string())
}

/// The size of the events file now: where this step's verdicts start.
pub fn events_len(events: &Path) -> usize {
    std::fs::metadata(events).map_or(0, |m| m.len() as usize)
}

/// Watches `events` (lull's JSON lines) from byte `from` until each of `ports` (peers from
/// the sample address) has a verdict or `until` passes. Returns, per port, the verdict and
/// when its line appeared after `since`.
pub fn verdicts(
    events: &Path,
    from: usize,
    ports: &[u16],
    since: Instant,
    until: Instant,
) -> HashMap<u16, (String, Duration)> {
    let prefix = format!("{SAMPLE_SOURCE}:");
    let mut found = HashMap::new();
    let mut offset = from;
    while found.len() < ports.len() && Instant::now() < until {
        if let Ok(text) = std::fs::read_to_string(events) {
            for line in text[offset.min(text.len())..].lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let Some(port) = v["peer"]
                    .as_str()
                    .and_then(|p| p.strip_prefix(&prefix))
                    .and_then(|p| p.parse::<u16>().ok())
                else {
                    continue;
                };
                let kind = v["verdict"].as_str().unwrap_or("?").to_string();
                found.entry(port).or_insert((kind, since.elapsed()));
            }
            offset = text.rfind('\n').map_or(offset, |i| i + 1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    found.retain(|p, _| ports.contains(p));
    found
}
