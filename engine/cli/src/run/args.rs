//! `lull run`'s flags, and the TOML file that mirrors them.
//!
//! Every flag is optional here so that three layers can be merged: a flag given on the command
//! line wins over the same key in `--config`, which wins over the built-in default (applied by
//! [`RunConfig::from_args`](super::config::RunConfig::from_args), which also validates).

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::usage::usage;

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
/// server's own idle timeout, reporting each dead connection. With --connect udp://HOST:PORT
/// it holds --conns UDP flows (a connected socket each, so a NAT mapping each): keep-warm
/// sends --probe whenever a flow sent nothing for --interval; detect-dead needs the start of
/// the peer's answer, --expect-reply.
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

    /// Keep the connections of a real server alive instead of running the demo;
    /// udp://HOST:PORT holds UDP flows instead.
    #[arg(long, value_name = "[udp://]HOST:PORT")]
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

    /// The probe: redis, mqtt, http2, ws, ws-client, hex:BYTES or kernel [default: redis]. For
    /// udp:// a payload is required: hex:BYTES, up to 1200 bytes.
    #[arg(long)]
    pub probe: Option<String>,

    /// udp://: the start of the peer's answer to --probe, hex:BYTES. Detect-dead needs it: UDP
    /// has no acknowledgements, so only an answer tells a dead peer from an idle one.
    #[arg(long, value_name = "hex:BYTES")]
    pub expect_reply: Option<String>,

    /// Never probe one connection more often than this [default: 0s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub min_probe_spacing: Option<Duration>,

    /// Tiered probing: leave dead peers to the kernel's keepalive (idle, interval, count) and
    /// probe only connections that received nothing for this long, to find hung applications.
    /// At least idle + 2 x count x interval; not with --probe kernel [default: off].
    #[arg(long, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration", alias = "hung_after")]
    pub hung_after: Option<Duration>,

    /// Demo: percentage of busy peers (traffic more often than --idle) [default: 5].
    #[arg(long, value_name = "PERCENT")]
    pub busy: Option<f64>,

    /// Demo: percentage of peers that hang (stop answering, socket open) [default: 1].
    #[arg(long, value_name = "PERCENT")]
    pub hung: Option<f64>,

    /// Demo: percentage of peers that close or reset [default: 1].
    #[arg(long, value_name = "PERCENT")]
    pub closing: Option<f64>,

    /// Demo: UDP flows held alongside the TCP connections, as a percentage of --conns; the
    /// same --busy and --hung shares of them are busy and hang [default: 10].
    #[arg(long, value_name = "PERCENT")]
    pub udp: Option<f64>,

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

    /// cgroup v2 directory to attach to, and to open lull's sockets from (lull moves into it)
    /// [default: a cgroup of lull's own, a child of the one it was started in].
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
            expect_reply,
            min_probe_spacing,
            hung_after,
            busy,
            hung,
            closing,
            udp,
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

    /// Fills every flag not given on the command line from `--config`, if there is one.
    pub fn with_config_file(self) -> Result<RunArgs> {
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
        Ok(args)
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
