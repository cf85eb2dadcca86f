//! [`UdpPeer`]: a UDP peer with a known behaviour on its own thread, logging every datagram it
//! receives, for the demo's UDP flows, the tests and the `udp` benchmark.
//!
//! UDP has no connections: the peer treats each source address as one flow. It answers
//! datagrams that start with its probe prefix (and, if asked, every datagram), can hang (stop
//! answering) for everyone or per client, and can send a busy flow's traffic on its own.

use std::{
    collections::HashMap,
    io,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The probe the demo and the tests send to UDP peers: `lull-ping`.
pub const UDP_PROBE: &[u8] = b"lull-ping";
/// The answer of an answering UDP peer: `lull-pong`.
pub const UDP_REPLY: &[u8] = b"lull-pong";
/// What a busy peer sends, unprompted.
pub const UDP_BUSY: &[u8] = b"lull-busy";

/// When a client's flow stops being answered, by its source port.
pub type HangSchedule = Arc<dyn Fn(u16) -> Option<Duration> + Send + Sync>;

/// What a [`UdpPeer`] does.
#[derive(Clone)]
pub struct UdpBehaviour {
    /// Datagrams starting with this are answered with `reply` (empty: none are).
    pub probe: Vec<u8>,
    /// The answer.
    pub reply: Vec<u8>,
    /// Send [`UDP_BUSY`] to every client seen so far, this often.
    pub busy_every: Option<Duration>,
    /// Per client (by source port): stop answering this long after its first datagram.
    pub hang: Option<HangSchedule>,
    /// Keep a log of every datagram received (see [`UdpPeer::datagrams`]).
    pub log: bool,
}

impl UdpBehaviour {
    /// Answers [`UDP_PROBE`] with [`UDP_REPLY`], logging every datagram.
    pub fn answering() -> Self {
        Self {
            probe: UDP_PROBE.to_vec(),
            reply: UDP_REPLY.to_vec(),
            busy_every: None,
            hang: None,
            log: true,
        }
    }

    /// Never answers; logs every datagram.
    pub fn silent() -> Self {
        Self {
            probe: Vec::new(),
            ..Self::answering()
        }
    }
}

/// One datagram a [`UdpPeer`] received.
#[derive(Clone, Debug)]
pub struct Datagram {
    /// When.
    pub at: Instant,
    /// From whom.
    pub from: SocketAddr,
    /// What.
    pub bytes: Vec<u8>,
}

struct Shared {
    log: Mutex<Vec<Datagram>>,
    /// Set: nobody is answered any more.
    hung: AtomicBool,
    stop: AtomicBool,
}

/// A UDP peer on its own thread (and one more for a busy peer's traffic). Dropping it stops
/// the threads and closes the socket.
pub struct UdpPeer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// How often the threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

impl UdpPeer {
    /// Starts a peer on `127.0.0.1:0`.
    ///
    /// # Panics
    /// If no loopback socket can be bound: a harness without its peer has nothing to measure.
    pub fn start(behaviour: UdpBehaviour) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a loopback UDP socket");
        Self::start_on(socket, behaviour).expect("start a UDP peer")
    }

    /// Starts a peer on a socket the caller bound (e.g. inside a network namespace).
    pub fn start_on(socket: UdpSocket, behaviour: UdpBehaviour) -> io::Result<Self> {
        socket.set_read_timeout(Some(POLL))?;
        let addr = socket.local_addr()?;
        let socket = Arc::new(socket);
        let shared = Arc::new(Shared {
            log: Mutex::new(Vec::new()),
            hung: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let clients: Arc<Mutex<HashMap<SocketAddr, Instant>>> = Arc::default();
        let mut threads = Vec::new();
        if let Some(every) = behaviour.busy_every {
            let (socket, shared, clients) = (socket.clone(), shared.clone(), clients.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("udp-peer-busy".into())
                    .spawn(move || {
                        while !shared.stop.load(Ordering::Relaxed) {
                            std::thread::sleep(every);
                            let to: Vec<SocketAddr> = lock(&clients).keys().copied().collect();
                            for client in to {
                                let _ = socket.send_to(UDP_BUSY, client);
                            }
                        }
                    })?,
            );
        }
        let serve_shared = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("udp-peer".into())
                .spawn(move || serve(&socket, &behaviour, &serve_shared, &clients))?,
        );
        Ok(Self {
            addr,
            shared,
            threads,
        })
    }

    /// Where the peer listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops answering anyone, for good (the socket stays open and keeps logging).
    pub fn hang(&self) {
        self.shared.hung.store(true, Ordering::Relaxed);
    }

    /// Every datagram received so far (if the behaviour logs).
    pub fn datagrams(&self) -> Vec<Datagram> {
        lock(&self.shared.log).clone()
    }

    /// The datagrams received from source port `port` that start with `prefix`.
    pub fn count_from(&self, port: u16, prefix: &[u8]) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|d| d.from.port() == port && d.bytes.starts_with(prefix))
            .count()
    }
}

impl Drop for UdpPeer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve(
    socket: &UdpSocket,
    behaviour: &UdpBehaviour,
    shared: &Shared,
    clients: &Mutex<HashMap<SocketAddr, Instant>>,
) {
    let mut buf = vec![0u8; 2048];
    while !shared.stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            // ICMP errors of earlier replies surface here; the socket is still fine.
            Err(_) => continue,
        };
        let first_seen = *lock(clients).entry(from).or_insert_with(Instant::now);
        let bytes = &buf[..n];
        if behaviour.log {
            lock(&shared.log).push(Datagram {
                at: Instant::now(),
                from,
                bytes: bytes.to_vec(),
            });
        }
        let hung = shared.hung.load(Ordering::Relaxed)
            || behaviour
                .hang
                .as_ref()
                .and_then(|schedule| schedule(from.port()))
                .is_some_and(|after| first_seen.elapsed() >= after);
        if !hung && !behaviour.probe.is_empty() && bytes.starts_with(&behaviour.probe) {
            let _ = socket.send_to(&behaviour.reply, from);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
