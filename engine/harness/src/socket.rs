//! Socket shortcuts every loopback harness needs.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd},
    time::Duration,
};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// A listener on `addr` with a deep accept queue.
///
/// std listens with a backlog of 128, which overflows when thousands of connections arrive
/// while the acceptor is busy, and an overflow costs the client a 1 s SYN retransmission.
pub fn listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// `SO_LINGER` {on, 0}: the socket's next close sends a RST instead of a FIN.
///
/// It takes `AsRawFd` rather than `AsFd` because tokio-uring's streams only offer the former.
pub fn set_linger_zero(socket: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: `socket` is borrowed for the whole call, so its fd stays open while we use it.
    let fd = unsafe { BorrowedFd::borrow_raw(socket.as_raw_fd()) };
    SockRef::from(&fd).set_linger(Some(Duration::ZERO))
}
