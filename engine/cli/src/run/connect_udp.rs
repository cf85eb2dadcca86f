//! `lull run --connect udp://HOST:PORT`: hold UDP flows to a real peer, a connected socket
//! each (so a NAT mapping each), keeping them warm or finding the peer dead.
//!
//! lull owns the sockets: it reads every datagram the peer sends (see `datagrams`), checking
//! it against `--expect-reply`. UDP has no connection to lose, so there is nothing to
//! reconnect: a dead flow is reported, and watched for a revival.

use std::{collections::BTreeMap, net::UdpSocket, time::Duration};

use anyhow::{Context as _, Result};
use lull::{Event, Probe};

use super::{
    config::Connect,
    datagrams::DatagramFlows,
    report::{self, JobFacts, Report, UdpFacts},
    session::Session,
    tracker::Tracker,
};
use crate::usage::usage;

pub fn run(session: &Session<'_>, target: &Connect) -> Result<Report> {
    let config = session.config;
    let policy = config
        .udp_policy
        .as_ref()
        .context("udp:// without a UDP policy")?;
    let n = u64::from(config.conns);
    let mut tracker = Tracker::new(policy, n as usize);
    let local: std::net::SocketAddr = if target.addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let rss_before = lull_harness::process::rss_bytes()?;
    let mut flows = Vec::with_capacity(n as usize);
    for _ in 0..n {
        if session.interrupted() {
            break;
        }
        let socket = UdpSocket::bind(local).context("binding a UDP socket")?;
        // A UDP connect only picks the route and the peer: no packet goes out.
        socket
            .connect(target.addr)
            .map_err(|e| usage("--connect", format!("{}: {e}", target.target)))?;
        let watched = session
            .engine
            .watch(socket, policy)
            .context("watching a UDP flow")?;
        tracker.expect(watched.id(), None, None);
        flows.push(watched);
    }
    let rss_after = lull_harness::process::rss_bytes()?;
    let reply = policy.expect_reply.as_ref().map(|r| r.as_bytes().to_vec());
    let flows = DatagramFlows::start(flows, reply)?;
    let observers = flows.observers();
    eprintln!(
        "holding {} UDP flows to {} ({}, seen by {}); {}",
        flows.flows().len(),
        target.target,
        match policy.mode {
            lull::Mode::KeepWarm => format!("keep-warm every {:?} of silence", policy.interval),
            lull::Mode::DetectDead => format!("detect-dead after {:?}", policy.detection_bound()),
        },
        observers.keys().cloned().collect::<Vec<_>>().join(" and "),
        match config.duration {
            Some(d) => format!("running for {d:?}"),
            None => "Ctrl-C to stop".into(),
        }
    );
    if let Probe::Bytes(payload) = &policy.probe {
        tracing::debug!(
            "probe {payload:?}, expected reply {:?}",
            policy.expect_reply
        );
    }

    session.restart();
    while !session.over() {
        for event in session.pump_events(&mut tracker, Duration::from_millis(100)) {
            match event {
                Event::Dead {
                    id, after, probes, ..
                } => tracing::warn!(
                    "UDP flow {id} to {} is dead: silent for {after:.1?}, {probes} probes \
                     unanswered",
                    target.target
                ),
                Event::Revived { id } => {
                    tracing::info!("UDP flow {id} to {} answers again", target.target);
                }
                _ => {}
            }
        }
        if !config.quiet {
            tracker.progress(session.elapsed(), &session.engine.stats(), None, false);
        }
    }
    if !config.quiet {
        tracker.progress(session.elapsed(), &session.engine.stats(), None, true);
        tracker.finish_progress();
    }
    let (replies, other_datagrams) = flows.counted();
    let connections = flows.flows().len() as u64;
    // Stop watching before the engine's totals are read: after this nothing more is sent, so
    // the report counts every datagram the peer got.
    drop(flows);
    let facts = JobFacts {
        job: "connect",
        policy,
        connections,
        by_role: BTreeMap::new(),
        idle_probes: None,
        expected_dead: None,
        expected_closed: None,
        reconnects: 0,
        rss_growth: Some((rss_after.saturating_sub(rss_before), connections)),
        elapsed: session.elapsed(),
        interrupted: session.interrupted(),
        udp: Some(UdpFacts {
            policy,
            flows: connections,
            by_role: BTreeMap::new(),
            observers,
            replies,
            other_datagrams,
            busy_probes: None,
            expected_dead: None,
            primary: true,
        }),
    };
    Ok(report::build(session.engine, &tracker, facts))
}
