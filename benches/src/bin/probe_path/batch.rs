//! One batch of probes by each strategy, over the connections the [`Sender`] holds, and the
//! [`Sample`] the batches add to: the only code the measurements time and callgrind counts.

use std::{
    io,
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd, RawFd},
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;

use crate::ring::{Completion, FLAGS, Ring, nanos};

/// A probe, as lull's Redis probe: every strategy sends it from this one static buffer.
pub static PAYLOAD: [u8; 6] = *b"PING\r\n";
/// Loopback connections the probes go to, round robin.
pub const PAIRS: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Strategy {
    Uring,
    Send,
    Sendmmsg,
}

pub const STRATEGIES: [Strategy; 3] = [Strategy::Uring, Strategy::Send, Strategy::Sendmmsg];

impl Strategy {
    pub fn label(self) -> &'static str {
        ["io_uring SEND batch", "send(2) loop", "sendmmsg 1/socket"][self as usize]
    }
}

#[derive(Clone, Copy, Default)]
pub struct Sample {
    pub probes: u64,
    /// CLOCK_THREAD_CPUTIME_ID over the measured cycles only.
    pub cpu_ns: u64,
    /// getrusage over the sending thread's life, hand-offs to the drain thread included.
    pub user_ns: u64,
    pub sys_ns: u64,
    /// Sends that returned `EAGAIN` (a full send buffer), and the first other error.
    pub eagain: u64,
    pub error: Option<i32>,
    /// Timed cells: the median batch's wall time outside the kernel (robust to the odd
    /// preemption landing in a user-mode stretch), and the batch size.
    pub batch_user_ns: f64,
    pub b: u64,
}

impl Sample {
    pub fn add(&mut self, result: isize) {
        match result {
            6 => {}
            r if r == -(libc::EAGAIN as isize) => self.eagain += 1,
            r => _ = self.error.get_or_insert(r as i32),
        }
    }

    pub fn per_probe(&self, ns: u64) -> f64 {
        ns as f64 / self.probes as f64
    }
}

/// Wall time in io_uring_enter during the current batch, for the timed cells.
#[derive(Default)]
pub struct Phases {
    pub enter_ns: u64,
    /// Each timed batch's wall time outside the kernel.
    pub user_ns: Vec<u64>,
}

/// Our ends of the connections, visited round robin across batches, and the ring.
pub struct Sender {
    pub ring: Ring,
    pub completions: Vec<Completion>,
    pub fds: Vec<RawFd>,
    pub cursor: usize,
    pub phases: Phases,
}

impl Sender {
    fn next_fd(&mut self) -> RawFd {
        let fd = self.fds[self.cursor];
        self.cursor = (self.cursor + 1) % self.fds.len();
        fd
    }
}

/// One batch as the engine sends it; `TIMED` adds the clock reads of the timed cells.
fn uring_batch<const TIMED: bool>(s: &mut Sender, b: usize, out: &mut Sample) -> Result<()> {
    let start = TIMED.then(Instant::now);
    for tag in 0..b as u64 {
        let fd = s.next_fd();
        let (room, buf, len) = (s.ring.room(), PAYLOAD.as_ptr(), PAYLOAD.len() as u32);
        // SAFETY: PAYLOAD is a static that nothing modifies.
        let pushed = room > 0 && unsafe { s.ring.push_send(fd, buf, len, tag) };
        ensure!(pushed, "the ring is full before {b} entries");
    }
    s.completions.clear();
    s.phases.enter_ns = 0;
    let submitted = s
        .ring
        .submit::<TIMED>(&mut s.completions, &mut s.phases.enter_ns);
    submitted.context("io_uring_enter")?;
    for c in &s.completions {
        out.add(c.result as isize);
    }
    if let Some(t) = start {
        s.phases.user_ns.push(nanos(t) - s.phases.enter_ns);
    }
    Ok(())
}

fn errno_result(n: isize) -> isize {
    if n >= 0 {
        return n;
    }
    -(io::Error::last_os_error().raw_os_error().unwrap_or(0) as isize)
}

fn send_batch(s: &mut Sender, b: usize, out: &mut Sample) {
    for _ in 0..b {
        let fd = s.next_fd();
        // SAFETY: PAYLOAD is valid for its length; send only reads it.
        let n = unsafe { libc::send(fd, PAYLOAD.as_ptr().cast(), PAYLOAD.len(), FLAGS) };
        out.add(errno_result(n));
    }
}

fn sendmmsg_batch(s: &mut Sender, b: usize, out: &mut Sample) {
    let (base, len) = (PAYLOAD.as_ptr().cast_mut().cast(), PAYLOAD.len());
    let mut iov = libc::iovec {
        iov_base: base,
        iov_len: len,
    };
    // SAFETY: mmsghdr is plain data for which all zeroes is an empty message.
    let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
    (msg.msg_hdr.msg_iov, msg.msg_hdr.msg_iovlen) = (&mut iov, 1);
    for _ in 0..b {
        let fd = s.next_fd();
        // SAFETY: `msg` and `iov` outlive the call; the kernel reads the payload through them
        // and writes only `msg.msg_len`.
        let n = unsafe { libc::sendmmsg(fd, &mut msg, 1, FLAGS) };
        out.add(if n == 1 {
            msg.msg_len as isize
        } else {
            errno_result(n as isize)
        });
    }
}

/// A strategy, and for io_uring whether its user-mode phases are timed.
pub type Cell = (Strategy, bool);

pub fn run_batches(c: Cell, s: &mut Sender, b: usize, n: usize, t: &mut Sample) -> Result<()> {
    for _ in 0..n {
        match c {
            (Strategy::Uring, true) => uring_batch::<true>(s, b, t)?,
            (Strategy::Uring, false) => uring_batch::<false>(s, b, t)?,
            (Strategy::Send, _) => send_batch(s, b, t),
            (Strategy::Sendmmsg, _) => sendmmsg_batch(s, b, t),
        }
    }
    Ok(())
}

/// The only code that callgrind counts (`--toggle-collect`) and the CPU clock times.
#[inline(never)]
pub fn measured_cycle(c: Cell, s: &mut Sender, b: usize, n: usize, t: &mut Sample) -> Result<()> {
    run_batches(c, s, b, n, t)
}

/// Reads everything the peers hold, without blocking. Returns the bytes read.
pub fn drain(peers: &[RawFd], buf: &mut [u8]) -> Result<u64> {
    let mut total = 0;
    for &fd in peers {
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), FLAGS) };
            match errno_result(n) {
                0 => bail!("a peer connection closed"),
                n if n > 0 => total += n as u64,
                e if e == -(libc::EAGAIN as isize) => break,
                e if e == -(libc::EINTR as isize) => {}
                e => bail!("recv: {}", io::Error::from_raw_os_error(-e as i32)),
            }
        }
    }
    Ok(total)
}

/// `PAIRS` loopback connections, TCP_NODELAY on both ends, and a sender over our ends.
pub fn connect() -> Result<(Vec<(TcpStream, TcpStream)>, Sender)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    let pair = || -> Result<(TcpStream, TcpStream)> {
        let (ours, (peer, _)) = (TcpStream::connect(addr)?, listener.accept()?);
        ours.set_nodelay(true)?;
        peer.set_nodelay(true)?;
        Ok((ours, peer))
    };
    let pairs = (0..PAIRS).map(|_| pair()).collect::<Result<Vec<_>>>();
    let pairs = pairs.context("opening 1024 loopback connections (2048 fds: see `ulimit -n`)")?;
    let sender = Sender {
        ring: Ring::new(PAIRS as u32).context("io_uring unavailable")?,
        completions: Vec::with_capacity(2 * PAIRS),
        fds: pairs.iter().map(|(o, _)| o.as_raw_fd()).collect(),
        cursor: 0,
        phases: Phases::default(),
    };
    Ok((pairs, sender))
}
