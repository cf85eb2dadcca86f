//! Loopback peers with a known behaviour.
//!
//! [`serve`] treats one accepted connection as its [`Behaviour`] says, on a tokio-uring
//! runtime. The demo's peer processes, the real-socket benchmark's peers and the tests'
//! [`PeerServer`] all use it, so "an answering peer" or "a hung peer" means the same thing
//! everywhere lull is measured.

mod server;

use std::{
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_uring::net::TcpStream;

pub use server::{ConnLog, PeerServer};

/// The reply of every answering behaviour that does not name its own: a Redis `PONG`.
pub const PONG: &[u8] = b"+PONG\r\n";

/// What a peer does with each connection it accepts.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Reads, and answers every read with these bytes: a healthy peer.
    Answer(&'static [u8]),
    /// Answers with [`PONG`] until `trigger`, then never reads or writes again and keeps the
    /// socket open: an application that hung while its kernel still ACKs. The first read after
    /// the trigger goes unanswered.
    Hang {
        /// When it hangs.
        trigger: HangTrigger,
    },
    /// Never reads, never writes, keeps the socket open: hung from the start.
    Silent,
    /// Writes one byte every `every` (a busy connection), and answers reads with [`PONG`].
    Busy {
        /// Time between writes.
        every: Duration,
    },
    /// Answers with [`PONG`] for `after`, then closes: with a FIN, or with a RST when `reset`.
    Close {
        /// Time from accept to close.
        after: Duration,
        /// Abort with a RST (`SO_LINGER` 0) instead of a FIN.
        reset: bool,
    },
    /// Reads, never answers.
    Count,
}

/// When a [`Behaviour::Hang`] peer stops answering.
#[derive(Clone, Debug)]
pub enum HangTrigger {
    /// This long after the connection was accepted.
    AfterAccept(Duration),
    /// At a `CLOCK_MONOTONIC` instant in ns, shared by every connection and settable later;
    /// `u64::MAX` means not yet.
    At(Arc<AtomicU64>),
}

impl HangTrigger {
    fn reached(&self, accepted: Instant) -> bool {
        match self {
            Self::AfterAccept(after) => accepted.elapsed() >= *after,
            Self::At(at) => lull::clock::monotonic_ns() >= at.load(Ordering::Relaxed),
        }
    }
}

/// Treats `stream` as `behaviour` says until the connection ends (or forever, for the hung
/// behaviours). `on_read` is called with the size of every read.
pub async fn serve(stream: TcpStream, behaviour: Behaviour, on_read: impl Fn(usize)) {
    let accepted = Instant::now();
    match behaviour {
        Behaviour::Answer(reply) => answer(&stream, Some(reply), &on_read, || false).await,
        Behaviour::Count => answer(&stream, None, &on_read, || false).await,
        Behaviour::Silent => std::future::pending().await,
        Behaviour::Hang { trigger } => {
            answer(&stream, Some(PONG), &on_read, || trigger.reached(accepted)).await;
        }
        Behaviour::Busy { every } => {
            let stream = Rc::new(stream);
            let writer = stream.clone();
            tokio::select! {
                () = answer(&stream, Some(PONG), &on_read, || false) => {}
                // Ends when a write fails, i.e. with the connection.
                () = async move {
                    loop {
                        tokio::time::sleep(every).await;
                        if writer.write_all(b"b".to_vec()).await.0.is_err() {
                            return;
                        }
                    }
                } => {}
            }
        }
        Behaviour::Close { after, reset } => {
            tokio::select! {
                () = answer(&stream, Some(PONG), &on_read, || false) => return,
                () = tokio::time::sleep(after) => {}
            }
            if reset {
                // A peer that cannot abort still closes, with a FIN: the test then sees the
                // wrong close reason, which is a visible failure, not a silent one.
                let _ = crate::socket::set_linger_zero(&stream);
            }
            // The read the select dropped is still in flight in the ring, holding the fd: the
            // socket would only close (and its FIN or RST go out) once the next probe arrived.
            // Shutting the read side down ends that read now, and with it the last hold.
            let _ = stream.shutdown(std::net::Shutdown::Read);
        }
    }
}

/// Answers every read with `reply` (or just reads, with none) until the connection ends. Once
/// `hung()` holds at a read, that read goes unanswered and the socket is left open and
/// untouched for good.
async fn answer(
    stream: &TcpStream,
    reply: Option<&'static [u8]>,
    on_read: &impl Fn(usize),
    hung: impl Fn() -> bool,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (res, b) = stream.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => return,
            Ok(n) => on_read(n),
        }
        if hung() {
            std::future::pending::<()>().await;
        }
        if let Some(reply) = reply
            && stream.write_all(reply.to_vec()).await.0.is_err()
        {
            return;
        }
    }
}
