//! [`ProbeBatch`]: one turn's probes and drains, sent as one io_uring submission, and what the
//! engine does with each probe's result.
//!
//! # Ground rules
//!
//! - Every request in the ring points into memory the batch owns: a probe payload, kept
//!   unchanged for the engine's whole life, the drain buffer, which nothing reads, or a
//!   `sendmsg` header (with its address and iovec) in `messages`, which is neither moved nor
//!   changed until the batch completes.
//! - Every request completes within [`ProbeBatch::submit`] (they are all `MSG_DONTWAIT`):
//!   after it, the kernel refers to no buffer and no fd of the batch.
//! - A connection with a request in the batch keeps its slot `Busy` until the batch has
//!   completed (see the ground rules in `shared`); [`ProbeBatch::finish`] releases each slot
//!   once.

use std::{collections::HashMap, os::fd::RawFd};

use crate::{
    activity::SlotAllocator,
    probe::ring::{Completion, ProbeRing},
};

use super::{
    super::{
        CloseReason, ConnId,
        conn::{Arm, CompiledPolicy, ConnState},
        events::{bump, raise_to},
    },
    VIRTUAL_FD, Worker, release,
};

/// One `sendmsg` request: a datagram to one peer of an unconnected UDP socket. The header
/// points at the address and the iovec next to it, and the iovec at a probe payload.
#[repr(C)]
struct PeerMessage {
    header: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
}

/// The batch's `sendmsg` requests, in memory that stays put until the batch completes: the
/// capacity is reserved once, and nothing is pushed past it.
struct PeerMessages {
    messages: Vec<PeerMessage>,
    capacity: usize,
}

// SAFETY: the raw pointers inside point only into this same allocation (the address and the
// iovec of each message) and into probe payloads the batch owns for the engine's life; the
// batch moves to the engine thread once and is used only there.
unsafe impl Send for PeerMessages {}

impl PeerMessages {
    fn new(capacity: usize) -> Self {
        Self {
            messages: Vec::new(),
            capacity,
        }
    }

    /// A header for `bytes` to `dest`, stable until [`clear`](Self::clear); `None` when the
    /// batch already holds as many as it may.
    fn push(&mut self, dest: &socket2::SockAddr, bytes: &[u8]) -> Option<*const libc::msghdr> {
        if self.messages.len() >= self.capacity {
            return None;
        }
        // Reserved once, in full: a push never reallocates, so earlier headers stay put.
        if self.messages.capacity() < self.capacity {
            self.messages.reserve_exact(self.capacity);
        }
        // SAFETY: all-zero is a valid msghdr, iovec and sockaddr_storage (null pointers, zero
        // lengths, AF_UNSPEC).
        self.messages.push(unsafe { std::mem::zeroed() });
        let message = self.messages.last_mut()?;
        let len = dest.len() as usize;
        // SAFETY: `dest` holds `len` valid bytes of address, and `len` is at most the size of
        // a sockaddr_storage, which `message.addr` is; the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                dest.as_ptr().cast::<u8>(),
                (&raw mut message.addr).cast::<u8>(),
                len.min(size_of::<libc::sockaddr_storage>()),
            );
        }
        message.iov = libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        message.header.msg_name = (&raw mut message.addr).cast();
        message.header.msg_namelen = dest.len();
        message.header.msg_iov = &raw mut message.iov;
        message.header.msg_iovlen = 1;
        Some(&raw const message.header)
    }

    /// Forgets every message: only once no request refers to them.
    fn clear(&mut self) {
        self.messages.clear();
    }
}

/// Bytes read per drain: a drained connection is read once per timer expiry.
const DRAIN_BYTES: usize = 64 * 1024;

/// A request in the current batch.
struct Inflight {
    local: u32,
    op: Op,
}

enum Op {
    /// A probe of `len` bytes; `undo` is the state before it was decided, restored if it does
    /// not go out.
    Probe { undo: ConnState, len: u32 },
    /// Reading (and discarding) whatever the peer sent.
    Drain,
}

/// What became of one probe of a batch.
pub(super) struct ProbeResult {
    pub(super) local: usize,
    /// The connection's state before the probe was decided.
    pub(super) undo: ConnState,
    /// Bytes the probe had to write (0 for a simulated connection's no-op).
    pub(super) len: u32,
    /// The kernel's result: bytes written, or `-errno`.
    pub(super) result: i32,
}

/// The ring, the payloads its probes are sent from, and the requests of the batch being built.
pub(super) struct ProbeBatch {
    ring: ProbeRing,
    /// Probe payloads by id, each stored once; never changed or dropped (requests point in).
    payloads: Vec<Box<[u8]>>,
    payload_ids: HashMap<Box<[u8]>, u16>,
    inflight: Vec<Inflight>,
    /// Slots held `Busy` until the current batch completes, each once.
    held: Vec<u32>,
    completions: Vec<Completion>,
    /// Handed out by `submit` and given back by `finish`, to keep its allocation.
    results: Vec<ProbeResult>,
    /// Where drained bytes go. Nothing ever reads it, so concurrent kernel writes into it are
    /// harmless.
    drain_buf: Box<[u8]>,
    /// The batch's datagrams to peers of unconnected sockets.
    messages: PeerMessages,
    max_per_tick: u32,
    /// The tick being counted, and the probes queued in it so far.
    this_tick: (u64, u32),
}

impl ProbeBatch {
    pub(super) fn new(ring: ProbeRing, max_per_tick: u32) -> Self {
        Self {
            ring,
            payloads: Vec::new(),
            payload_ids: HashMap::new(),
            inflight: Vec::new(),
            held: Vec::new(),
            completions: Vec::new(),
            results: Vec::new(),
            drain_buf: vec![0; DRAIN_BYTES].into_boxed_slice(),
            messages: PeerMessages::new(max_per_tick as usize),
            max_per_tick,
            this_tick: (0, 0),
        }
    }

    /// The id of `bytes` as a payload, storing it if it is new.
    pub(super) fn intern_payload(&mut self, bytes: &[u8]) -> u16 {
        if let Some(&id) = self.payload_ids.get(bytes) {
            return id;
        }
        let id = self.payloads.len() as u16;
        let bytes: Box<[u8]> = bytes.into();
        self.payload_ids.insert(bytes.clone(), id);
        self.payloads.push(bytes);
        id
    }

    /// Starts counting probes against `tick`'s budget, unless they already are.
    pub(super) fn start_tick(&mut self, tick: u64) {
        if self.this_tick.0 != tick {
            self.this_tick = (tick, 0);
        }
    }

    /// How many more expiries this batch can take: each queues at most one probe and one
    /// drain, so this many cannot overrun the tick's budget or the ring.
    pub(super) fn room(&self) -> usize {
        (self.max_per_tick - self.this_tick.1).min(self.ring.room() / 2) as usize
    }

    /// Whether this tick may still send probes.
    pub(super) fn tick_budget_left(&self) -> bool {
        self.this_tick.1 < self.max_per_tick
    }

    /// Queues the probe `payload` (or its unsent rest, after `conn.resume` bytes) for the
    /// connection `local`: a `SEND` on its socket, or a `SENDMSG` to `dest` for a peer of an
    /// unconnected UDP socket. Returns false if nothing was queued, in which case the caller
    /// still holds the slot and must release it.
    pub(super) fn push_probe(
        &mut self,
        local: usize,
        conn: &ConnState,
        payload: u16,
        undo: ConnState,
        dest: Option<&socket2::SockAddr>,
    ) -> bool {
        let Some(bytes) = self.payloads.get(payload as usize) else {
            return false;
        };
        let offset = usize::from(conn.resume).min(bytes.len());
        let rest = &bytes[offset..];
        let tag = self.inflight.len() as u64;
        let queued = if conn.fd == VIRTUAL_FD {
            self.ring.push_nop(tag)
        } else if let Some(dest) = dest {
            match self.messages.push(dest, rest) {
                // SAFETY: the header, its address and iovec stay in `messages` unchanged until
                // `submit` has returned (they are cleared after it), and the iovec points into a
                // payload, which never changes; the request completes within `submit`.
                Some(message) => unsafe { self.ring.push_sendmsg(conn.fd, message, tag) },
                None => false,
            }
        } else {
            // SAFETY: `rest` is part of a payload, which stays in `self.payloads` unchanged for
            // the engine's whole life; the request completes within `submit`.
            unsafe {
                self.ring
                    .push_send(conn.fd, rest.as_ptr(), rest.len() as u32, tag)
            }
        };
        if queued {
            // A no-op "sends" nothing and completes with 0, which must read as a whole probe.
            let len = if conn.fd == VIRTUAL_FD {
                0
            } else {
                rest.len() as u32
            };
            self.inflight.push(Inflight {
                local: local as u32,
                op: Op::Probe { undo, len },
            });
            self.this_tick.1 += 1;
        }
        queued
    }

    /// Queues a read that discards what the peer sent (policies with `drain`).
    pub(super) fn push_drain(&mut self, local: usize, fd: RawFd) -> bool {
        let tag = self.inflight.len() as u64;
        // SAFETY: `drain_buf` lives as long as the batch and nothing reads it, so the kernel may
        // write it at any time; the request completes within `submit`.
        let queued = unsafe {
            self.ring
                .push_recv(fd, self.drain_buf.as_mut_ptr(), DRAIN_BYTES as u32, tag)
        };
        if queued {
            self.inflight.push(Inflight {
                local: local as u32,
                op: Op::Drain,
            });
        }
        queued
    }

    /// Keeps `local`'s slot `Busy` until [`finish`](Self::finish).
    pub(super) fn hold(&mut self, local: usize) {
        self.held.push(local as u32);
    }

    /// Whether nothing was queued since the last `finish`.
    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Probes queued in this tick so far.
    pub(super) fn sent_this_tick(&self) -> u32 {
        self.this_tick.1
    }

    /// Submits the batch and waits for every request. Returns each probe's result, in
    /// completion order (drains are left out: what they read does not matter, and an error
    /// shows up again at the next probe); give the list back with [`finish`](Self::finish).
    pub(super) fn submit(&mut self) -> Vec<ProbeResult> {
        self.completions.clear();
        if let Err(err) = self.ring.submit(&mut self.completions) {
            // Nothing is known to have gone out: undo every probe of the batch.
            tracing::error!("io_uring submission failed: {err}");
            self.completions = (0..self.inflight.len() as u64)
                .map(|tag| Completion {
                    tag,
                    result: -libc::EAGAIN,
                })
                .collect();
        }
        let mut results = std::mem::take(&mut self.results);
        results.extend(self.completions.iter().filter_map(|done| {
            let inflight = self.inflight.get(done.tag as usize)?;
            match inflight.op {
                Op::Probe { undo, len } => Some(ProbeResult {
                    local: inflight.local as usize,
                    undo,
                    len,
                    result: done.result,
                }),
                Op::Drain => None,
            }
        }));
        self.inflight.clear();
        // Every request has completed: nothing refers to the headers any more.
        self.messages.clear();
        results
    }

    /// Ends the batch: takes back the list `submit` gave out, and releases every held slot.
    pub(super) fn finish(&mut self, mut results: Vec<ProbeResult>, slots: &SlotAllocator) {
        results.clear();
        self.results = results;
        for local in self.held.drain(..) {
            if let Some(slot) = slots.slot_at(local) {
                release(slots, slot);
            }
        }
    }
}

impl Worker {
    /// Submits the batch, applies each probe's result, and releases every slot in it.
    pub(super) fn flush(&mut self, now: u64) {
        if self.batch.is_empty() {
            return;
        }
        // Once per batch rather than per probe: the tick's count only grows until the next tick.
        raise_to(
            &self.shared.counters.max_probes_per_tick,
            u64::from(self.batch.sent_this_tick()),
        );
        let results = self.batch.submit();
        for result in &results {
            self.complete(result, now);
        }
        self.batch.finish(results, &self.shared.slots);
    }

    fn complete(&mut self, done: &ProbeResult, now: u64) {
        let (local, undo) = (done.local, done.undo);
        let policy = self.policies[self.conns[local].policy as usize];
        let datagram = policy.flow.is_datagram();
        if datagram && done.result < 0 && done.result != -libc::EAGAIN {
            self.datagram_failed(local, undo, &policy, -done.result, now);
            return;
        }
        match done.result {
            // A datagram goes out whole or not at all.
            n if n >= 0 && (n as u32 >= done.len || datagram) => {
                self.conns[local].resume = 0;
                // A finished rest completes a probe that was counted as not sent.
                if undo.resume == 0 {
                    self.count_sent(local, &policy);
                }
                if self.conns[local].fd == VIRTUAL_FD
                    && let Some(slot) = self.shared.slots.slot_at(local as u32)
                {
                    self.source.probe_sent(slot, now);
                }
            }
            n if n > 0 => {
                // Short write: the send buffer is not empty, so the connection is not idle.
                // The rest goes out at the next tick; the probe does not count.
                let written = self.conns[local].resume as u32 + n as u32;
                self.restore(local, undo);
                self.conns[local].resume = written.min(u32::from(u8::MAX)) as u8;
                bump(&self.shared.counters.probes_deferred);
                self.rearm(local, Arm::exact(now + self.placement.tick_ns()));
            }
            e if e == -libc::EAGAIN || e == -libc::EWOULDBLOCK || e == 0 => {
                // A full send buffer: not idle. Try again an interval later, uncounted.
                self.restore(local, undo);
                bump(&self.shared.counters.probes_deferred);
                self.rearm(local, Arm::exact(now + policy.interval_ns));
            }
            e if [
                libc::EPIPE,
                libc::ECONNRESET,
                libc::ENOTCONN,
                libc::EBADF,
                libc::ETIMEDOUT,
                libc::EHOSTUNREACH,
                libc::ENETUNREACH,
            ]
            .contains(&-e) =>
            {
                if let Some(slot) = self.shared.slots.slot_at(local as u32) {
                    self.close(local, ConnId::from_slot(slot), CloseReason::SendFailed(-e));
                }
            }
            e => {
                tracing::debug!(
                    "probe send failed: {}",
                    std::io::Error::from_raw_os_error(-e)
                );
                self.restore(local, undo);
                self.rearm(local, Arm::exact(now + policy.interval_ns));
            }
        }
    }

    /// What a datagram probe that failed with `errno` means. UDP has no connection to lose: a
    /// failure is a fact about the path or the peer, never a close.
    fn datagram_failed(
        &mut self,
        local: usize,
        undo: ConnState,
        policy: &CompiledPolicy,
        errno: i32,
        now: u64,
    ) {
        if errno == libc::ECONNREFUSED {
            // A connected socket reports an earlier datagram's ICMP "port unreachable" at its
            // next send instead of sending. That clears it: the probe goes out at the next
            // tick, uncounted.
            self.restore(local, undo);
            bump(&self.shared.counters.probes_deferred);
            self.rearm(local, Arm::exact(now + self.placement.tick_ns()));
            return;
        }
        // No route, filtered, and the like: to the peer it is a probe that never arrived, so
        // it counts, and detect-dead reaches its verdict unless something answers.
        tracing::debug!(
            "datagram probe not sent: {}",
            std::io::Error::from_raw_os_error(errno)
        );
        self.count_sent(local, policy);
    }

    /// Puts a connection back as it was before a probe that did not go out.
    fn restore(&mut self, local: usize, undo: ConnState) {
        let c = &mut self.conns[local];
        let from = c.phase();
        let timer = c.timer;
        let resume = c.resume;
        *c = undo;
        c.timer = timer;
        c.resume = resume;
        self.gauge(from, undo.phase());
    }
}
