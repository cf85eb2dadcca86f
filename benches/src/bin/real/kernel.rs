//! The kernel's own keepalive: `SO_KEEPALIVE` with the same idle, interval and count as
//! everyone else, plus `TCP_USER_TIMEOUT` at the same bound (as lull's kernel-probe mode sets
//! it), and an epoll loop that learns of deaths as socket errors.
//!
//! The kernel probes with empty ACKs that a peer's kernel answers by itself, so a hung
//! application is invisible to it; only a peer that vanished from the network is found.

use std::{
    io::Read,
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lull::clock::monotonic_ns;
use socket2::{SockRef, TcpKeepalive};

use crate::{
    proto::{Report, Role, Timing, Verdict},
    running::Running,
};

pub struct KernelRun {
    epoll: OwnedFd,
    timing: Timing,
    conns: Vec<(u64, TcpStream)>,
    done: Vec<bool>,
    report: Report,
    sink: Box<[u8]>,
}

impl KernelRun {
    pub fn new(timing: Timing, conns: usize) -> Result<Self> {
        // SAFETY: plain syscall; the fd is owned below.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        ensure!(
            raw >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        Ok(Self {
            // SAFETY: `raw` is a fresh fd that nothing else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(raw) },
            timing,
            conns: Vec::with_capacity(conns),
            done: Vec::with_capacity(conns),
            report: Report::default(),
            sink: vec![0u8; 4096].into_boxed_slice(),
        })
    }

    /// Reads and discards what the peer sent; `false` once the connection has ended.
    fn drain(&mut self, local: usize) -> bool {
        let mut stream = &self.conns[local].1;
        // Bounded: a busy peer sends a byte every idle/4, an answering one nothing at all.
        for _ in 0..64 {
            match stream.read(&mut self.sink) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    fn end(&mut self, local: usize) {
        if std::mem::replace(&mut self.done[local], true) {
            return;
        }
        let (global, stream) = &self.conns[local];
        let now = monotonic_ns();
        match stream.take_error() {
            // Keepalive (or the user timeout) gave up on the peer: the kernel's verdict.
            Ok(Some(e)) if e.raw_os_error() == Some(libc::ETIMEDOUT) => {
                self.report.dead.push(Verdict {
                    global: *global,
                    at: now,
                    tier: None,
                });
            }
            _ => self.report.closed += 1,
        }
        // SAFETY: both fds are open; DEL ignores the event pointer.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                stream.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
    }
}

impl Running for KernelRun {
    fn add(&mut self, global: u64, _role: Role, stream: TcpStream) -> Result<()> {
        let timing = self.timing;
        // Whole seconds, at least one, as the kernel takes them.
        let secs = |ms: u64| Duration::from_secs((ms / 1000).max(1));
        let keepalive = TcpKeepalive::new()
            .with_time(secs(timing.idle_ms))
            .with_interval(secs(timing.interval_ms))
            .with_retries(timing.count);
        let socket = SockRef::from(&stream);
        socket
            .set_tcp_keepalive(&keepalive)
            .context("setsockopt(SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT)")?;
        socket
            .set_tcp_user_timeout(Some(timing.bound()))
            .context("setsockopt(TCP_USER_TIMEOUT)")?;
        stream.set_nonblocking(true).context("setting O_NONBLOCK")?;
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: self.conns.len() as u64,
        };
        let fd = stream.as_raw_fd();
        // SAFETY: both fds are open; `ev` is a valid event the kernel copies.
        let rc =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        ensure!(
            rc == 0,
            "epoll_ctl(ADD): {}",
            std::io::Error::last_os_error()
        );
        self.conns.push((global, stream));
        self.done.push(false);
        Ok(())
    }

    fn poll(&mut self, wait: Duration) -> Result<()> {
        const BATCH: usize = 1024;
        // SAFETY: all-zero is a valid `epoll_event`.
        let mut events = [unsafe { std::mem::zeroed::<libc::epoll_event>() }; BATCH];
        // SAFETY: `events` has room for BATCH entries.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                BATCH as libc::c_int,
                wait.as_millis() as libc::c_int,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            ensure!(
                err.kind() == std::io::ErrorKind::Interrupted,
                "epoll_wait: {err}"
            );
            return Ok(());
        }
        for ev in &events[..n as usize] {
            let (bits, local) = (ev.events, ev.u64 as usize);
            if local >= self.conns.len() {
                continue;
            }
            let broken = bits & (libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLRDHUP) as u32 != 0;
            if broken || (bits & libc::EPOLLIN as u32 != 0 && !self.drain(local)) {
                self.end(local);
            }
        }
        Ok(())
    }

    fn probes(&self) -> Option<u64> {
        None
    }

    fn report(&self) -> Report {
        self.report.clone()
    }

    fn detail(&self) -> String {
        format!(
            "SO_KEEPALIVE, TCP_USER_TIMEOUT {} ms",
            self.timing.bound().as_millis()
        )
    }
}
