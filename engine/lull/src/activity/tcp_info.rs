//! [`TcpInfoSource`]: the fallback activity source, one `getsockopt(TCP_INFO)` per read.

use std::{io, os::fd::BorrowedFd};

use lull_common::flags;

use super::{Activity, ActivityError, ActivitySource, Slot, SourceKind};
use crate::clock::monotonic_ns;

/// TCP states, as `tcpi_state` reports them (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// Connection open both ways.
    Established,
    /// Connecting.
    SynSent,
    /// Accepted, handshake not finished.
    SynRecv,
    /// We sent FIN.
    FinWait1,
    /// Our FIN was acknowledged.
    FinWait2,
    /// Both closed; waiting out stray segments.
    TimeWait,
    /// Closed (reset, timed out, or never opened).
    Close,
    /// The peer sent FIN.
    CloseWait,
    /// We sent FIN after the peer's.
    LastAck,
    /// A listening socket.
    Listen,
    /// Both sent FIN at once.
    Closing,
    /// A state this version does not know.
    Other(u8),
}

impl TcpState {
    /// Decodes `tcpi_state`.
    pub fn from_raw(state: u8) -> Self {
        match state {
            1 => Self::Established,
            2 => Self::SynSent,
            3 => Self::SynRecv,
            4 => Self::FinWait1,
            5 => Self::FinWait2,
            6 => Self::TimeWait,
            7 => Self::Close,
            8 => Self::CloseWait,
            9 => Self::LastAck,
            10 => Self::Listen,
            11 => Self::Closing,
            other => Self::Other(other),
        }
    }

    /// The activity-table flags that describe this state.
    pub fn close_flags(self) -> u32 {
        match self {
            Self::Established | Self::SynSent | Self::SynRecv | Self::Listen | Self::Other(_) => 0,
            Self::CloseWait => flags::PEER_FIN,
            Self::FinWait1 | Self::FinWait2 => flags::LOCAL_FIN,
            Self::LastAck | Self::Closing | Self::TimeWait => flags::PEER_FIN | flags::LOCAL_FIN,
            Self::Close => flags::STATE_CLOSE,
        }
    }
}

/// `getsockopt(fd, IPPROTO_TCP, TCP_INFO)`.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    crate::socket::tcp_info(fd).map_err(|err| err.source)
}

/// Converts a `TCP_INFO` snapshot taken at `now_ns` into [`Activity`].
///
/// `tcpi_last_data_sent` moves on every data segment the kernel transmits, retransmissions
/// included. While the head of the queue is being retransmitted, those sends are not progress
/// (on a black-holed path they would keep a dead connection looking busy in rx-or-tx mode),
/// so sent data only counts up to the last ACK received.
pub(crate) fn activity_from(info: &libc::tcp_info, now_ns: u64) -> Activity {
    let ago = |ms: u32| now_ns.saturating_sub(u64::from(ms) * 1_000_000);
    let mut last_tx_ns = ago(info.tcpi_last_data_sent);
    if info.tcpi_retransmits > 0 || info.tcpi_backoff > 0 {
        last_tx_ns = last_tx_ns.min(ago(info.tcpi_last_ack_recv));
    }
    Activity {
        last_rx_ns: ago(info.tcpi_last_data_recv),
        last_tx_ns,
        flags: TcpState::from_raw(info.tcpi_state).close_flags(),
    }
}

/// The fallback source: asks the kernel with `getsockopt(TCP_INFO)` each time a timer fires.
///
/// It needs no privileges and no BPF, and costs one system call per due connection (not per
/// packet). Its stamps are `tcpi_last_data_recv`/`tcpi_last_data_sent`, counted in jiffies and
/// reported in milliseconds, so they are only good to [`TcpInfoSource::RESOLUTION_NS`].
#[derive(Debug, Default)]
pub struct TcpInfoSource;

impl TcpInfoSource {
    /// How far a stamp may be off: one millisecond of rounding plus one jiffy at HZ=100, the
    /// coarsest common kernel setting.
    pub const RESOLUTION_NS: u64 = 11_000_000;
}

impl ActivitySource for TcpInfoSource {
    fn kind(&self) -> SourceKind {
        SourceKind::TcpInfo
    }

    fn attach(
        &self,
        fd: Option<BorrowedFd<'_>>,
        _slot: Slot,
        _baseline_ns: u64,
    ) -> Result<(), ActivityError> {
        fd.map(|_| ()).ok_or(ActivityError::NoSocket)
    }

    fn detach(&self, _slot: Slot, _fd: Option<BorrowedFd<'_>>) {}

    fn read(&self, _slot: Slot, fd: Option<BorrowedFd<'_>>) -> Result<Activity, ActivityError> {
        let info = crate::socket::tcp_info(fd.ok_or(ActivityError::NoSocket)?)?;
        Ok(activity_from(&info, monotonic_ns()))
    }

    fn activity_from_tcp_info(&self, info: &libc::tcp_info, now_ns: u64) -> Option<Activity> {
        Some(activity_from(info, now_ns))
    }

    fn resolution_ns(&self) -> u64 {
        Self::RESOLUTION_NS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map_to_close_flags() {
        let cases = [
            (1, 0),
            (7, flags::STATE_CLOSE),
            (8, flags::PEER_FIN),
            (4, flags::LOCAL_FIN),
            (5, flags::LOCAL_FIN),
            (9, flags::PEER_FIN | flags::LOCAL_FIN),
            (6, flags::PEER_FIN | flags::LOCAL_FIN),
            (10, 0),
            (42, 0),
        ];
        for (raw, want) in cases {
            assert_eq!(TcpState::from_raw(raw).close_flags(), want, "state {raw}");
        }
    }

    #[test]
    fn milliseconds_ago_become_monotonic_stamps() {
        // SAFETY: `tcp_info` is plain integers, for which all zeroes is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        info.tcpi_state = 1;
        info.tcpi_last_data_recv = 250;
        info.tcpi_last_data_sent = 5_000;
        info.tcpi_retransmits = 2;
        info.tcpi_last_ack_recv = 7_000;
        let a = activity_from(&info, 10_000_000_000);
        assert_eq!(a.last_rx_ns, 9_750_000_000);
        assert_eq!(
            a.last_tx_ns, 3_000_000_000,
            "retransmitting: sends count up to the last ACK"
        );
        assert_eq!(a.flags, 0, "retransmitting is not closing");
        info.tcpi_retransmits = 0;
        let a = activity_from(&info, 10_000_000_000);
        assert_eq!(
            a.last_tx_ns, 5_000_000_000,
            "not retransmitting: the last send counts"
        );
        assert_eq!(a.flags, 0);
        info.tcpi_last_data_recv = u32::MAX;
        assert_eq!(
            activity_from(&info, 1).last_rx_ns,
            0,
            "saturates, never wraps"
        );
    }
}
