//! `lull run`'s flags, the TOML file that mirrors them, and their validation.
//!
//! Every flag is optional here so that three layers can be merged: a flag given on the command
//! line wins over the same key in `--config`, which wins over the built-in default. Validation
//! turns each problem into a one-line [`UsageError`](crate::UsageError) naming the flag.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use lull::{ActivityMode, Mode, OnDead, Payload, PayloadError, Policy, PolicyError, Probe};
use serde::Deserialize;

use crate::usage;

/// Parses `30s`, `5m`, `250ms`, `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}`: {e} (use e.g. 30s, 5m, 250ms)"))
}

/// Which activity source to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceArg {
    /// eBPF when possible, TCP_INFO otherwise.
    Auto,
    /// eBPF or fail.
    Ebpf,
    /// TCP_INFO.
    TcpInfo,
}

/// Dead-peer detection or keep-warm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModeArg {
    /// Probe idle connections and report dead peers.
    DetectDead,
    /// Send a probe whenever nothing was sent for --interval; never report dead.
    KeepWarm,
}

/// Which traffic counts as activity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivityArg {
    /// Only received payload.
    Rx,
    /// Payload either way.
    RxOrTx,
}

/// What to do with a dead connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnDeadArg {
    /// Report only.
    Report,
    /// shutdown(SHUT_RDWR).
    Shutdown,
    /// Abort with a RST.
    Reset,
}

/// Run the engine: the self-contained demo, or keep a real server's connections alive.
///
/// Without --connect, lull starts a loopback population of peer processes (busy, answering,
/// hung and closing peers), holds --conns connections to them, and reports what it found:
/// probes sent, wakeups that found traffic, dead and closed peers against the numbers it
/// started, detection latency, CPU and memory per connection.
///
/// With --connect, it opens --conns connections to a real server and keeps them open past the
/// server's own idle timeout, reporting each dead connection.
///
/// Durations read like 30s, 5m or 250ms. Every flag can also be set in --config FILE (TOML,
/// keys spelled like the flags without the dashes in front: `idle = "30s"`); flags win.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunArgs {
    /// Read settings from this TOML file; flags on the command line override it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Keep the connections of a real server alive instead of running the demo.
    #[arg(long, value_name = "HOST:PORT")]
    pub connect: Option<String>,

    /// Connections to hold [default: 10000 for the demo, 100 with --connect].
    #[arg(long)]
    pub conns: Option<u32>,

    /// How long to run; 0 runs until interrupted [default: 30s for the demo, 0 with --connect].
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub duration: Option<Duration>,

    /// Silence after which a connection is probed [default: 5s demo, 30s --connect].
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub idle: Option<Duration>,

    /// Time between probes [default: 1s demo, 5s --connect].
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub interval: Option<Duration>,

    /// Unanswered probes before a peer is dead [default: 3].
    #[arg(long)]
    pub count: Option<u32>,

    /// Random fraction of --idle by which each arm is brought forward [default: 0.1].
    #[arg(long)]
    pub jitter: Option<f64>,

    /// Dead-peer detection or keep-warm [default: detect-dead].
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,

    /// Which traffic postpones probing [default: rx].
    #[arg(long, value_enum)]
    pub activity: Option<ActivityArg>,

    /// What to do with a dead connection [default: report].
    #[arg(long, value_enum)]
    pub on_dead: Option<OnDeadArg>,

    /// The probe: redis, mqtt, http2, ws, ws-client, hex:BYTES or kernel [default: redis].
    #[arg(long)]
    pub probe: Option<String>,

    /// Never probe one connection more often than this [default: 0s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub min_probe_spacing: Option<Duration>,

    /// Demo: percentage of busy peers (traffic more often than --idle) [default: 5].
    #[arg(long, value_name = "PERCENT")]
    pub busy: Option<f64>,

    /// Demo: percentage of peers that hang (stop answering, socket open) [default: 1].
    #[arg(long, value_name = "PERCENT")]
    pub hung: Option<f64>,

    /// Demo: percentage of peers that close or reset [default: 1].
    #[arg(long, value_name = "PERCENT")]
    pub closing: Option<f64>,

    /// --connect: send an MQTT CONNECT with this keepalive first, so brokers accept PINGREQ.
    #[arg(long, value_name = "SECS")]
    pub mqtt_keepalive: Option<u16>,

    /// --connect: send the HTTP/2 client preface and SETTINGS first.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub http2: Option<bool>,

    /// --connect: reconnect dead or closed connections, with exponential backoff and jitter.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub reconnect: Option<bool>,

    /// Engine threads (connections are spread over them) [default: 1].
    #[arg(long)]
    pub engines: Option<usize>,

    /// Timer resolution [default: 1ms].
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub tick: Option<Duration>,

    /// Most probes sent per tick; more wait for the next tick [default: 1024].
    #[arg(long)]
    pub max_probes_per_tick: Option<u32>,

    /// Activity source [default: auto].
    #[arg(long, value_enum)]
    pub source: Option<SourceArg>,

    /// cgroup v2 directory to attach to [default: the hierarchy's root, from /proc/mounts].
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,

    /// Write the final report as JSON to this file too.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,

    /// Serve Prometheus metrics on this address (a bare port binds 127.0.0.1).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// After attaching the BPF programs, switch to this user and drop every capability.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// No live progress line on stderr.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub quiet: Option<bool>,
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Demo population shares, as fractions.
#[derive(Clone, Copy, Debug)]
pub struct Population {
    pub busy: f64,
    pub hung: f64,
    pub closing: f64,
}

/// Settings of `--connect`.
#[derive(Clone, Debug)]
pub struct Connect {
    pub target: String,
    pub addr: SocketAddr,
    pub mqtt_keepalive: Option<u16>,
    pub http2: bool,
    pub reconnect: bool,
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

impl RunArgs {
    /// Fills every unset flag from `other` (the config file).
    fn or(self, other: RunArgs) -> RunArgs {
        macro_rules! merge {
            ($($field:ident),* $(,)?) => {
                RunArgs { config: self.config, $($field: self.$field.or(other.$field)),* }
            };
        }
        merge!(
            connect,
            conns,
            duration,
            idle,
            interval,
            count,
            jitter,
            mode,
            activity,
            on_dead,
            probe,
            min_probe_spacing,
            busy,
            hung,
            closing,
            mqtt_keepalive,
            http2,
            reconnect,
            engines,
            tick,
            max_probes_per_tick,
            source,
            cgroup,
            json,
            metrics,
            user,
            quiet,
        )
    }

    /// Merges the config file (if any) and defaults, and validates everything.
    pub fn resolve(self) -> Result<RunConfig> {
        let args = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| usage("--config", format!("{}: {e}", path.display())))?;
                let file: RunArgs = toml::from_str(&text).map_err(|e| {
                    usage(
                        "--config",
                        format!("{}: {}", path.display(), one_line(&e.to_string())),
                    )
                })?;
                self.or(file)
            }
            None => self,
        };
        args.validate()
    }

    fn validate(self) -> Result<RunConfig> {
        let connecting = self.connect.is_some();
        let defaults = if connecting {
            (100, None, Duration::from_secs(30), Duration::from_secs(5))
        } else {
            (
                10_000,
                Some(Duration::from_secs(30)),
                Duration::from_secs(5),
                Duration::from_secs(1),
            )
        };
        let conns = self.conns.unwrap_or(defaults.0);
        if conns == 0 {
            return Err(usage("--conns", "must be at least 1"));
        }
        let duration = match self.duration {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => defaults.1,
        };
        if !connecting && duration.is_none() {
            return Err(usage(
                "--duration",
                "the demo needs a duration (it reports at the end)",
            ));
        }

        let mode = match self.mode.unwrap_or(ModeArg::DetectDead) {
            ModeArg::DetectDead => Mode::DetectDead,
            ModeArg::KeepWarm => Mode::KeepWarm,
        };
        let probe = match self.probe.as_deref().unwrap_or("redis") {
            "kernel" => Probe::Kernel,
            "callback" => {
                return Err(usage(
                    "--probe",
                    "callback probes need an application; use the library",
                ));
            }
            name => Probe::Bytes(Payload::parse(name).map_err(|e| probe_error(&e))?),
        };
        let interval = self.interval.unwrap_or(defaults.3);
        let policy = Policy {
            idle: self.idle.unwrap_or(if mode == Mode::KeepWarm {
                interval
            } else {
                defaults.2
            }),
            interval,
            count: self.count.unwrap_or(3),
            jitter: self.jitter.unwrap_or(0.1),
            mode,
            activity: match self.activity.unwrap_or(ActivityArg::Rx) {
                ActivityArg::Rx => ActivityMode::RxOnly,
                ActivityArg::RxOrTx => ActivityMode::RxOrTx,
            },
            on_dead: match self.on_dead.unwrap_or(OnDeadArg::Report) {
                OnDeadArg::Report => OnDead::Report,
                OnDeadArg::Shutdown => OnDead::Shutdown,
                OnDeadArg::Reset => OnDead::Reset,
            },
            probe,
            min_probe_spacing: self.min_probe_spacing.unwrap_or_default(),
            // lull is the only reader of these sockets: replies must not pile up.
            drain: true,
        };
        policy.validate().map_err(|e| policy_error(&e))?;

        let job = match self.connect {
            Some(target) => Job::Connect(Connect {
                addr: resolve(&target)?,
                target,
                mqtt_keepalive: self.mqtt_keepalive,
                http2: self.http2.unwrap_or(false),
                reconnect: self.reconnect.unwrap_or(false),
            }),
            None => {
                for (flag, set) in [
                    ("--mqtt-keepalive", self.mqtt_keepalive.is_some()),
                    ("--http2", self.http2.is_some()),
                    ("--reconnect", self.reconnect.is_some()),
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
                    busy: share("--busy", self.busy, 5.0)?,
                    hung: share("--hung", self.hung, 1.0)?,
                    closing: share("--closing", self.closing, 1.0)?,
                };
                if population.busy + population.hung + population.closing > 1.0 {
                    return Err(usage(
                        "--busy",
                        "--busy, --hung and --closing add up to more than 100%",
                    ));
                }
                Job::Demo(population)
            }
        };

        let engines = self.engines.unwrap_or(1);
        if engines == 0 || engines > 256 {
            return Err(usage("--engines", "must be between 1 and 256"));
        }
        let metrics = self.metrics.map(|m| parse_metrics_addr(&m)).transpose()?;
        Ok(RunConfig {
            job,
            conns,
            duration,
            policy,
            engines,
            tick: self.tick.unwrap_or(Duration::from_millis(1)),
            max_probes_per_tick: self.max_probes_per_tick.unwrap_or(1024),
            source: self.source.unwrap_or(SourceArg::Auto),
            cgroup: self.cgroup,
            json: self.json,
            metrics,
            user: self.user,
            quiet: self.quiet.unwrap_or(false),
        })
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn probe_error(e: &PayloadError) -> anyhow::Error {
    usage("--probe", e.to_string())
}

/// Names the flag behind each policy error.
fn policy_error(e: &PolicyError) -> anyhow::Error {
    let field = match e {
        PolicyError::ZeroIdle => "--idle",
        PolicyError::ZeroInterval => "--interval",
        PolicyError::Count(_) => "--count",
        PolicyError::Jitter(_) => "--jitter",
        PolicyError::IntervalExceedsIdle { .. } => "--interval",
        PolicyError::SpacingExceedsInterval { .. } => "--min-probe-spacing",
        PolicyError::KernelGranularity { .. } => "--probe",
        PolicyError::KernelKeepWarm => "--probe",
        PolicyError::TooLarge { field } => match *field {
            "idle" => "--idle",
            "interval" => "--interval",
            _ => "--min-probe-spacing",
        },
    };
    usage(field, e.to_string())
}

fn resolve(target: &str) -> Result<SocketAddr> {
    let addr = target
        .to_socket_addrs()
        .map_err(|e| usage("--connect", format!("`{target}`: {e}")))?
        .next()
        .ok_or_else(|| usage("--connect", format!("`{target}` resolves to no address")))?;
    // An address that cannot be reached is a usage error, not a run with zero connections.
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| usage("--connect", format!("{target}: {e}")))?;
    Ok(addr)
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

    /// `lull run` parsed on its own, as clap would.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    /// Validation without the one check that touches the network.
    fn validate_offline(mut args: RunArgs) {
        args.connect = None;
        let _ = args.validate();
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
        "min-probe-spacing",
        "busy",
        "hung",
        "closing",
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
                validate_offline(args);
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
                validate_offline(cli.run);
            }
        }
    }
}
