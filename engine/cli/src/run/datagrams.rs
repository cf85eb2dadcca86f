//! [`DatagramFlows`]: the UDP flows of one run, and the thread that reads what their peers
//! send.
//!
//! lull owns these sockets, so nobody else reads them: it reads every datagram itself, through
//! the watched handle (which stamps the flow for the wrapper observer), so that replies never
//! pile up in the receive buffer, and checks each against the expected reply. One thread
//! waits on all the sockets with one epoll set.

use std::{
    io::ErrorKind,
    net::UdpSocket,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, Result};
use lull::{Observer, Watched};

/// How long the reader waits before it looks at the stop flag again, in ms.
const WAIT_MS: i32 = 100;

/// What the reader counted.
#[derive(Default)]
struct Counts {
    /// Datagrams that start with the expected reply.
    replies: AtomicU64,
    /// Every other datagram (a busy peer's traffic, or an answer of the wrong protocol).
    other: AtomicU64,
}

/// The run's UDP flows and their reader; dropping it stops the reader, then the watches.
pub struct DatagramFlows {
    flows: Arc<Vec<Watched<UdpSocket>>>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl DatagramFlows {
    /// Starts reading `flows`; a datagram counts as a reply if it starts with `reply`.
    pub fn start(flows: Vec<Watched<UdpSocket>>, reply: Option<Vec<u8>>) -> Result<Self> {
        // SAFETY: epoll_create1 takes a flag and touches no memory of ours.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_create1");
        }
        // SAFETY: a new fd that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        for (i, flow) in flows.iter().enumerate() {
            flow.set_nonblocking(true)
                .context("making a UDP socket non-blocking")?;
            let mut event = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: both fds are open (the flows and the epoll set outlive the call), and
            // `event` is a valid epoll_event for the call only.
            let ret = unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    flow.as_raw_fd(),
                    &mut event,
                )
            };
            if ret < 0 {
                return Err(std::io::Error::last_os_error()).context("epoll_ctl(EPOLL_CTL_ADD)");
            }
        }
        let flows = Arc::new(flows);
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (flows, counts, stop) = (flows.clone(), counts.clone(), stop.clone());
            std::thread::Builder::new()
                .name("lull-udp-reader".into())
                .spawn(move || read(&epoll, &flows, reply.as_deref(), &counts, &stop))
                .context("starting the UDP reader")?
        };
        Ok(Self {
            flows,
            counts,
            stop,
            reader: Some(reader),
        })
    }

    /// The flows, in the order they were given.
    pub fn flows(&self) -> &[Watched<UdpSocket>] {
        &self.flows
    }

    /// Datagrams read so far: (replies, everything else).
    pub fn counted(&self) -> (u64, u64) {
        (
            self.counts.replies.load(Ordering::Relaxed),
            self.counts.other.load(Ordering::Relaxed),
        )
    }

    /// Flows per observer, by its name.
    pub fn observers(&self) -> std::collections::BTreeMap<String, u64> {
        let mut by = std::collections::BTreeMap::new();
        for flow in self.flows.iter() {
            let observer = flow.observer().unwrap_or(Observer::Wrapper);
            *by.entry(observer.name().to_string()).or_default() += 1;
        }
        by
    }
}

impl Drop for DatagramFlows {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn read(
    epoll: &OwnedFd,
    flows: &[Watched<UdpSocket>],
    reply: Option<&[u8]>,
    counts: &Counts,
    stop: &AtomicBool,
) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `events` is a valid, writable array of the length given, for the call only.
        let ready = unsafe {
            libc::epoll_wait(
                epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                WAIT_MS,
            )
        };
        for event in events.iter().take(ready.max(0) as usize) {
            let Some(flow) = flows.get(event.u64 as usize) else {
                continue;
            };
            // Level-triggered: whatever is left is reported again at the next wait, so a
            // bounded number of reads per wake keeps one chatty flow from starving the rest.
            for _ in 0..64 {
                match flow.recv(&mut buf) {
                    Ok(n) => {
                        let counter = if reply.is_some_and(|r| buf[..n].starts_with(r)) {
                            &counts.replies
                        } else {
                            &counts.other
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    // An earlier datagram's ICMP error, reported here: the socket goes on.
                    Err(err) if err.kind() == ErrorKind::ConnectionRefused => {}
                    Err(_) => break,
                }
            }
        }
    }
}
