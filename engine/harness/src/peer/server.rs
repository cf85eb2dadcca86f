//! [`PeerServer`]: a loopback peer on its own thread, logging what it read per connection.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream},
    rc::Rc,
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::Instant,
};

use super::{Behaviour, serve};

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

/// A peer on its own thread and tokio-uring runtime, treating every connection it accepts
/// with one [`Behaviour`]. It logs what it read per connection, keyed by the client's port,
/// so a test can see exactly which probes arrived and when. Dropping it closes every
/// connection it holds.
pub struct PeerServer {
    addr: SocketAddr,
    logs: Logs,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl PeerServer {
    /// Starts a server on `127.0.0.1:0`.
    ///
    /// # Panics
    /// If no loopback listener can be bound or the thread cannot start: a harness that cannot
    /// set up its peer has nothing to measure.
    pub fn start(behaviour: Behaviour) -> Self {
        Self::start_on(loopback_listener(), behaviour)
    }

    /// Starts a server that keeps no per-connection log, for runs that open connections by
    /// the hundred thousand (the soak): its memory must not grow with them.
    pub fn start_unlogged(behaviour: Behaviour) -> Self {
        Self::start_with(loopback_listener(), behaviour, false)
    }

    /// Starts a server on a listener the caller bound (e.g. inside a network namespace).
    pub fn start_on(listener: std::net::TcpListener, behaviour: Behaviour) -> Self {
        Self::start_with(listener, behaviour, true)
    }

    fn start_with(listener: std::net::TcpListener, behaviour: Behaviour, logged: bool) -> Self {
        let addr = listener.local_addr().expect("the listener's address");
        let logs: Logs = Arc::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let thread_logs = logs.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("peer-{}", addr.port()))
            .spawn(move || {
                tokio_uring::start(async move {
                    let _ = ready_tx.send(());
                    accept_loop(listener, behaviour, thread_logs, logged, stop_rx).await;
                });
            })
            .expect("spawning the peer thread");
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

    fn logs(&self) -> std::sync::MutexGuard<'_, HashMap<u16, ConnLog>> {
        self.logs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the peer saw on the connection from client port `port`.
    pub fn log(&self, port: u16) -> Option<ConnLog> {
        self.logs().get(&port).cloned()
    }

    /// Total bytes read over every connection.
    pub fn total_bytes(&self) -> usize {
        self.logs().values().map(ConnLog::bytes).sum()
    }

    /// Number of connections accepted (logged servers only).
    pub fn accepted(&self) -> usize {
        self.logs().len()
    }

    /// Opens `n` connections to this peer: (stream, its local port), in order.
    pub fn connect(&self, n: usize) -> Vec<(TcpStream, u16)> {
        (0..n).map(|_| self.connect_one()).collect()
    }

    /// Opens one connection to this peer: (stream, its local port).
    ///
    /// # Panics
    /// If the loopback connection fails.
    pub fn connect_one(&self) -> (TcpStream, u16) {
        let s = TcpStream::connect(self.addr).expect("connecting to the loopback peer");
        s.set_nodelay(true).expect("TCP_NODELAY");
        let port = s.local_addr().expect("the local address").port();
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

fn loopback_listener() -> std::net::TcpListener {
    crate::socket::listener(([127, 0, 0, 1], 0).into()).expect("binding a loopback listener")
}

async fn accept_loop(
    listener: std::net::TcpListener,
    behaviour: Behaviour,
    logs: Logs,
    logged: bool,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio_uring::net::TcpListener::from_std(listener);
    // Connections live until the server stops: aborting these tasks closes them.
    let held: Rc<std::cell::RefCell<Vec<tokio::task::JoinHandle<()>>>> = Rc::default();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, remote)) = accepted else { continue };
                let port = remote.port();
                if logged {
                    logs.lock().unwrap_or_else(PoisonError::into_inner).insert(
                        port,
                        ConnLog { accepted: Instant::now(), reads: Vec::new() },
                    );
                }
                let logs = logs.clone();
                let log_read = move |n: usize| {
                    if let Some(log) =
                        logs.lock().unwrap_or_else(PoisonError::into_inner).get_mut(&port)
                    {
                        log.reads.push((Instant::now(), n));
                    }
                };
                let task = tokio_uring::spawn(serve(stream, behaviour.clone(), log_read));
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
