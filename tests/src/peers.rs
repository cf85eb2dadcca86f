//! Loopback peers with known behaviour, served by a tokio-uring runtime on their own thread.
//!
//! Each [`PeerServer`] accepts connections on `127.0.0.1` and treats every one the same way
//! ([`Behaviour`]); it logs what it read per connection, keyed by the client's port, so a test
//! can see exactly which probes arrived and when.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    rc::Rc,
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// What a peer does with each connection it accepts.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Reads, and answers every read with these bytes (an answering, healthy peer).
    Answer(&'static [u8]),
    /// Never reads, never writes, keeps the socket open: a hung application. Its kernel still
    /// ACKs.
    Silent,
    /// Writes one byte every `every` (a busy connection) and discards what it reads.
    Busy {
        /// Time between writes.
        every: Duration,
    },
    /// Closes after `after`: with a FIN, or with a RST when `reset`.
    Close {
        /// Time from accept to close.
        after: Duration,
        /// Abort with RST (`SO_LINGER` 0) instead of a FIN.
        reset: bool,
    },
    /// Reads and logs, never answers.
    Count,
}

/// What a peer saw on one connection.
#[derive(Clone, Debug)]
pub struct ConnLog {
    /// When the connection was accepted.
    pub accepted: Instant,
    /// Each read: when, and how many bytes.
    pub reads: Vec<(Instant, usize)>,
}

impl ConnLog {
    /// Total bytes read.
    pub fn bytes(&self) -> usize {
        self.reads.iter().map(|(_, n)| n).sum()
    }
}

type Logs = Arc<Mutex<HashMap<u16, ConnLog>>>;

/// A peer server on its own thread.
pub struct PeerServer {
    addr: SocketAddr,
    logs: Logs,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl PeerServer {
    /// Starts a server on `127.0.0.1:0` treating every connection with `behaviour`.
    pub fn start(behaviour: Behaviour) -> Self {
        Self::start_on(listener(([127, 0, 0, 1], 0).into()), behaviour)
    }

    /// Starts a server that keeps no per-connection log, for runs that open connections by
    /// the hundred thousand (the soak): its memory must not grow with them.
    pub fn start_unlogged(behaviour: Behaviour) -> Self {
        Self::start_with(listener(([127, 0, 0, 1], 0).into()), behaviour, false)
    }

    /// Starts a server on a listener the caller bound (e.g. inside a network namespace).
    pub fn start_on(listener: std::net::TcpListener, behaviour: Behaviour) -> Self {
        Self::start_with(listener, behaviour, true)
    }

    fn start_with(listener: std::net::TcpListener, behaviour: Behaviour, logged: bool) -> Self {
        let addr = listener.local_addr().expect("listener address");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let logs: Logs = Arc::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let thread_logs = logs.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("peer-{}", addr.port()))
            .spawn(move || {
                tokio_uring::start(async move {
                    let _ = ready_tx.send(());
                    serve(listener, behaviour, thread_logs, logged, stop_rx).await;
                });
            })
            .expect("spawn the peer thread");
        // Once the runtime is up, the server's own fds exist: callers that count fds (the
        // soak) must see them before they start counting.
        let _ = ready_rx.recv_timeout(std::time::Duration::from_secs(10));
        Self {
            addr,
            logs,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Where to connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the peer saw on the connection from client port `port`.
    pub fn log(&self, port: u16) -> Option<ConnLog> {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&port)
            .cloned()
    }

    /// Total bytes read over every connection.
    pub fn total_bytes(&self) -> usize {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(ConnLog::bytes)
            .sum()
    }

    /// Number of connections accepted.
    pub fn accepted(&self) -> usize {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Opens `n` connections to this peer: (stream, its local port), in order.
    pub fn connect(&self, n: usize) -> Vec<(TcpStream, u16)> {
        (0..n).map(|_| self.connect_one()).collect()
    }

    /// Opens one connection to this peer: (stream, its local port).
    pub fn connect_one(&self) -> (TcpStream, u16) {
        let s = TcpStream::connect(self.addr).expect("connect to the loopback peer");
        s.set_nodelay(true).expect("TCP_NODELAY");
        let port = s.local_addr().expect("local address").port();
        (s, port)
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    behaviour: Behaviour,
    logs: Logs,
    logged: bool,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    listener
        .set_nonblocking(false)
        .expect("blocking listener for tokio-uring");
    let listener = tokio_uring::net::TcpListener::from_std(listener);
    // Connections live until the server stops: dropping this list closes them.
    let held: Rc<std::cell::RefCell<Vec<tokio::task::JoinHandle<()>>>> = Rc::default();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, remote)) = accepted else { continue };
                if logged {
                    logs.lock().unwrap_or_else(PoisonError::into_inner).insert(
                        remote.port(),
                        ConnLog { accepted: Instant::now(), reads: Vec::new() },
                    );
                }
                let task = tokio_uring::spawn(handle(stream, remote.port(), behaviour.clone(), logs.clone()));
                let mut held = held.borrow_mut();
                if held.len() % 1024 == 1023 {
                    held.retain(|t| !t.is_finished());
                }
                held.push(task);
            }
        }
    }
    for task in held.borrow_mut().drain(..) {
        task.abort();
    }
}

async fn handle(stream: tokio_uring::net::TcpStream, port: u16, behaviour: Behaviour, logs: Logs) {
    let log_read = |n: usize| {
        if let Some(log) = logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&port)
        {
            log.reads.push((Instant::now(), n));
        }
    };
    match behaviour {
        Behaviour::Answer(reply) => {
            let mut buf = vec![0u8; 4096];
            loop {
                let (res, b) = stream.read(buf).await;
                buf = b;
                match res {
                    Ok(0) | Err(_) => return,
                    Ok(n) => log_read(n),
                }
                let (res, _) = stream.write_all(reply.to_vec()).await;
                if res.is_err() {
                    return;
                }
            }
        }
        Behaviour::Count => {
            let mut buf = vec![0u8; 4096];
            loop {
                let (res, b) = stream.read(buf).await;
                buf = b;
                match res {
                    Ok(0) | Err(_) => return,
                    Ok(n) => log_read(n),
                }
            }
        }
        Behaviour::Silent => std::future::pending::<()>().await,
        Behaviour::Busy { every } => loop {
            tokio::time::sleep(every).await;
            let (res, _) = stream.write_all(b"b".to_vec()).await;
            if res.is_err() {
                return;
            }
        },
        Behaviour::Close { after, reset } => {
            tokio::time::sleep(after).await;
            if reset {
                set_linger_zero(stream.as_raw_fd());
            }
        }
    }
}

/// A listener with a deep accept queue: std's default backlog of 128 overflows when a test
/// opens thousands of connections while the peer is busy, and an overflow costs a 1 s SYN
/// retransmission.
pub fn listener(addr: SocketAddr) -> std::net::TcpListener {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.bind(&addr.into()).expect("bind a peer listener");
    socket.listen(4096).expect("listen");
    socket.into()
}

/// `SO_LINGER` {on, 0}: the next close sends a RST.
pub fn set_linger_zero(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid option pointer of the declared size.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}
