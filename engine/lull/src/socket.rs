//! The calls lull makes on sockets it watches but does not own: checking what a socket is,
//! handing it to the kernel's keepalive, reading `TCP_INFO`, and shutting or resetting it when
//! its peer is dead.
//!
//! Every socket option goes through `socket2` where it has one; the raw calls left (`fstat`
//! and `getsockopt(TCP_INFO)`) are wrapped here once. Each failure names its call.
//!
//! # Ground rules
//!
//! - The caller keeps the socket open for the whole call: every function borrows its fd, and
//!   none of them closes it or keeps it.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    time::Duration,
};

use socket2::{SockAddr, SockAddrStorage, SockRef, TcpKeepalive};

use crate::{
    WatchError,
    activity::{ActivityError, TcpState},
    policy::Policy,
};

/// A system call on a socket that failed, and which call it was.
#[derive(Debug, thiserror::Error)]
#[error("{call} on fd {fd}: {source}")]
pub(crate) struct SocketError {
    /// The call, with the option it read or set.
    pub(crate) call: &'static str,
    pub(crate) fd: RawFd,
    #[source]
    pub(crate) source: io::Error,
}

impl From<SocketError> for WatchError {
    fn from(err: SocketError) -> Self {
        WatchError::Syscall {
            call: err.call,
            fd: err.fd,
            source: err.source,
        }
    }
}

impl From<SocketError> for ActivityError {
    fn from(err: SocketError) -> Self {
        ActivityError::Syscall {
            call: err.call,
            source: err.source,
        }
    }
}

/// Names the call behind `result`.
fn named<T>(
    call: &'static str,
    fd: BorrowedFd<'_>,
    result: io::Result<T>,
) -> Result<T, SocketError> {
    result.map_err(|source| SocketError {
        call,
        fd: fd.as_raw_fd(),
        source,
    })
}

/// What [`check_socket`] found out about an fd.
pub(crate) struct SocketIdentity {
    pub(crate) inode: u64,
    pub(crate) kind: SocketKind,
}

/// The sockets lull watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SocketKind {
    /// A connected TCP socket.
    Stream,
    /// A UDP socket connected to one peer.
    ConnectedDatagram,
    /// A UDP socket with no peer of its own: each peer it talks to is a flow of its own.
    UnconnectedDatagram,
}

/// Refuses anything but a connected TCP socket or a UDP socket, with an error that says what
/// it is instead.
pub(crate) fn check_socket(fd: BorrowedFd<'_>) -> Result<SocketIdentity, WatchError> {
    let raw = fd.as_raw_fd();
    let st = fstat(fd).map_err(|err| {
        if err.source.raw_os_error() == Some(libc::EBADF) {
            WatchError::ClosedFd(raw)
        } else {
            err.into()
        }
    })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(WatchError::NotSocket(raw));
    }
    let socket = SockRef::from(&fd);
    let domain = named("getsockopt(SO_DOMAIN)", fd, socket.domain())?;
    let ty = named("getsockopt(SO_TYPE)", fd, socket.r#type())?;
    let protocol = named("getsockopt(SO_PROTOCOL)", fd, socket.protocol())?;
    let kind = match (
        libc::c_int::from(domain),
        libc::c_int::from(ty),
        protocol.map_or(0, libc::c_int::from),
    ) {
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_TCP) => None,
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_UDP) => {
            // Connected or not: only a connected one has a peer address.
            let kind = match socket.peer_addr() {
                Ok(_) => SocketKind::ConnectedDatagram,
                Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => {
                    SocketKind::UnconnectedDatagram
                }
                Err(source) => {
                    return Err(SocketError {
                        call: "getpeername",
                        fd: raw,
                        source,
                    }
                    .into());
                }
            };
            return Ok(SocketIdentity {
                inode: st.st_ino,
                kind,
            });
        }
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM, _) => Some("datagram (not UDP)"),
        (libc::AF_INET | libc::AF_INET6, _, libc::IPPROTO_SCTP) => Some("SCTP"),
        (libc::AF_UNIX, _, _) => Some("Unix"),
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_RAW, _) => Some("raw"),
        _ => Some("non-TCP"),
    };
    if let Some(kind) = kind {
        return Err(WatchError::NotTcp { fd: raw, kind });
    }
    if named("getsockopt(SO_ACCEPTCONN)", fd, socket.is_listener())? {
        return Err(WatchError::Listening(raw));
    }
    let state = TcpState::from_raw(tcp_info(fd)?.tcpi_state);
    if state != TcpState::Established {
        return Err(WatchError::NotConnected { fd: raw, state });
    }
    Ok(SocketIdentity {
        inode: st.st_ino,
        kind: SocketKind::Stream,
    })
}

/// Hands a kernel-probed socket to the kernel's keepalive, with the policy's timings, and
/// `TCP_USER_TIMEOUT` at the same bound so that unacknowledged data cannot stall detection
/// (keepalive probes are not sent while data is in flight; retransmissions are, and the user
/// timeout caps how long they may go unanswered).
pub(crate) fn enable_kernel_keepalive(
    fd: BorrowedFd<'_>,
    policy: &Policy,
) -> Result<(), SocketError> {
    // The kernel counts keepalive times in whole seconds and refuses 0.
    let secs = |d: Duration| d.max(Duration::from_secs(1));
    let keepalive = TcpKeepalive::new()
        .with_time(secs(policy.idle))
        .with_interval(secs(policy.interval))
        .with_retries(policy.count);
    let socket = SockRef::from(&fd);
    named(
        "setsockopt(SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT)",
        fd,
        socket.set_tcp_keepalive(&keepalive),
    )?;
    // The kernel reads the timeout as a signed int and refuses a negative one.
    let most = Duration::from_millis(libc::c_int::MAX as u64);
    named(
        "setsockopt(TCP_USER_TIMEOUT)",
        fd,
        socket.set_tcp_user_timeout(Some(policy.transport_bound().min(most))),
    )
}

/// `getsockopt(TCP_INFO)`: no crate exposes it.
pub(crate) fn tcp_info(fd: BorrowedFd<'_>) -> Result<libc::tcp_info, SocketError> {
    // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid out-pointers of the declared size, for the call only.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    named("getsockopt(TCP_INFO)", fd, cvt(ret).map(|()| info))
}

/// `fstat`, for the inode that tells one socket from another whatever its fd number.
fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat, SocketError> {
    // SAFETY: `stat` is plain integers; all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer for the call only.
    let ret = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    named("fstat", fd, cvt(ret).map(|()| st))
}

/// A libc return value as a result: -1 means `errno` holds the error.
fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Shuts the connection down both ways, with a FIN, leaving the fd open for its owner.
pub(crate) fn shutdown(fd: BorrowedFd<'_>) -> Result<(), SocketError> {
    named(
        "shutdown(SHUT_RDWR)",
        fd,
        SockRef::from(&fd).shutdown(std::net::Shutdown::Both),
    )
}

/// Aborts the connection with a RST while leaving the fd open for its owner: `SO_LINGER` 0,
/// then `connect(AF_UNSPEC)`, which is `tcp_disconnect()` and sends the RST at once.
///
/// Both steps are tried even if the first fails; the first failure is returned.
pub(crate) fn reset(fd: BorrowedFd<'_>) -> Result<(), SocketError> {
    let socket = SockRef::from(&fd);
    let linger = named(
        "setsockopt(SO_LINGER)",
        fd,
        socket.set_linger(Some(Duration::ZERO)),
    );
    // SAFETY: all-zero storage is an address of family AF_UNSPEC (0), and the length covers
    // exactly a `sockaddr`, the size the kernel reads for that family.
    let unspec = unsafe {
        SockAddr::new(
            SockAddrStorage::zeroed(),
            size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    let disconnect = named("connect(AF_UNSPEC)", fd, socket.connect(&unspec));
    linger.and(disconnect)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{ErrorKind, Read},
        net::{TcpListener, TcpStream, UdpSocket},
        os::fd::AsFd,
    };

    use super::*;

    fn pair() -> (TcpStream, TcpStream, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        (ours, peer, listener)
    }

    #[test]
    fn connected_tcp_and_udp_sockets_pass() {
        let (ours, _peer, listener) = pair();
        assert_eq!(check_socket(ours.as_fd()).unwrap().kind, SocketKind::Stream);
        assert!(matches!(
            check_socket(listener.as_fd()),
            Err(WatchError::Listening(_))
        ));
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            check_socket(udp.as_fd()).unwrap().kind,
            SocketKind::UnconnectedDatagram
        );
        udp.connect(listener.local_addr().unwrap()).unwrap();
        assert_eq!(
            check_socket(udp.as_fd()).unwrap().kind,
            SocketKind::ConnectedDatagram
        );
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(matches!(
            check_socket(file.as_fd()),
            Err(WatchError::NotSocket(_))
        ));
    }

    #[test]
    fn kernel_keepalive_gets_the_policys_timings_in_whole_seconds() {
        let (ours, _peer, _listener) = pair();
        let policy = Policy::detect_dead(Duration::from_millis(500), Duration::from_secs(7), 4);
        enable_kernel_keepalive(ours.as_fd(), &policy).unwrap();
        let socket = SockRef::from(&ours);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(1));
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(28_500))
        );
    }

    #[test]
    fn reset_sends_a_rst_and_keeps_the_fd() {
        let (ours, mut peer, _listener) = pair();
        reset(ours.as_fd()).unwrap();
        let err = peer.read(&mut [0; 8]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionReset);
        assert_eq!(SockRef::from(&ours).linger().unwrap(), Some(Duration::ZERO));
    }

    #[test]
    fn shutdown_sends_a_fin() {
        let (ours, mut peer, _listener) = pair();
        shutdown(ours.as_fd()).unwrap();
        assert_eq!(peer.read(&mut [0; 8]).unwrap(), 0, "end of stream");
    }
}
