//! [`Policy`]: when a connection counts as idle, how it is probed, and what happens to it.

use std::time::Duration;

use crate::probe::{MAX_PAYLOAD, Payload};

mod datagram;

pub use datagram::DatagramPolicyError;

/// The most probes in one round. Kernel keepalive allows 127; a round of more than a few
/// dozen probes is a misconfiguration, and the bound keeps per-connection state small.
pub const MAX_COUNT: u32 = 31;

/// What the engine is watching for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Probe connections that were silent for `idle`; report [`Event::Dead`](crate::Event)
    /// when none of `count` probes, `interval` apart, is answered.
    DetectDead,
    /// WireGuard-style persistent keepalive: send a probe whenever nothing was *sent* for
    /// `interval`, so NAT and firewall state stays warm. Never reports dead.
    KeepWarm,
}

/// Which traffic counts as activity in [`Mode::DetectDead`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActivityMode {
    /// Only payload *received* proves the peer alive. The default: a connection that only
    /// sends can have a dead peer.
    RxOnly,
    /// Payload in either direction postpones probing.
    RxOrTx,
}

/// What to do with a connection found dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OnDead {
    /// Only report it; the application decides.
    Report,
    /// `shutdown(SHUT_RDWR)`: the application's next read sees EOF.
    Shutdown,
    /// Abort with a RST (`SO_LINGER` 0, then disconnect): the application's next read fails
    /// and the peer, if it ever comes back, is told at once.
    Reset,
}

/// How a connection is probed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Probe {
    /// The engine writes these bytes, batched through io_uring. Any payload received after a
    /// probe answers it.
    Bytes(Payload),
    /// The engine sets `SO_KEEPALIVE`, `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT` and
    /// `TCP_USER_TIMEOUT` on the socket and reports the kernel's verdict.
    Kernel,
    /// The engine emits [`Event::ProbeDue`](crate::Event) and the application sends its own
    /// ping (an HTTP/2 PING through h2, a protocol-level heartbeat, ...).
    Callback,
}

/// Why a policy is invalid. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// `idle` is zero.
    #[error("idle must be greater than zero")]
    ZeroIdle,
    /// `interval` is zero.
    #[error("interval must be greater than zero")]
    ZeroInterval,
    /// `count` is zero or above [`MAX_COUNT`].
    #[error("count must be between 1 and {MAX_COUNT}, not {0}")]
    Count(u32),
    /// `jitter` is not a fraction in `0.0..=0.5`.
    #[error("jitter must be between 0.0 and 0.5, not {0}")]
    Jitter(String),
    /// In keep-warm mode the probe interval is the idle threshold; a larger one cannot be
    /// honoured.
    #[error("interval ({interval:?}) must not exceed idle ({idle:?}) in keep-warm mode")]
    IntervalExceedsIdle {
        /// The interval.
        interval: Duration,
        /// The idle threshold.
        idle: Duration,
    },
    /// `min_probe_spacing` is larger than `interval`, so probes could never go out on time.
    #[error("min_probe_spacing ({spacing:?}) must not exceed interval ({interval:?})")]
    SpacingExceedsInterval {
        /// The spacing.
        spacing: Duration,
        /// The interval.
        interval: Duration,
    },
    /// Kernel probes count in whole seconds.
    #[error("kernel probes need idle and interval of at least 1 s (got {idle:?}, {interval:?})")]
    KernelGranularity {
        /// The idle threshold.
        idle: Duration,
        /// The interval.
        interval: Duration,
    },
    /// Kernel probes cannot keep a connection warm: they only go out after `idle`.
    #[error("kernel probes only support detect-dead mode")]
    KernelKeepWarm,
    /// `hung_after` is too short: the application tier would probe before the transport
    /// tier could have given its verdict on a vanished peer, and report it as hung.
    #[error(
        "hung_after ({hung_after:?}) must be at least idle + 2 x count x interval ({bound:?}): \
         the dead bound, idle + count x interval, and then count intervals of lull's own probes"
    )]
    HungBeforeDead {
        /// `hung_after`.
        hung_after: Duration,
        /// The least `hung_after`: `idle + 2 * count * interval`.
        bound: Duration,
    },
    /// `hung_after` needs a probe the application answers; kernel probes only reach its kernel.
    #[error("hung_after needs a probe the application answers; probe = kernel cannot be tiered")]
    HungWithKernelProbe,
    /// `hung_after` finds hung applications; keep-warm mode reports no deaths.
    #[error("hung_after only applies to detect-dead mode, not keep-warm")]
    HungKeepWarm,
    /// A duration does not fit the engine's clock (over ~500 years).
    #[error("{field} is too large")]
    TooLarge {
        /// The field.
        field: &'static str,
    },
    /// A TCP connection's byte probe must fit one small write (see [`MAX_PAYLOAD`]); the
    /// larger limit is for datagram flows only.
    #[error("a TCP connection's probe is {len} bytes; the limit is {MAX_PAYLOAD}")]
    StreamPayloadTooLarge {
        /// The payload's length.
        len: usize,
    },
    /// Something a datagram (UDP) flow cannot do; the text says what and why.
    #[error("{0}")]
    Datagram(#[from] DatagramPolicyError),
}

/// How one connection is kept alive. Cheap to clone; engines store each distinct policy once.
///
/// The defaults follow the kernel's keepalive shape with saner numbers: probe after 30 s of
/// silence, then every 5 s, dead after 3 unanswered probes, 10% jitter.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Silence after which a connection is probed.
    pub idle: Duration,
    /// Time between probes, and the time a probe has to be answered.
    pub interval: Duration,
    /// Unanswered probes after which the peer is dead.
    pub count: u32,
    /// Width of the window, as a fraction of `idle` (0.0 to 0.5), in which each idle timer
    /// fires at random: from `idle * (1 - jitter/2)` to `idle * (1 + jitter/2)` of silence, so
    /// that connections registered together do not probe together, while on average they
    /// probe exactly every `idle`.
    pub jitter: f64,
    /// Dead-peer detection or keep-warm.
    pub mode: Mode,
    /// Which traffic counts as activity.
    pub activity: ActivityMode,
    /// What to do with a dead connection.
    pub on_dead: OnDead,
    /// How to probe.
    pub probe: Probe,
    /// Probes on one connection are never closer together than this, whatever else the policy
    /// says. Keeps lull under limits such as gRPC's `too_many_pings`.
    pub min_probe_spacing: Duration,
    /// Read and discard whatever the peer sent, each time the connection's timer fires. Only
    /// for connections that nobody else reads (lull itself keeping a server's connections
    /// open); an application that reads its own socket must leave this off.
    pub drain: bool,
    /// Tiered probing: find dead peers fast and hung applications more slowly, at close to
    /// kernel keepalive's cost.
    ///
    /// When set, the peer's transport is left to the kernel's keepalive, armed on the socket
    /// with `idle`, `interval` and `count` (and `TCP_USER_TIMEOUT` at `idle + count *
    /// interval`), whose probes do not wake the peer's application; its verdict is reported as
    /// [`DeadTier::Transport`](crate::DeadTier). An application-level probe goes out only
    /// to a connection that received nothing for `hung_after` less `count` intervals, so that
    /// a peer whose kernel answers but whose application is hung is reported
    /// ([`DeadTier::Application`](crate::DeadTier)) once `hung_after` has passed. It must be
    /// at least the dead bound, `idle + count * interval`, and needs a probe the application
    /// answers (not [`Probe::Kernel`]).
    pub hung_after: Option<Duration>,
    /// For datagram (UDP) flows: the start of the peer's answer to the probe, up to
    /// [`MAX_DATAGRAM_PAYLOAD`](crate::probe::MAX_DATAGRAM_PAYLOAD) bytes. A UDP flow in
    /// detect-dead mode with a byte probe needs it: UDP has no acknowledgements, so only a
    /// probe the peer answers tells a dead peer from an idle one. Any datagram from the peer
    /// is a sign of life, as any payload is on TCP; an owner that reads the answers (as
    /// `lull run --connect udp://` does) checks them against this prefix. TCP ignores it.
    pub expect_reply: Option<Payload>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(5),
            count: 3,
            jitter: 0.1,
            mode: Mode::DetectDead,
            activity: ActivityMode::RxOnly,
            on_dead: OnDead::Report,
            probe: Probe::Bytes(Payload::redis_ping()),
            min_probe_spacing: Duration::ZERO,
            drain: false,
            hung_after: None,
            expect_reply: None,
        }
    }
}

impl Policy {
    /// Dead-peer detection with the given timings and the default everything else.
    pub fn detect_dead(idle: Duration, interval: Duration, count: u32) -> Self {
        Self {
            idle,
            interval,
            count,
            ..Self::default()
        }
    }

    /// Keep-warm: one probe whenever nothing was sent for `interval`.
    pub fn keep_warm(interval: Duration) -> Self {
        Self {
            idle: interval,
            interval,
            mode: Mode::KeepWarm,
            ..Self::default()
        }
    }

    /// Sets the probe.
    pub fn with_probe(mut self, probe: Probe) -> Self {
        self.probe = probe;
        self
    }

    /// Sets what happens on death.
    pub fn with_on_dead(mut self, on_dead: OnDead) -> Self {
        self.on_dead = on_dead;
        self
    }

    /// Sets the jitter fraction.
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets which traffic counts as activity.
    pub fn with_activity(mut self, activity: ActivityMode) -> Self {
        self.activity = activity;
        self
    }

    /// Sets the minimum spacing between two probes on one connection.
    pub fn with_min_probe_spacing(mut self, spacing: Duration) -> Self {
        self.min_probe_spacing = spacing;
        self
    }

    /// Turns on tiered probing (see [`Policy::hung_after`]).
    pub fn with_hung_after(mut self, hung_after: Duration) -> Self {
        self.hung_after = Some(hung_after);
        self
    }

    /// Sets whether the engine drains (reads and discards) what the peer sends.
    pub fn with_drain(mut self, drain: bool) -> Self {
        self.drain = drain;
        self
    }

    /// Sets the start of the answer a datagram flow's peer sends to the probe (see
    /// [`Policy::expect_reply`]).
    pub fn with_expect_reply(mut self, reply: Payload) -> Self {
        self.expect_reply = Some(reply);
        self
    }

    /// Checks the policy for a TCP connection: [`Policy::validate`], and a byte probe small
    /// enough for one write.
    pub fn validate_stream(&self) -> Result<(), PolicyError> {
        self.validate()?;
        match &self.probe {
            Probe::Bytes(payload) if payload.as_bytes().len() > MAX_PAYLOAD => {
                Err(PolicyError::StreamPayloadTooLarge {
                    len: payload.as_bytes().len(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Checks the policy. The engine refuses invalid policies with this error.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.idle.is_zero() {
            return Err(PolicyError::ZeroIdle);
        }
        if self.interval.is_zero() {
            return Err(PolicyError::ZeroInterval);
        }
        if self.count == 0 || self.count > MAX_COUNT {
            return Err(PolicyError::Count(self.count));
        }
        if !(0.0..=0.5).contains(&self.jitter) {
            return Err(PolicyError::Jitter(self.jitter.to_string()));
        }
        const LIMIT: Duration = Duration::from_secs(1 << 34);
        for (field, d) in [
            ("idle", self.idle),
            ("interval", self.interval),
            ("min_probe_spacing", self.min_probe_spacing),
            ("hung_after", self.hung_after.unwrap_or_default()),
        ] {
            if d > LIMIT {
                return Err(PolicyError::TooLarge { field });
            }
        }
        if self.mode == Mode::KeepWarm && self.interval > self.idle {
            return Err(PolicyError::IntervalExceedsIdle {
                interval: self.interval,
                idle: self.idle,
            });
        }
        if self.min_probe_spacing > self.interval {
            return Err(PolicyError::SpacingExceedsInterval {
                spacing: self.min_probe_spacing,
                interval: self.interval,
            });
        }
        if let Some(hung_after) = self.hung_after {
            if self.probe == Probe::Kernel {
                return Err(PolicyError::HungWithKernelProbe);
            }
            if self.mode == Mode::KeepWarm {
                return Err(PolicyError::HungKeepWarm);
            }
            // lull's own probes start `count` intervals before `hung_after`: only after the
            // kernel could have given up on a vanished peer, or it would be reported as hung.
            let bound = self.transport_bound() + self.interval * self.count;
            if hung_after < bound {
                return Err(PolicyError::HungBeforeDead { hung_after, bound });
            }
            // The kernel's keepalive counts in whole seconds.
            if self.idle < Duration::from_secs(1) || self.interval < Duration::from_secs(1) {
                return Err(PolicyError::KernelGranularity {
                    idle: self.idle,
                    interval: self.interval,
                });
            }
        }
        if self.probe == Probe::Kernel {
            if self.mode == Mode::KeepWarm {
                return Err(PolicyError::KernelKeepWarm);
            }
            if self.idle < Duration::from_secs(1) || self.interval < Duration::from_secs(1) {
                return Err(PolicyError::KernelGranularity {
                    idle: self.idle,
                    interval: self.interval,
                });
            }
        }
        Ok(())
    }

    /// The longest a dead peer can go unreported.
    ///
    /// With lull's own probes, `idle * (1 + jitter / 2) + count * interval`: the first probe
    /// goes out at the latest at the far edge of the jitter window. With kernel probes, and
    /// for the transport tier of a tiered policy, `idle + count * interval`: the kernel does
    /// not jitter.
    pub fn detection_bound(&self) -> Duration {
        if self.probe == Probe::Kernel || self.hung_after.is_some() {
            self.transport_bound()
        } else {
            self.idle.mul_f64(1.0 + self.jitter / 2.0) + self.interval * self.count
        }
    }

    /// The longest a hung application (its kernel still answering) can go unreported:
    /// `hung_after` for a tiered policy, the [detection bound](Policy::detection_bound)
    /// otherwise.
    pub fn hung_bound(&self) -> Duration {
        self.hung_after.unwrap_or_else(|| self.detection_bound())
    }

    /// `idle + count * interval`: when the kernel's keepalive gives up on a silent peer.
    pub fn transport_bound(&self) -> Duration {
        self.idle + self.interval * self.count
    }

    /// How often, on average, an idle connection whose peer answers is probed: once per
    /// `idle` (the jitter window is centred on it), and for a tiered policy once per
    /// application-tier period (`hung_after` less `count` intervals, less half the window).
    pub fn nominal_probe_period(&self) -> Duration {
        match self.hung_after {
            Some(hung_after) => {
                let span = hung_after.saturating_sub(self.interval * self.count);
                span.mul_f64(1.0 - self.jitter / 2.0)
            }
            None => self.idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn validation_names_the_field() {
        let base = Policy::default;
        let cases: Vec<(Policy, Result<(), PolicyError>)> = vec![
            (base(), Ok(())),
            (
                Policy {
                    idle: s(0),
                    ..base()
                },
                Err(PolicyError::ZeroIdle),
            ),
            (
                Policy {
                    interval: s(0),
                    ..base()
                },
                Err(PolicyError::ZeroInterval),
            ),
            (Policy { count: 0, ..base() }, Err(PolicyError::Count(0))),
            (
                Policy {
                    count: 32,
                    ..base()
                },
                Err(PolicyError::Count(32)),
            ),
            (
                Policy {
                    jitter: 0.6,
                    ..base()
                },
                Err(PolicyError::Jitter("0.6".into())),
            ),
            (
                Policy {
                    jitter: f64::NAN,
                    ..base()
                },
                Err(PolicyError::Jitter("NaN".into())),
            ),
            (
                Policy {
                    interval: s(60),
                    ..Policy::keep_warm(s(25))
                },
                Err(PolicyError::IntervalExceedsIdle {
                    interval: s(60),
                    idle: s(25),
                }),
            ),
            (Policy::keep_warm(s(25)), Ok(())),
            (
                base().with_min_probe_spacing(s(6)),
                Err(PolicyError::SpacingExceedsInterval {
                    spacing: s(6),
                    interval: s(5),
                }),
            ),
            (
                Policy::detect_dead(Duration::from_millis(500), s(1), 3).with_probe(Probe::Kernel),
                Err(PolicyError::KernelGranularity {
                    idle: Duration::from_millis(500),
                    interval: s(1),
                }),
            ),
            (
                Policy::keep_warm(s(25)).with_probe(Probe::Kernel),
                Err(PolicyError::KernelKeepWarm),
            ),
            (
                Policy {
                    idle: Duration::MAX,
                    ..base()
                },
                Err(PolicyError::TooLarge { field: "idle" }),
            ),
        ];
        for (policy, want) in cases {
            assert_eq!(policy.validate(), want, "{policy:?}");
        }
    }

    #[test]
    fn bounds_follow_the_jitter_window_and_the_tiers() {
        let p = Policy::detect_dead(s(30), s(5), 3);
        let cases = [
            (
                "lull's probes: the far edge of the window",
                p.clone(),
                s(46) + Duration::from_millis(500),
                s(46) + Duration::from_millis(500),
                s(30),
            ),
            ("no jitter", p.clone().with_jitter(0.0), s(45), s(45), s(30)),
            (
                "kernel probes do not jitter",
                p.clone().with_probe(Probe::Kernel),
                s(45),
                s(45),
                s(30),
            ),
            (
                "tiered",
                p.clone().with_hung_after(s(180)),
                s(45),
                s(180),
                Duration::from_millis(156_750),
            ),
        ];
        for (name, policy, dead, hung, period) in cases {
            assert_eq!(policy.detection_bound(), dead, "{name}: dead bound");
            assert_eq!(policy.hung_bound(), hung, "{name}: hung bound");
            assert_eq!(policy.nominal_probe_period(), period, "{name}: period");
        }
    }

    #[test]
    fn tiered_policies_name_both_settings_when_they_clash() {
        let p = Policy::detect_dead(s(30), s(5), 3);
        let cases = [
            (
                p.clone().with_hung_after(s(59)),
                Err(PolicyError::HungBeforeDead {
                    hung_after: s(59),
                    bound: s(60),
                }),
            ),
            (p.clone().with_hung_after(s(60)), Ok(())),
            (
                p.clone().with_hung_after(s(60)).with_probe(Probe::Kernel),
                Err(PolicyError::HungWithKernelProbe),
            ),
            (
                Policy::keep_warm(s(25)).with_hung_after(s(60)),
                Err(PolicyError::HungKeepWarm),
            ),
            (
                Policy::detect_dead(Duration::from_millis(500), s(1), 3).with_hung_after(s(60)),
                Err(PolicyError::KernelGranularity {
                    idle: Duration::from_millis(500),
                    interval: s(1),
                }),
            ),
        ];
        for (policy, want) in cases {
            assert_eq!(policy.validate(), want, "{policy:?}");
        }
        let text = PolicyError::HungBeforeDead {
            hung_after: s(59),
            bound: s(60),
        }
        .to_string();
        assert!(
            text.contains("hung_after") && text.contains("idle + count x interval"),
            "{text}"
        );
    }
}
