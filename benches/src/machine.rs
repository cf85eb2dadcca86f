//! Readings of the machine and of this process that benchmarks share: what the machine is,
//! CPU time, which CPUs a thread runs on, the kernel's network counters, and the one firewall
//! rule the benchmarks use to make peers vanish.

use std::{fs, io};

use anyhow::{Context as _, Result};

/// "Linux 6.18.44, 2 CPUs (Model name), 24 GiB".
pub fn machine_description() -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    format!(
        "Linux {}, {cpus} CPUs ({model}), {} GiB",
        kernel.trim(),
        (mem_kib + (1 << 19)) >> 20
    )
}

/// CPU time (user + system) of this process so far, in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    let (user, system) = rusage_ns(libc::RUSAGE_SELF);
    user + system
}

/// CPU time (user + system) of the calling thread so far, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let (user, system) = thread_user_system_ns();
    user + system
}

/// The calling thread's CPU time so far as getrusage splits it, (user, system) in ns. The
/// kernel splits the exact total in the ratio of the timer ticks that found the thread in
/// either mode, so the split is only as good as the ticks it rests on.
pub fn thread_user_system_ns() -> (u64, u64) {
    rusage_ns(libc::RUSAGE_THREAD)
}

fn rusage_ns(who: libc::c_int) -> (u64, u64) {
    // SAFETY: rusage is plain integers; `ru` is a valid out-pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// The CPUs this process may run on, ascending.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid out-pointer of the size passed.
    if unsafe { libc::sched_getaffinity(0, size_of_val(&set), &mut set) } != 0 {
        return Err(syscall_error("sched_getaffinity"));
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, the set's size in bits.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Pins the calling thread, and every thread it starts later, to `cpu`.
pub fn pin_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is beyond CPU_SETSIZE"),
        ));
    }
    // SAFETY: all zeroes is the empty cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid, initialised cpu_set_t of the size passed.
    if unsafe { libc::sched_setaffinity(0, size_of_val(&set), &set) } != 0 {
        return Err(syscall_error("sched_setaffinity"));
    }
    Ok(())
}

fn syscall_error(call: &str) -> io::Error {
    let err = io::Error::last_os_error();
    io::Error::new(err.kind(), format!("{call}: {err}"))
}

/// A counter from one of the `/proc/net` files that give a group two lines, names then values
/// (`/proc/net/snmp`, `/proc/net/netstat`): e.g. `("/proc/net/snmp", "Tcp:", "OutSegs")`.
pub fn net_counter(path: &str, group: &str, name: &str) -> Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut lines = text.lines().filter(|l| l.starts_with(group));
    let (names, values) = lines
        .next()
        .zip(lines.next())
        .with_context(|| format!("no {group} in {path}"))?;
    names
        .split_whitespace()
        .position(|n| n == name)
        .and_then(|i| values.split_whitespace().nth(i)?.parse().ok())
        .with_context(|| format!("no {group} {name} in {path}"))
}

/// Inserts (`action` "-I") or deletes ("-D") a rule that drops every packet from or to
/// `cidr` on INPUT: peers there vanish without a FIN or RST. Benchmarks call it only inside
/// a network namespace of their own.
pub fn drop_traffic_of(action: &str, cidr: &str) -> Result<()> {
    for dir in ["-s", "-d"] {
        let out = std::process::Command::new("iptables")
            .args(["-w", "5", action, "INPUT", dir, cidr, "-j", "DROP"])
            .output()
            .context("running iptables")?;
        if !out.status.success() {
            anyhow::bail!(
                "iptables {action}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}
