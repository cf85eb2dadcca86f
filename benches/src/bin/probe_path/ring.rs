//! [`Ring`]: the engine's `ProbeRing`, copied, because it is private to the engine. The copy
//! keeps what probes use (`SEND`s from a static payload, one `submit_and_wait` per batch) and
//! nothing else, so that a batch here costs what a tick's batch costs there.

use std::{io, os::fd::RawFd, time::Instant};

use io_uring::{IoUring, opcode, types};

/// How every probe is sent, by every strategy: as the engine sends it.
pub const FLAGS: libc::c_int = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;

/// What the engine's `probe::ring::Completion` holds.
pub struct Completion {
    #[allow(dead_code)] // Written, as the engine writes it, so that the copy costs the same.
    tag: u64,
    pub result: i32,
}

/// The engine's `ProbeRing`, minus what probes do not use.
pub struct Ring {
    ring: IoUring,
    queued: u32,
}

impl Ring {
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2).max(2))
            .build(entries.max(1))?;
        Ok(Self { ring, queued: 0 })
    }

    pub fn room(&self) -> u32 {
        self.ring.params().sq_entries() - self.queued
    }

    /// # Safety
    /// `buf..buf + len` must stay valid until [`Ring::submit`] returns.
    pub unsafe fn push_send(&mut self, fd: RawFd, buf: *const u8, len: u32, tag: u64) -> bool {
        let sqe = opcode::Send::new(types::Fd(fd), buf, len)
            .flags(FLAGS)
            .build()
            .user_data(tag);
        // SAFETY: the entry refers only to memory the caller keeps valid until `submit`.
        let pushed = unsafe { self.ring.submission().push(&sqe) }.is_ok();
        if pushed {
            self.queued += 1;
        }
        pushed
    }

    /// As the engine's, plus clock reads around the kernel entry when `TIMED`.
    pub fn submit<const TIMED: bool>(
        &mut self,
        out: &mut Vec<Completion>,
        p: &mut u64,
    ) -> io::Result<()> {
        let want = self.queued as usize;
        if want == 0 {
            return Ok(());
        }
        let mut got = 0;
        loop {
            let entered = TIMED.then(Instant::now);
            let result = self.ring.submit_and_wait(want - got);
            if let Some(t) = entered {
                *p += nanos(t);
            }
            match result {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                let (tag, result) = (cqe.user_data(), cqe.result());
                out.push(Completion { tag, result });
                got += 1;
            }
            if got >= want {
                break;
            }
        }
        self.queued = 0;
        Ok(())
    }
}

/// Nanoseconds since `since`.
pub fn nanos(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}
