//! Running host mode's iterators and decoding what they write.

use std::{
    collections::BTreeMap,
    io::Read as _,
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use lull_common::host::{ClockRecord, PickupRecord, pickup};

use super::{
    HostError,
    kernel::Kernel,
    netns::{self, Netns},
    sys,
};

/// Reads an iterator run to its end. The kernel hands out at most a few pages per `read`.
pub(crate) fn read_all(
    mut file: std::fs::File,
    program: &'static str,
) -> Result<Vec<u8>, HostError> {
    let mut out = Vec::with_capacity(1 << 20);
    file.read_to_end(&mut out)
        .map_err(|e| HostError::syscall(format!("read({program} iterator)"), e))?;
    Ok(out)
}

/// Reads an iterator run in chunks of about a megabyte of whole records (the first chunk
/// starts with a `head`-byte header record), calling `f` with each until it returns false or
/// the run ends. The kernel hands out a few pages per `read`, not always on a record boundary.
pub(crate) fn read_chunks(
    mut file: std::fs::File,
    program: &'static str,
    record: usize,
    head: usize,
    mut f: impl FnMut(Vec<u8>) -> bool,
) -> Result<(), HostError> {
    const CHUNK: usize = 1 << 20;
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut header = head;
    loop {
        let filled = buf.len();
        buf.resize(CHUNK.max(filled + record), 0);
        let n = loop {
            match file.read(&mut buf[filled..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(HostError::syscall(format!("read({program} iterator)"), e));
                }
            }
        };
        buf.truncate(filled + n);
        let eof = n == 0;
        if !eof && buf.len() < CHUNK / 2 {
            continue;
        }
        let usable = if buf.len() < header {
            0
        } else {
            header + (buf.len() - header) / record * record
        };
        if usable > 0 {
            let rest = buf.split_off(usable);
            let chunk = std::mem::replace(&mut buf, rest);
            header = 0;
            if !f(chunk) {
                return Ok(());
            }
            buf.reserve(CHUNK);
        }
        if eof {
            if buf.is_empty() {
                return Ok(());
            }
            return Err(HostError::IterOutput {
                program,
                len: buf.len(),
            });
        }
    }
}

/// Splits iterator output into records of `T`.
pub(crate) fn records<'a, T: aya::Pod>(
    bytes: &'a [u8],
    program: &'static str,
) -> Result<impl ExactSizeIterator<Item = T> + 'a, HostError> {
    let size = size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return Err(HostError::IterOutput {
            program,
            len: bytes.len(),
        });
    }
    Ok(bytes.chunks_exact(size).map(|chunk| {
        // SAFETY: `chunk` holds exactly size_of::<T>() bytes, and `T: Pod` is valid for every
        // bit pattern; the read is unaligned-safe.
        unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<T>()) }
    }))
}

/// Measures the kernel's `HZ`: jiffies against the monotonic clock, read together by a BPF
/// program, twice about 100 ms apart, rounded to the nearest value kernels are built with.
pub(crate) fn measure_hz(kernel: &Kernel) -> Result<u32, HostError> {
    let sample = || -> Result<ClockRecord, HostError> {
        let bytes = read_all(sys::iter_create(kernel.clock_link.as_fd())?, "clock")?;
        records::<ClockRecord>(&bytes, "clock")?
            .find(|r| r.magic == ClockRecord::MAGIC)
            .ok_or(HostError::IterOutput {
                program: "clock",
                len: bytes.len(),
            })
    };
    let first = sample()?;
    let started = Instant::now();
    let mut last = first;
    // At HZ=100 a jiffy is 10 ms: 100 ms gives 10 of them, enough to tell 100 from 250.
    while started.elapsed() < Duration::from_millis(100)
        || last.jiffies.saturating_sub(first.jiffies) < 10
    {
        std::thread::sleep(Duration::from_millis(20));
        last = sample()?;
        if started.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let jiffies = last.jiffies.saturating_sub(first.jiffies) as f64;
    let seconds = last.ktime_ns.saturating_sub(first.ktime_ns) as f64 / 1e9;
    let measured = if seconds > 0.0 {
        jiffies / seconds
    } else {
        0.0
    };
    Ok([100u32, 250, 300, 1000]
        .into_iter()
        .min_by(|a, b| {
            (f64::from(*a) - measured)
                .abs()
                .total_cmp(&(f64::from(*b) - measured).abs())
        })
        .expect("non-empty"))
}

/// Why a connection a rule matched was not picked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Missed {
    /// It was not ESTABLISHED (closing already); there is nothing to keep alive.
    NotEstablished,
    /// `bpf_setsockopt` refused a keepalive option (the errno).
    Setsockopt(i32),
    /// State callbacks could not be turned on (needs Linux 6.14's
    /// `TCP_BPF_SOCK_OPS_CB_FLAGS`): its options are set, but its close gets no verdict.
    CbFlags(i32),
    /// Its socket storage could not be allocated.
    Storage,
    /// Its cgroup could not be read from the socket, so no rule could be told.
    NoCgroup,
}

impl std::fmt::Display for Missed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let errno = |e: i32| std::io::Error::from_raw_os_error(-e);
        match *self {
            Self::NotEstablished => f.write_str("not ESTABLISHED (closing)"),
            Self::Setsockopt(e) => write!(f, "bpf_setsockopt refused ({})", errno(e)),
            Self::CbFlags(e) => write!(
                f,
                "options set but state callbacks refused, so no verdict ({}; needs Linux 6.14)",
                errno(e)
            ),
            Self::Storage => f.write_str("socket storage could not be allocated"),
            Self::NoCgroup => f.write_str("its cgroup could not be read from the socket"),
        }
    }
}

/// What the pickup iterator did, over every network namespace.
#[derive(Clone, Debug, Default)]
pub struct PickupReport {
    /// Connections picked up, by rule slot.
    pub picked: BTreeMap<u32, u64>,
    /// Connections a rule matched that were not picked up, by reason.
    pub missed: BTreeMap<Missed, u64>,
    /// Network namespaces visited.
    pub namespaces: usize,
    /// Network namespaces that could not be entered, and why (their connections are not
    /// counted at all).
    pub unreachable: Vec<(Netns, String)>,
}

impl PickupReport {
    /// Connections picked up in all.
    pub fn picked_total(&self) -> u64 {
        self.picked.values().sum()
    }

    /// Connections missed in all.
    pub fn missed_total(&self) -> u64 {
        self.missed.values().sum()
    }
}

/// Runs the pickup iterator in every network namespace.
pub(crate) fn pickup(kernel: &Kernel) -> PickupReport {
    let namespaces = netns::all();
    let link = kernel.pickup_link.as_fd();
    let runs = netns::each(&namespaces, || read_all(sys::iter_create(link)?, "pickup"));
    let mut report = PickupReport::default();
    for (ns, result) in runs {
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(err) => {
                report.unreachable.push((ns, err.to_string()));
                continue;
            }
        };
        report.namespaces += 1;
        let Ok(recs) = records::<PickupRecord>(&bytes, "pickup") else {
            report
                .unreachable
                .push((ns, format!("{} bytes of pickup output", bytes.len())));
            continue;
        };
        for r in recs {
            let missed = match r.result {
                pickup::PICKED => {
                    *report.picked.entry(u32::from(r.slot)).or_default() += 1;
                    continue;
                }
                pickup::NOT_ESTABLISHED => Missed::NotEstablished,
                pickup::SETSOCKOPT => Missed::Setsockopt(r.err),
                pickup::CB_FLAGS => Missed::CbFlags(r.err),
                pickup::STORAGE => Missed::Storage,
                _ => Missed::NoCgroup,
            };
            *report.missed.entry(missed).or_default() += 1;
        }
    }
    report
}
