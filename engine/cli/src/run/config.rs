//! [`RunConfig`]: `lull run`'s settings once merged with the defaults and validated.
//!
//! Validation turns each problem into a one-line [`UsageError`](crate::usage::UsageError)
//! naming the flag.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result};
use lull::{
    ActivityMode, DatagramPolicyError, Mode, OnDead, Payload, PayloadError, Policy, PolicyError,
    Probe,
};

use super::args::{ActivityArg, ModeArg, OnDeadArg, RunArgs, SourceArg};
use crate::usage::usage;

/// Demo population shares, as fractions.
#[derive(Clone, Copy, Debug)]
pub struct Population {
    pub busy: f64,
    pub hung: f64,
    pub closing: f64,
    /// UDP flows alongside the TCP connections, as a fraction of them.
    pub udp: f64,
}

/// Settings of `--connect`.
#[derive(Clone, Debug)]
pub struct Connect {
    pub target: String,
    pub addr: SocketAddr,
    pub mqtt_keepalive: Option<u16>,
    pub http2: bool,
    pub reconnect: bool,
    /// `udp://`: UDP flows, not TCP connections.
    pub udp: bool,
}

/// What `lull run` does.
#[derive(Clone, Debug)]
pub enum Job {
    Demo(Population),
    Connect(Connect),
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub job: Job,
    pub conns: u32,
    pub duration: Option<Duration>,
    pub policy: Policy,
    /// The policy of UDP flows: `--connect udp://`'s (the same as `policy`), or the demo's
    /// UDP share's; `None` when the run has no UDP flows.
    pub udp_policy: Option<Policy>,
    pub engines: usize,
    pub tick: Duration,
    pub max_probes_per_tick: u32,
    pub source: SourceArg,
    pub cgroup: Option<PathBuf>,
    pub json: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub user: Option<String>,
    pub quiet: bool,
}

/// The built-in defaults that differ between the demo and `--connect`.
struct JobDefaults {
    conns: u32,
    /// `None`: until interrupted.
    duration: Option<Duration>,
    idle: Duration,
    interval: Duration,
}

impl JobDefaults {
    /// The demo reports at the end, so it runs for a while; its peers are on loopback, so its
    /// timings are short enough to see hung peers found within the run.
    const DEMO: Self = Self {
        conns: 10_000,
        duration: Some(Duration::from_secs(30)),
        idle: Duration::from_secs(5),
        interval: Duration::from_secs(1),
    };

    /// A real server is kept alive until interrupted, with timings a server would tolerate.
    const CONNECT: Self = Self {
        conns: 100,
        duration: None,
        idle: Duration::from_secs(30),
        interval: Duration::from_secs(5),
    };
}

impl RunConfig {
    /// Merges the flags with `--config` and the defaults, and validates everything.
    pub fn resolve(args: RunArgs) -> Result<Self> {
        Self::from_args(args.with_config_file()?)
    }

    /// Applies the defaults to every flag still unset, and validates everything.
    pub fn from_args(args: RunArgs) -> Result<Self> {
        let connecting = args.connect.is_some();
        let udp = args
            .connect
            .as_deref()
            .is_some_and(|t| t.starts_with("udp://"));
        let defaults = if connecting {
            JobDefaults::CONNECT
        } else {
            JobDefaults::DEMO
        };
        let conns = args.conns.unwrap_or(defaults.conns);
        if conns == 0 {
            return Err(usage("--conns", "must be at least 1"));
        }
        let duration = match args.duration {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => defaults.duration,
        };
        if !connecting && duration.is_none() {
            return Err(usage(
                "--duration",
                "the demo needs a duration (it reports at the end)",
            ));
        }

        let mode = match args.mode.unwrap_or(ModeArg::DetectDead) {
            ModeArg::DetectDead => Mode::DetectDead,
            ModeArg::KeepWarm => Mode::KeepWarm,
        };
        let probe = match (args.probe.as_deref(), udp) {
            (None, true) => {
                return Err(usage(
                    "--probe",
                    "a UDP flow needs a probe payload: hex:BYTES (up to 1200 bytes)",
                ));
            }
            (Some("kernel"), true) => {
                return Err(usage(
                    "--probe",
                    "UDP has no kernel keepalive; give a payload, hex:BYTES",
                ));
            }
            (Some("kernel"), false) => Probe::Kernel,
            (Some("callback"), _) => {
                return Err(usage(
                    "--probe",
                    "callback probes need an application; use the library",
                ));
            }
            (Some(name), true) => {
                Probe::Bytes(Payload::parse_datagram(name).map_err(|e| probe_error(&e))?)
            }
            (name, false) => {
                Probe::Bytes(Payload::parse(name.unwrap_or("redis")).map_err(|e| probe_error(&e))?)
            }
        };
        let expect_reply = args
            .expect_reply
            .as_deref()
            .map(|text| {
                if !udp {
                    return Err(usage(
                        "--expect-reply",
                        "only applies with --connect udp://HOST:PORT",
                    ));
                }
                if !text.starts_with("hex:") {
                    return Err(usage("--expect-reply", "expected hex:BYTES"));
                }
                Payload::parse_datagram(text).map_err(|e| usage("--expect-reply", e.to_string()))
            })
            .transpose()?;
        let interval = args.interval.unwrap_or(defaults.interval);
        let policy = Policy {
            idle: args.idle.unwrap_or(if mode == Mode::KeepWarm {
                interval
            } else {
                defaults.idle
            }),
            interval,
            count: args.count.unwrap_or(3),
            jitter: args.jitter.unwrap_or(0.1),
            mode,
            activity: match args.activity.unwrap_or(ActivityArg::Rx) {
                ActivityArg::Rx => ActivityMode::RxOnly,
                ActivityArg::RxOrTx => ActivityMode::RxOrTx,
            },
            on_dead: match args.on_dead.unwrap_or(OnDeadArg::Report) {
                OnDeadArg::Report => OnDead::Report,
                OnDeadArg::Shutdown => OnDead::Shutdown,
                OnDeadArg::Reset => OnDead::Reset,
            },
            probe,
            min_probe_spacing: args.min_probe_spacing.unwrap_or_default(),
            hung_after: args.hung_after,
            // lull is the only reader of these sockets: replies must not pile up. (It reads a
            // UDP flow's replies itself, to check them against --expect-reply.)
            drain: !udp,
            expect_reply,
        };
        if udp {
            policy
                .validate_datagram(false)
                .map_err(|e| policy_error(&e))?;
        } else {
            policy.validate().map_err(|e| policy_error(&e))?;
        }

        let mut udp_policy = None;
        let job = match args.connect {
            Some(target) => {
                if udp {
                    for (flag, set) in [
                        ("--mqtt-keepalive", args.mqtt_keepalive.is_some()),
                        ("--http2", args.http2.is_some()),
                        ("--reconnect", args.reconnect.is_some()),
                    ] {
                        if set {
                            return Err(usage(flag, "only applies to TCP, not udp://"));
                        }
                    }
                    udp_policy = Some(policy.clone());
                }
                if args.udp.is_some() {
                    return Err(usage("--udp", "only applies to the demo"));
                }
                let address = target.strip_prefix("udp://").unwrap_or(&target);
                Job::Connect(Connect {
                    addr: resolve(&target, address)?,
                    target,
                    mqtt_keepalive: args.mqtt_keepalive,
                    http2: args.http2.unwrap_or(false),
                    reconnect: args.reconnect.unwrap_or(false),
                    udp,
                })
            }
            None => {
                for (flag, set) in [
                    ("--mqtt-keepalive", args.mqtt_keepalive.is_some()),
                    ("--http2", args.http2.is_some()),
                    ("--reconnect", args.reconnect.is_some()),
                ] {
                    if set {
                        return Err(usage(flag, "only applies with --connect"));
                    }
                }
                let share = |flag, value: Option<f64>, default| -> Result<f64> {
                    let v = value.unwrap_or(default);
                    if !(0.0..=100.0).contains(&v) {
                        return Err(usage(
                            flag,
                            format!("must be a percentage from 0 to 100, not {v}"),
                        ));
                    }
                    Ok(v / 100.0)
                };
                let population = Population {
                    busy: share("--busy", args.busy, 5.0)?,
                    hung: share("--hung", args.hung, 1.0)?,
                    closing: share("--closing", args.closing, 1.0)?,
                    udp: share("--udp", args.udp, 10.0)?,
                };
                if population.busy + population.hung + population.closing > 1.0 {
                    return Err(usage(
                        "--busy",
                        "--busy, --hung and --closing add up to more than 100%",
                    ));
                }
                if population.udp > 0.0 {
                    udp_policy = Some(demo_udp_policy(&policy)?);
                }
                Job::Demo(population)
            }
        };

        let engines = args.engines.unwrap_or(1);
        if engines == 0 || engines > 256 {
            return Err(usage("--engines", "must be between 1 and 256"));
        }
        let metrics = args.metrics.map(|m| parse_metrics_addr(&m)).transpose()?;
        Ok(Self {
            job,
            conns,
            duration,
            policy,
            udp_policy,
            engines,
            tick: args.tick.unwrap_or(Duration::from_millis(1)),
            max_probes_per_tick: args.max_probes_per_tick.unwrap_or(1024),
            source: args.source.unwrap_or(SourceArg::Auto),
            cgroup: args.cgroup,
            json: args.json,
            metrics,
            user: args.user,
            quiet: args.quiet.unwrap_or(false),
        })
    }
}

impl RunConfig {
    /// UDP flows the demo holds beside its `conns` TCP connections (0 for `--connect`, whose
    /// flows are its `conns`).
    pub fn side_udp_flows(&self) -> u32 {
        match self.job {
            Job::Demo(population) => (f64::from(self.conns) * population.udp).round() as u32,
            Job::Connect(_) => 0,
        }
    }
}

fn probe_error(e: &PayloadError) -> anyhow::Error {
    usage("--probe", e.to_string())
}

/// Names the flag behind each policy error.
fn policy_error(e: &PolicyError) -> anyhow::Error {
    if *e == PolicyError::Datagram(DatagramPolicyError::NoReplyExpected) {
        return usage(
            "--expect-reply",
            "detect-dead on a UDP flow needs a probe the peer answers: give the start of its \
             answer as --expect-reply hex:BYTES (or use --mode keep-warm)",
        );
    }
    let field = match e {
        PolicyError::ZeroIdle => "--idle",
        PolicyError::ZeroInterval => "--interval",
        PolicyError::Count(_) => "--count",
        PolicyError::Jitter(_) => "--jitter",
        PolicyError::IntervalExceedsIdle { .. } => "--interval",
        PolicyError::SpacingExceedsInterval { .. } => "--min-probe-spacing",
        PolicyError::HungBeforeDead { .. }
        | PolicyError::HungWithKernelProbe
        | PolicyError::HungKeepWarm => "--hung-after",
        PolicyError::KernelGranularity { .. } => "--probe",
        PolicyError::KernelKeepWarm => "--probe",
        PolicyError::TooLarge { field } => match *field {
            "idle" => "--idle",
            "interval" => "--interval",
            "hung_after" => "--hung-after",
            _ => "--min-probe-spacing",
        },
        PolicyError::StreamPayloadTooLarge { .. } => "--probe",
        PolicyError::Datagram(e) => match e {
            DatagramPolicyError::KernelProbe => "--probe",
            DatagramPolicyError::Tiered => "--hung-after",
            DatagramPolicyError::NoReplyExpected => "--expect-reply",
            DatagramPolicyError::Reset | DatagramPolicyError::SharedShutdown => "--on-dead",
            // lull sets drain itself: never a flag's fault.
            DatagramPolicyError::Drain => "--connect",
        },
    };
    usage(field, e.to_string())
}

/// The demo's UDP flows: the TCP connections' timings and mode, with the UDP peers' own
/// probe and answer (`lull-ping`, `lull-pong`), and reported rather than acted on (UDP has no
/// reset, and the demo counts its dead).
fn demo_udp_policy(tcp: &Policy) -> Result<Policy> {
    use lull_harness::udp::{UDP_PROBE, UDP_REPLY};
    let policy = Policy {
        probe: Probe::Bytes(Payload::datagram(UDP_PROBE)?),
        expect_reply: Some(Payload::datagram(UDP_REPLY)?),
        hung_after: None,
        drain: false,
        on_dead: OnDead::Report,
        ..tcp.clone()
    };
    policy
        .validate_datagram(false)
        .map_err(|e| policy_error(&e))?;
    Ok(policy)
}

/// Resolves `--connect`'s `address` (its `target` without `udp://`) to an address. Whether it
/// can be reached is the job's first check, not validation's: validating a flag never touches
/// the network.
fn resolve(target: &str, address: &str) -> Result<SocketAddr> {
    address
        .to_socket_addrs()
        .map_err(|e| usage("--connect", format!("`{target}`: {e}")))?
        .next()
        .ok_or_else(|| usage("--connect", format!("`{target}` resolves to no address")))
}

fn parse_metrics_addr(text: &str) -> Result<SocketAddr> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse()
        .with_context(|| format!("`{text}`"))
        .map_err(|e| usage("--metrics", format!("{e:#}: expected ADDR:PORT or PORT")))
}

#[cfg(test)]
mod fuzz {
    //! No input may panic the parsers: at least 100,000 cases each (a small budget: seconds).

    use clap::Parser;
    use proptest::prelude::*;

    use super::*;
    use crate::run::args::parse_duration;

    /// `lull run` parsed on its own, as clap would.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn validate(args: RunArgs) {
        let _ = RunConfig::from_args(args);
    }

    const KEYS: &[&str] = &[
        "conns",
        "duration",
        "idle",
        "interval",
        "count",
        "jitter",
        "mode",
        "activity",
        "on-dead",
        "probe",
        "expect-reply",
        "min-probe-spacing",
        "hung-after",
        "hung_after",
        "busy",
        "hung",
        "closing",
        "udp",
        "mqtt-keepalive",
        "http2",
        "reconnect",
        "engines",
        "tick",
        "max-probes-per-tick",
        "source",
        "cgroup",
        "json",
        "metrics",
        "user",
        "quiet",
        "bogus",
    ];

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| v.to_string()),
            "[0-9]{1,6}(ns|us|ms|s|m|h|d| |)".prop_map(|v| format!("\"{v}\"")),
            "\\PC{0,12}".prop_map(|v| format!("{v:?}")),
            prop::sample::select(vec![
                "true",
                "false",
                "\"hex:0a0b\"",
                "\"kernel\"",
                "\"redis\"",
                "[1, 2]",
                "{}"
            ])
            .prop_map(str::to_string),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 100_000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn durations_never_panic(text in "\\PC{0,24}") {
            let _ = parse_duration(&text);
        }

        #[test]
        fn config_files_never_panic(
            lines in prop::collection::vec((prop::sample::select(KEYS), value()), 0..8),
            junk in "\\PC{0,16}",
        ) {
            let mut doc: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
            doc.push_str(&junk);
            if let Ok(args) = toml::from_str::<RunArgs>(&doc) {
                validate(args);
            }
        }

        #[test]
        fn command_lines_never_panic(
            args in prop::collection::vec((prop::sample::select(KEYS), "\\PC{0,10}"), 0..6),
        ) {
            let mut argv = vec!["run".to_string()];
            for (k, v) in args {
                argv.push(format!("--{k}"));
                argv.push(v);
            }
            if let Ok(cli) = Cli::try_parse_from(argv) {
                validate(cli.run);
            }
        }
    }
}
