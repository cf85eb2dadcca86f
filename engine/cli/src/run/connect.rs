//! `lull run --connect HOST:PORT`: keep a real server's connections open past its own idle
//! timeout, report each dead connection, and (with `--reconnect`) replace it.

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lull::{ConnId, Event, Watched};

use super::{
    config::Connect,
    report::{self, JobFacts, Report},
    session::Session,
    tracker::Tracker,
};
use crate::usage::usage;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the first check that the server can be reached waits.
const REACHABLE_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Opens one connection and performs the protocol's opening, if any.
fn open(target: &Connect, serial: u64) -> Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&target.addr, HANDSHAKE_TIMEOUT)
        .with_context(|| format!("connecting to {}", target.target))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    if let Some(keepalive) = target.mqtt_keepalive {
        mqtt_connect(
            &mut stream,
            keepalive,
            &format!("lull-{}-{serial}", std::process::id()),
        )?;
    }
    if target.http2 {
        http2_preface(&mut stream)?;
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// MQTT 3.1.1 CONNECT (clean session, the given keepalive), then waits for a CONNACK that
/// accepts it. Brokers refuse PINGREQ on a connection that has not sent CONNECT.
fn mqtt_connect(stream: &mut TcpStream, keepalive: u16, client_id: &str) -> Result<()> {
    let id = client_id.as_bytes();
    let mut packet = vec![0x10, (10 + 2 + id.len()) as u8];
    packet.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02]);
    packet.extend_from_slice(&keepalive.to_be_bytes());
    packet.extend_from_slice(&(id.len() as u16).to_be_bytes());
    packet.extend_from_slice(id);
    stream.write_all(&packet).context("sending MQTT CONNECT")?;
    let mut connack = [0u8; 4];
    stream
        .read_exact(&mut connack)
        .context("waiting for the broker's CONNACK")?;
    if connack[0] != 0x20 || connack[3] != 0 {
        bail!("the broker refused MQTT CONNECT (CONNACK {connack:02x?})");
    }
    Ok(())
}

/// The HTTP/2 client preface and an empty SETTINGS frame, then the server's SETTINGS is read
/// and acknowledged, as the protocol requires before PING frames mean anything.
fn http2_preface(stream: &mut TcpStream) -> Result<()> {
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")?;
    stream.write_all(&[0, 0, 0, 0x04, 0, 0, 0, 0, 0])?;
    loop {
        let mut header = [0u8; 9];
        stream
            .read_exact(&mut header)
            .context("waiting for the server's HTTP/2 SETTINGS")?;
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len.min(1 << 20)];
        stream.read_exact(&mut payload)?;
        let (kind, flags) = (header[3], header[4]);
        if kind == 0x07 {
            bail!("the server sent GOAWAY during the HTTP/2 preface");
        }
        if kind == 0x04 && flags & 0x01 == 0 {
            stream.write_all(&[0, 0, 0, 0x04, 0x01, 0, 0, 0, 0])?;
            return Ok(());
        }
    }
}

/// Full-jitter exponential backoff: uniform in `[0, min(max, base * 2^attempt)]`.
fn backoff(attempt: u32, rng: &mut u64) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    cap.mul_f64((*rng % 10_000) as f64 / 10_000.0)
}

pub fn run(session: &Session<'_>, target: &Connect) -> Result<Report> {
    if target.udp {
        return super::connect_udp::run(session, target);
    }
    // An address that cannot be reached is a usage error, not a run with zero connections.
    TcpStream::connect_timeout(&target.addr, REACHABLE_TIMEOUT)
        .map_err(|e| usage("--connect", format!("{}: {e}", target.target)))?;
    let config = session.config;
    let policy = &config.policy;
    if let Some(keepalive) = target.mqtt_keepalive {
        let limit = Duration::from_secs(u64::from(keepalive)).mul_f64(1.5);
        if policy.idle >= limit {
            tracing::warn!(
                "--idle {:?} is not below the broker's limit of 1.5 x keepalive ({limit:?}): it \
                 will disconnect idle clients before lull probes them",
                policy.idle
            );
        }
    }
    let n = u64::from(config.conns);
    let mut tracker = Tracker::new(policy, n as usize);
    let mut live: HashMap<ConnId, Watched<TcpStream>> = HashMap::with_capacity(n as usize);
    let mut serial = 0u64;
    let rss_before = lull_harness::process::rss_bytes()?;
    for i in 0..n {
        if session.interrupted() {
            break;
        }
        serial += 1;
        let stream = open(target, serial)?;
        let watched = session
            .engine
            .watch(stream, policy)
            .context("watching a connection")?;
        tracker.expect(watched.id(), None, None);
        live.insert(watched.id(), watched);
        if i % 1_000 == 999 && !config.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())
        {
            eprint!("\rconnecting: {}/{n}", i + 1);
        }
    }
    let rss_after = lull_harness::process::rss_bytes()?;
    eprintln!(
        "\rholding {} connections to {} (activity source: {}); {}",
        live.len(),
        target.target,
        session.engine.source_kind(),
        match config.duration {
            Some(d) => format!("running for {d:?}"),
            None => "Ctrl-C to stop".into(),
        }
    );

    session.restart();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut retry: Vec<(Instant, u32)> = Vec::new();
    let mut reconnects = 0u64;
    while !session.over() {
        for event in session.pump_events(&mut tracker, Duration::from_millis(100)) {
            let lost = match event {
                Event::Dead {
                    id,
                    after,
                    probes,
                    tier,
                } => {
                    tracing::warn!(
                        "connection {id} to {} is dead ({} tier): silent for {after:.1?}, \
                         {probes} probes unanswered",
                        target.target,
                        tier.name()
                    );
                    Some(id)
                }
                Event::Closed { id, reason } => {
                    tracing::warn!("connection {id} to {} closed: {reason:?}", target.target);
                    Some(id)
                }
                _ => None,
            };
            if let Some(id) = lost.filter(|_| target.reconnect) {
                live.remove(&id);
                tracker.forget(id);
                retry.push((Instant::now() + backoff(0, &mut rng), 0));
            }
        }
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = retry.drain(..).partition(|(at, _)| *at <= now);
        retry = later;
        for (_, attempt) in due {
            serial += 1;
            match open(target, serial).and_then(|s| {
                session
                    .engine
                    .watch(s, policy)
                    .context("watching a connection")
            }) {
                Ok(watched) => {
                    reconnects += 1;
                    tracker.expect(watched.id(), None, None);
                    live.insert(watched.id(), watched);
                }
                Err(err) => {
                    let wait = backoff(attempt + 1, &mut rng);
                    tracing::warn!(
                        "reconnecting to {}: {err:#}; retrying in {wait:.1?}",
                        target.target
                    );
                    retry.push((Instant::now() + wait, attempt + 1));
                }
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
    let facts = JobFacts {
        job: "connect",
        policy,
        connections: n,
        by_role: BTreeMap::new(),
        idle_probes: None,
        expected_dead: None,
        expected_closed: None,
        reconnects,
        rss_growth: Some((rss_after.saturating_sub(rss_before), n)),
        elapsed: session.elapsed(),
        interrupted: session.interrupted(),
        udp: None,
    };
    let mut report = report::build(session.engine, &tracker, facts);
    report.connections = live.len() as u64;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_full_jitter() {
        let mut rng = 7;
        for attempt in 0..20 {
            let cap = BACKOFF_BASE
                .saturating_mul(1 << attempt.min(16))
                .min(BACKOFF_MAX);
            for _ in 0..50 {
                assert!(backoff(attempt, &mut rng) <= cap);
            }
        }
        let waits: Vec<_> = (0..50).map(|_| backoff(20, &mut rng)).collect();
        assert!(
            waits.iter().any(|w| *w > BACKOFF_MAX / 2),
            "jitter spans the range"
        );
        assert!(waits.iter().any(|w| *w < BACKOFF_MAX / 2));
    }
}
