//! Softirq time, measured exactly and split by whose context it ran in.
//!
//! This kernel has no IRQ time accounting: softirq work is charged to whatever task it
//! interrupts. Kernel keepalive does all its work in timer softirq (the timer, the probe, the
//! peer's ACK over loopback), so on a machine other people's jobs keep busy, that work is
//! charged to their processes, and "whole system less other processes" loses it. Two tiny
//! BPF programs on the `softirq_entry` and `softirq_exit` raw tracepoints add up the time
//! between them per CPU, in three buckets by what was interrupted: the idle task (time no
//! process is charged for), one of the run's processes (already in their CPU times), or
//! anything else (another process or a kernel thread, charged for it).
//!
//! The programs are written out as instructions here rather than built as BPF objects, so
//! that the benchmark needs no BPF toolchain.

use std::{
    ffi::CString,
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use anyhow::{Context as _, Result, bail};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// Each CPU's accumulator: entry stamp, then ns on the idle task, in the run's processes,
/// and in anything else.
const VALUE: usize = 32;

/// The `bpf(2)` system call, with `attr` as its `union bpf_attr`.
pub fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<RawFd> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` of the size passed; every pointer in it
    // points at memory that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as RawFd)
    }
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn map(kind: u32, key: u32, value: u32, entries: u32) -> Result<OwnedFd> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(kind) | u64::from(key) << 32;
    attr[1] = u64::from(value) | u64::from(entries) << 32;
    Ok(owned(
        bpf(BPF_MAP_CREATE, &mut attr).context("BPF_MAP_CREATE")?,
    ))
}

/// One BPF instruction.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst | src << 4) << 8
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

/// `dst = map` (two instructions).
fn load_map(dst: u8, map: &OwnedFd) -> [u64; 2] {
    [insn(0x18, dst, 1, 0, map.as_raw_fd()), 0]
}

const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const MOV_IMM: u8 = 0xb7;
const MOV_REG: u8 = 0xbf;
const ADD_IMM: u8 = 0x07;
const ADD_REG: u8 = 0x0f;
const SUB_REG: u8 = 0x1f;
const RSH_IMM: u8 = 0x77;
const ST_W: u8 = 0x62;
const ST_DW: u8 = 0x7a;
const STX_W: u8 = 0x63;
const STX_DW: u8 = 0x7b;
const LDX_DW: u8 = 0x79;
const JEQ_IMM: u8 = 0x15;
const JNE_IMM: u8 = 0x55;
const JA: u8 = 0x05;
const MAP_LOOKUP: i32 = 1;
const KTIME: i32 = 5;
const PID_TGID: i32 = 14;

/// `r0 = bpf_map_lookup_elem(map, fp + key)`, the key already stored at `fp + key` (five
/// instructions).
fn lookup(map: &OwnedFd, key: i16) -> [u64; 5] {
    let [map_lo, map_hi] = load_map(1, map);
    [
        insn(MOV_REG, 2, 10, 0, 0),
        insn(ADD_IMM, 2, 0, 0, key.into()),
        map_lo,
        map_hi,
        insn(CALL, 0, 0, 0, MAP_LOOKUP),
    ]
}

/// `softirq_entry`: stamp this CPU's accumulator.
fn entry_program(acc: &OwnedFd) -> Vec<u64> {
    let mut p = vec![insn(ST_W, 10, 0, -4, 0)];
    p.extend(lookup(acc, -4));
    p.extend([
        insn(JEQ_IMM, 0, 0, 3, 0), // -> exit
        insn(MOV_REG, 6, 0, 0, 0),
        insn(CALL, 0, 0, 0, KTIME),
        insn(STX_DW, 6, 0, 0, 0),
        insn(MOV_IMM, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    p
}

/// `softirq_exit`: add the time since the stamp to the bucket of whoever was interrupted: the
/// idle task, one of the run's processes, or anything else.
fn exit_program(acc: &OwnedFd, pids: &OwnedFd) -> Vec<u64> {
    let mut p = vec![
        insn(CALL, 0, 0, 0, KTIME),
        insn(MOV_REG, 7, 0, 0, 0),
        insn(ST_W, 10, 0, -4, 0),
    ];
    p.extend(lookup(acc, -4)); // 3..=7
    p.extend([
        insn(JEQ_IMM, 0, 0, 26, 0), // 8 -> 35
        insn(MOV_REG, 6, 0, 0, 0),
        insn(LDX_DW, 8, 6, 0, 0),
        insn(JEQ_IMM, 8, 0, 23, 0), // 11 -> 35: no stamp (attached mid-softirq)
        insn(SUB_REG, 7, 8, 0, 0),
        insn(ST_DW, 6, 0, 0, 0),
        insn(CALL, 0, 0, 0, PID_TGID),
        insn(JEQ_IMM, 0, 0, 16, 0), // 15 -> 32: the idle task
        insn(RSH_IMM, 0, 0, 0, 32),
        insn(STX_W, 10, 0, -8, 0),
    ]);
    p.extend(lookup(pids, -8)); // 18..=22
    p.extend([
        insn(JNE_IMM, 0, 0, 4, 0), // 23 -> 28: one of ours
        insn(LDX_DW, 1, 6, 24, 0),
        insn(ADD_REG, 1, 7, 0, 0),
        insn(STX_DW, 6, 1, 24, 0),
        insn(JA, 0, 0, 7, 0), // 27 -> 35
        insn(LDX_DW, 1, 6, 16, 0),
        insn(ADD_REG, 1, 7, 0, 0),
        insn(STX_DW, 6, 1, 16, 0),
        insn(JA, 0, 0, 3, 0), // 31 -> 35
        insn(LDX_DW, 1, 6, 8, 0),
        insn(ADD_REG, 1, 7, 0, 0),
        insn(STX_DW, 6, 1, 8, 0),
        insn(MOV_IMM, 0, 0, 0, 0), // 35
        insn(EXIT, 0, 0, 0, 0),
    ]);
    p
}

fn load(name: &str, insns: &[u64]) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u64; 16];
    attr[0] = u64::from(BPF_PROG_TYPE_RAW_TRACEPOINT) | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[3] = 1 | (log.len() as u64) << 32;
    attr[4] = log.as_mut_ptr() as u64;
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        Err(err) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "loading {name}: {err}: {}",
                String::from_utf8_lossy(&log[..end]).trim()
            )
        }
    }
}

fn attach(tracepoint: &str, prog: &OwnedFd) -> Result<OwnedFd> {
    let name = CString::new(tracepoint)?;
    let mut attr = [0u64; 16];
    attr[0] = name.as_ptr() as u64;
    attr[1] = prog.as_raw_fd() as u64;
    Ok(owned(
        bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr)
            .with_context(|| format!("attaching to {tracepoint}"))?,
    ))
}

/// CPUs the kernel may ever bring up: a per-CPU map's value has one slot for each.
fn possible_cpus() -> Result<usize> {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible")
        .context("reading /sys/devices/system/cpu/possible")?;
    let mut most = 0;
    for part in text.trim().split(',') {
        let last = part.rsplit('-').next().unwrap_or(part);
        most = most.max(last.parse::<usize>().context("parsing possible CPUs")? + 1);
    }
    Ok(most)
}

/// The attached programs; dropping this detaches them.
pub struct Softirq {
    acc: OwnedFd,
    pids: OwnedFd,
    cpus: usize,
    _links: [OwnedFd; 2],
    _progs: [OwnedFd; 2],
}

/// Softirq ns so far, summed over CPUs, by what it interrupted.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoftirqTime {
    /// An idle CPU: charged to no process.
    pub idle: u64,
    /// One of the run's processes: already in its CPU time.
    pub ours: u64,
    /// Anything else (another process, a kernel thread): charged to it.
    pub other: u64,
}

impl SoftirqTime {
    /// Milliseconds since `earlier`.
    pub fn ms_since(&self, earlier: &Self) -> [f64; 3] {
        let ms = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1e6;
        [
            ms(self.idle, earlier.idle),
            ms(self.ours, earlier.ours),
            ms(self.other, earlier.other),
        ]
    }
}

impl Softirq {
    pub fn attach() -> Result<Self> {
        let acc = map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, VALUE as u32, 1)?;
        let pids = map(BPF_MAP_TYPE_HASH, 4, 1, 1024)?;
        let entry = load("softirq_entry", &entry_program(&acc))?;
        let exit = load("softirq_exit", &exit_program(&acc, &pids))?;
        let links = [
            attach("softirq_entry", &entry)?,
            attach("softirq_exit", &exit)?,
        ];
        let this = Self {
            acc,
            pids,
            cpus: possible_cpus()?,
            _links: links,
            _progs: [entry, exit],
        };
        this.add_process(std::process::id())?;
        Ok(this)
    }

    /// Counts softirq that interrupts process `pid` (any of its threads) as the run's own.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        let (key, value) = (pid, 1u8);
        let mut attr = [0u64; 16];
        attr[0] = self.pids.as_raw_fd() as u64;
        attr[1] = &raw const key as u64;
        attr[2] = &raw const value as u64;
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("BPF_MAP_UPDATE_ELEM")?;
        Ok(())
    }

    pub fn read(&self) -> Result<SoftirqTime> {
        let key = 0u32;
        let mut values = vec![0u64; self.cpus * VALUE / 8];
        let mut attr = [0u64; 16];
        attr[0] = self.acc.as_raw_fd() as u64;
        attr[1] = &raw const key as u64;
        attr[2] = values.as_mut_ptr() as u64;
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("BPF_MAP_LOOKUP_ELEM")?;
        let mut time = SoftirqTime::default();
        for cpu in values.chunks_exact(VALUE / 8) {
            time.idle += cpu[1];
            time.ours += cpu[2];
            time.other += cpu[3];
        }
        Ok(time)
    }
}
