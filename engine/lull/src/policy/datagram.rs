//! What a UDP flow's policy must be, and why.

use super::{Mode, OnDead, Policy, PolicyError, Probe};

/// Why a policy cannot watch a UDP flow. Each names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramPolicyError {
    /// UDP has no kernel keepalive.
    #[error("probe = kernel: UDP has no kernel keepalive; use a byte probe or a callback")]
    KernelProbe,
    /// Tiered probing leans on the kernel's TCP keepalive.
    #[error("hung_after: tiered probing needs TCP's kernel keepalive; UDP flows have none")]
    Tiered,
    /// Draining reads a stream; a datagram flow's owner reads its own datagrams.
    #[error("drain: a UDP flow's datagrams are read by its owner, not drained by lull")]
    Drain,
    /// Detect-dead needs a probe the peer answers, or silence proves nothing: an idle peer and
    /// a dead one look the same.
    #[error(
        "detect-dead on a UDP flow needs a probe the peer answers: set expect_reply to the \
         start of its answer (or use a callback probe)"
    )]
    NoReplyExpected,
    /// A reset is a TCP thing; on a UDP socket it would disconnect the socket instead.
    #[error("on_dead = reset: UDP has no reset; use report (or shutdown on a connected socket)")]
    Reset,
    /// A socket shared by several peers cannot be shut down for one of them.
    #[error("on_dead = shutdown: the socket is shared by every peer watched on it; use report")]
    SharedShutdown,
}

impl Policy {
    /// Checks the policy for a UDP flow: [`Policy::validate`], and what a datagram flow needs
    /// (see [`DatagramPolicyError`]). `shared` says whether the socket carries other peers'
    /// flows too (an unconnected socket watched per peer).
    pub fn validate_datagram(&self, shared: bool) -> Result<(), PolicyError> {
        self.validate()?;
        let refuse = |e: DatagramPolicyError| Err(PolicyError::Datagram(e));
        if self.probe == Probe::Kernel {
            return refuse(DatagramPolicyError::KernelProbe);
        }
        if self.hung_after.is_some() {
            return refuse(DatagramPolicyError::Tiered);
        }
        if self.drain {
            return refuse(DatagramPolicyError::Drain);
        }
        if self.mode == Mode::DetectDead
            && matches!(self.probe, Probe::Bytes(_))
            && self.expect_reply.is_none()
        {
            return refuse(DatagramPolicyError::NoReplyExpected);
        }
        match self.on_dead {
            OnDead::Reset => refuse(DatagramPolicyError::Reset),
            OnDead::Shutdown if shared => refuse(DatagramPolicyError::SharedShutdown),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::probe::Payload;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn datagram_flows_refuse_what_udp_cannot_do() {
        let ping = || Probe::Bytes(Payload::datagram(b"ping").unwrap());
        let pong = || Payload::datagram(b"pong").unwrap();
        let dead = Policy::detect_dead(s(30), s(5), 3).with_probe(ping());
        let refused = |e| Err(PolicyError::Datagram(e));
        let cases = [
            (
                dead.clone(),
                false,
                refused(DatagramPolicyError::NoReplyExpected),
            ),
            (dead.clone().with_expect_reply(pong()), false, Ok(())),
            (dead.clone().with_probe(Probe::Callback), false, Ok(())),
            (Policy::keep_warm(s(25)).with_probe(ping()), true, Ok(())),
            (
                dead.clone()
                    .with_expect_reply(pong())
                    .with_probe(Probe::Kernel),
                false,
                refused(DatagramPolicyError::KernelProbe),
            ),
            (
                dead.clone()
                    .with_expect_reply(pong())
                    .with_hung_after(s(60)),
                false,
                refused(DatagramPolicyError::Tiered),
            ),
            (
                dead.clone().with_expect_reply(pong()).with_drain(true),
                false,
                refused(DatagramPolicyError::Drain),
            ),
            (
                dead.clone()
                    .with_expect_reply(pong())
                    .with_on_dead(OnDead::Reset),
                false,
                refused(DatagramPolicyError::Reset),
            ),
            (
                dead.clone()
                    .with_expect_reply(pong())
                    .with_on_dead(OnDead::Shutdown),
                false,
                Ok(()),
            ),
            (
                dead.clone()
                    .with_expect_reply(pong())
                    .with_on_dead(OnDead::Shutdown),
                true,
                refused(DatagramPolicyError::SharedShutdown),
            ),
        ];
        for (policy, shared, want) in cases {
            assert_eq!(policy.validate_datagram(shared), want, "{policy:?}");
        }
        // A datagram-sized payload is not a TCP probe.
        let big = Probe::Bytes(Payload::datagram(&[7; 200]).unwrap());
        assert_eq!(
            Policy::default().with_probe(big).validate_stream(),
            Err(PolicyError::StreamPayloadTooLarge { len: 200 })
        );
    }
}
