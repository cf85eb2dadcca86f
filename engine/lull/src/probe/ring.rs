//! [`ProbeRing`]: the engine thread's io_uring, through which a tick's probes go out in one
//! submission.
//!
//! This uses the `io-uring` crate directly rather than tokio-uring: tokio-uring owns its
//! sockets and buffers (each operation takes them by value and is driven as its own future),
//! while a probe is a `SEND` on a socket the *application* owns, from a buffer shared by every
//! probe of the tick, and the whole point is to push hundreds of them and enter the kernel
//! once. That is exactly the raw submission-queue interface.

use std::{io, os::fd::RawFd};

use io_uring::{IoUring, opcode, types};

/// One finished operation: the caller's tag and the kernel's result (bytes, or `-errno`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    pub(crate) tag: u64,
    pub(crate) result: i32,
}

/// A submission/completion ring sized for one tick's probes.
pub(crate) struct ProbeRing {
    ring: IoUring,
    queued: u32,
    entries: u32,
}

impl ProbeRing {
    /// A ring with room for `entries` operations per submission.
    pub(crate) fn new(entries: u32) -> io::Result<Self> {
        Ok(Self {
            ring: Self::build(entries)?,
            queued: 0,
            entries,
        })
    }

    fn build(entries: u32) -> io::Result<IoUring> {
        IoUring::builder()
            // Completions are read right after each submission; twice the room means a full
            // batch never overflows even if a few completions are left from the last one.
            .setup_cqsize(entries.saturating_mul(2).max(2))
            .build(entries.max(1))
    }

    /// Room left in this batch.
    pub(crate) fn room(&self) -> u32 {
        self.ring.params().sq_entries() - self.queued
    }

    /// Queues a `SEND` of `len` bytes at `buf` on `fd`.
    ///
    /// `MSG_DONTWAIT` makes a full send buffer complete at once with `-EAGAIN` instead of
    /// parking the request in the kernel: a probe that cannot go out now is not wanted later,
    /// and every request completing within `submit` is what lets a dropping handle know that
    /// no write to its fd is still pending. `MSG_NOSIGNAL` turns a broken pipe into `-EPIPE`
    /// instead of SIGPIPE.
    ///
    /// # Safety
    ///
    /// `buf..buf + len` must stay valid and unchanged until [`ProbeRing::submit`] returns.
    pub(crate) unsafe fn push_send(
        &mut self,
        fd: RawFd,
        buf: *const u8,
        len: u32,
        tag: u64,
    ) -> bool {
        let sqe = opcode::Send::new(types::Fd(fd), buf, len)
            .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
            .build()
            .user_data(tag);
        self.push(&sqe)
    }

    /// Queues a `SENDMSG` of `msg` on `fd`, with the flags and for the reasons of
    /// [`ProbeRing::push_send`]: a datagram to the address in `msg.msg_name`, for a socket
    /// that is not connected (one per-peer flow among several on the socket).
    ///
    /// # Safety
    ///
    /// `msg`, and the address and buffers it points to, must stay valid and unchanged until
    /// [`ProbeRing::submit`] returns.
    pub(crate) unsafe fn push_sendmsg(
        &mut self,
        fd: RawFd,
        msg: *const libc::msghdr,
        tag: u64,
    ) -> bool {
        let sqe = opcode::SendMsg::new(types::Fd(fd), msg)
            .flags(libc::MSG_NOSIGNAL as u32 | libc::MSG_DONTWAIT as u32)
            .build()
            .user_data(tag);
        self.push(&sqe)
    }

    /// Queues a `RECV` of up to `len` bytes into `buf`, `MSG_DONTWAIT` for the same reason as
    /// [`ProbeRing::push_send`]: it completes within `submit`, with `-EAGAIN` if nothing waits.
    ///
    /// # Safety
    ///
    /// `buf..buf + len` must stay valid for writes until [`ProbeRing::submit`] returns.
    pub(crate) unsafe fn push_recv(&mut self, fd: RawFd, buf: *mut u8, len: u32, tag: u64) -> bool {
        let sqe = opcode::Recv::new(types::Fd(fd), buf, len)
            .flags(libc::MSG_DONTWAIT)
            .build()
            .user_data(tag);
        self.push(&sqe)
    }

    /// Queues a no-op that completes with 0; the simulated sink uses it so benchmarks pay for
    /// the same submission and completion path as real probes.
    pub(crate) fn push_nop(&mut self, tag: u64) -> bool {
        let sqe = opcode::Nop::new().build().user_data(tag);
        self.push(&sqe)
    }

    fn push(&mut self, sqe: &io_uring::squeue::Entry) -> bool {
        // SAFETY: the entry refers to no memory beyond what the caller of `push_send`,
        // `push_sendmsg` or `push_recv` guaranteed, and a Nop refers to none.
        let pushed = unsafe { self.ring.submission().push(sqe) }.is_ok();
        if pushed {
            self.queued += 1;
        }
        pushed
    }

    /// Submits everything queued with one `io_uring_enter`, waits until every request has
    /// completed, and appends the completions to `out`.
    pub(crate) fn submit(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        let want = self.queued as usize;
        if want == 0 {
            return Ok(());
        }
        let mut got = 0;
        loop {
            match self.ring.submit_and_wait(want - got) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    self.discard();
                    return Err(e);
                }
            }
            for cqe in self.ring.completion() {
                out.push(Completion {
                    tag: cqe.user_data(),
                    result: cqe.result(),
                });
                got += 1;
            }
            if got >= want {
                break;
            }
        }
        self.queued = 0;
        Ok(())
    }

    /// Forgets a batch whose submission failed. Its entries may still sit in the submission
    /// queue, or be in flight, and would otherwise complete under the next batch's tags; a
    /// fresh ring drops them (closing the old one never issues what it had not consumed, and
    /// what was issued already holds its own file reference, not the fd number).
    fn discard(&mut self) {
        self.queued = 0;
        match Self::build(self.entries) {
            Ok(ring) => self.ring = ring,
            Err(err) => {
                // The old ring stays, and its leftovers may complete under later tags: this
                // needs the kernel to refuse a new ring, that is, to be out of memory.
                tracing::error!(
                    "io_uring: cannot replace the ring after a failed submission: {err}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read,
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd,
    };

    use super::*;

    #[test]
    fn one_submission_sends_to_every_socket_and_reports_each_result() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut pairs = Vec::new();
        for _ in 0..8 {
            let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (peer, _) = listener.accept().unwrap();
            pairs.push((ours, peer));
        }
        let payload: &'static [u8] = b"PING\r\n";
        let mut ring = ProbeRing::new(16).unwrap();
        for (i, (ours, _)) in pairs.iter().enumerate() {
            // SAFETY: `payload` is static.
            assert!(unsafe {
                ring.push_send(
                    ours.as_raw_fd(),
                    payload.as_ptr(),
                    payload.len() as u32,
                    i as u64,
                )
            });
        }
        // A socket whose peer is gone: the send fails with an error, never SIGPIPE.
        let (dead, dead_peer) = {
            let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (peer, _) = listener.accept().unwrap();
            (ours, peer)
        };
        drop(dead_peer);
        dead.shutdown(std::net::Shutdown::Write).unwrap();
        // SAFETY: `payload` is static.
        assert!(unsafe { ring.push_send(dead.as_raw_fd(), payload.as_ptr(), 6, 99) });
        assert_eq!(ring.room(), 16 - 9);
        let mut done = Vec::new();
        ring.submit(&mut done).unwrap();
        assert_eq!(done.len(), 9);
        assert_eq!(ring.room(), 16);
        for c in &done {
            if c.tag == 99 {
                assert_eq!(c.result, -libc::EPIPE);
            } else {
                assert_eq!(c.result, 6, "tag {}", c.tag);
            }
        }
        for (_, peer) in &mut pairs {
            let mut buf = [0; 6];
            peer.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, payload);
        }
    }
}
