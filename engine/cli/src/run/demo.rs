//! The self-contained demonstration: a loopback population of peer processes with a known mix
//! of behaviours, and a report of what the engine found.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader},
    net::{TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lull::Watched;

use super::{
    config::Population,
    datagrams::DatagramFlows,
    report::{self, JobFacts, Report, UdpFacts},
    session::Session,
    tracker::{Tally, Tracker},
};
use crate::schedule::{READY_PREFIX, Role, Script};

/// Connections one peer process accepts: well under the 20,000 fds a process may hold here.
const PER_PROCESS: u64 = 15_000;

/// The peer processes; they exit when dropped (their stdin closes).
struct Peers {
    children: Vec<Child>,
    /// Per process, the port of each role, in `Role::ALL` order.
    ports: Vec<[u16; 4]>,
    /// Per process, the UDP port of each role, in `Role::UDP` order.
    udp_ports: Vec<[u16; 3]>,
}

impl Drop for Peers {
    fn drop(&mut self) {
        for child in &mut self.children {
            drop(child.stdin.take());
        }
        for child in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(2);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Starts the peer processes, in `outside` (the cgroup lull came from, given as its open
/// `cgroup.procs`) when lull runs in a cgroup of its own: peers are the far end, and their
/// sockets must not run lull's programs.
fn spawn_population(processes: u64, script: &Script, outside: Option<File>) -> Result<Peers> {
    let exe = std::env::current_exe().context("finding the lull binary to start peers")?;
    let script = serde_json::to_string(script)?;
    let mut population = Peers {
        children: Vec::new(),
        ports: Vec::new(),
        udp_ports: Vec::new(),
    };
    for _ in 0..processes {
        let mut command = Command::new(&exe);
        command
            .args(["peer", "--script", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(procs) = &outside {
            lull_harness::process::enter_cgroup_on_exec(&mut command, procs);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting a peer process ({})", exe.display()))?;
        let stdout = child.stdout.take().context("peer stdout")?;
        population.children.push(child);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the peer's ports")?;
        let ports: Vec<u16> = line
            .strip_prefix(READY_PREFIX)
            .with_context(|| format!("a peer process did not start: {line:?}"))?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        ensure!(
            ports.len() == 7,
            "a peer process reported {} ports",
            ports.len()
        );
        population
            .ports
            .push([ports[0], ports[1], ports[2], ports[3]]);
        population.udp_ports.push([ports[4], ports[5], ports[6]]);
    }
    Ok(population)
}

/// Roles for `n` connections in the requested shares, in a scattered (but fixed) order.
fn roles(n: u64, population: Population) -> (Vec<Role>, BTreeMap<Role, u64>) {
    let share = |f: f64| (n as f64 * f).round() as u64;
    let (busy, hung, closing) = (
        share(population.busy),
        share(population.hung),
        share(population.closing),
    );
    let answering = n - busy - hung - closing;
    let counts = BTreeMap::from([
        (Role::Answering, answering),
        (Role::Busy, busy),
        (Role::Hung, hung),
        (Role::Closing, closing),
    ]);
    let mut roles: Vec<Role> = counts
        .iter()
        .flat_map(|(role, k)| std::iter::repeat_n(*role, *k as usize))
        .collect();
    // Fisher-Yates with a fixed seed: the mix is spread over the connect order, the same
    // every run.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for i in (1..roles.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        roles.swap(i, (state % (i as u64 + 1)) as usize);
    }
    (roles, counts)
}

/// The demo's UDP flows, their roles, and how many of each.
type UdpShare = (DatagramFlows, Vec<Role>, BTreeMap<Role, u64>);

/// Opens the demo's UDP flows (none with `--udp 0`): a connected socket each, to the UDP peer
/// of its role, announced with a first datagram so that the peer knows it (a busy peer sends
/// to it, a hung one counts its hang from it).
fn open_udp_flows(
    session: &Session<'_>,
    peers: &Peers,
    script: &Script,
    population: Population,
    tracker: &mut Tracker,
) -> Result<Option<UdpShare>> {
    let Some(policy) = &session.config.udp_policy else {
        return Ok(None);
    };
    let n = u64::from(session.config.side_udp_flows());
    let (roles, mut by_role) = roles(
        n,
        Population {
            closing: 0.0,
            ..population
        },
    );
    by_role.retain(|_, count| *count > 0);
    let mut flows = Vec::with_capacity(roles.len());
    for (i, role) in roles.iter().enumerate() {
        let process = i % peers.udp_ports.len();
        let port = peers.udp_ports[process][Role::UDP.iter().position(|r| r == role).unwrap_or(0)];
        let socket = UdpSocket::bind(("127.0.0.1", 0)).context("binding a UDP socket")?;
        socket.connect(("127.0.0.1", port))?;
        let local = socket.local_addr()?.port();
        let watched = session
            .engine
            .watch(socket, policy)
            .context("watching a demo UDP flow")?;
        watched.send(b"lull-hello").context("greeting a UDP peer")?;
        let hangs_at = (*role == Role::Hung).then(|| Instant::now() + script.hang_after(local));
        tracker.expect_udp(watched.id(), *role, hangs_at);
        flows.push(watched);
    }
    let reply = policy.expect_reply.as_ref().map(|r| r.as_bytes().to_vec());
    Ok(Some((DatagramFlows::start(flows, reply)?, roles, by_role)))
}

pub fn run(session: &Session<'_>, population: Population) -> Result<Report> {
    let config = session.config;
    let policy = &config.policy;
    let n = u64::from(config.conns);
    let duration = config.duration.context("the demo needs a duration")?;
    // The demo's dead are hung applications: the application tier's bound.
    let bound = policy.hung_bound();
    let margin = (duration / 10).max(Duration::from_secs(1));
    let ms = |d: Duration| d.as_millis() as u64;
    let hang_to = duration.saturating_sub(bound + margin);
    let close_to = duration.saturating_sub(policy.idle + margin);
    if population.hung > 0.0 && hang_to < margin {
        tracing::warn!(
            "--duration {duration:?} is too short for hung peers to be found: detection takes up to \
             the policy's bound = {bound:?}"
        );
    }
    let script = Script {
        busy_every_ms: ms(policy.idle / 4).max(10),
        hang_ms: (ms(margin.min(hang_to)), ms(hang_to)),
        close_ms: (ms(margin.min(close_to)), ms(close_to)),
    };
    let (roles, by_role) = roles(n, population);
    let processes = n.div_ceil(PER_PROCESS);
    eprintln!(
        "lull demo: {n} connections ({} answering, {} busy, {} hung, {} closing) to {processes} \
         peer process(es); idle {:?}, interval {:?}, count {}, for {duration:?}",
        by_role[&Role::Answering],
        by_role[&Role::Busy],
        by_role[&Role::Hung],
        by_role[&Role::Closing],
        policy.idle,
        policy.interval,
        policy.count,
    );
    let outside = session.cgroup.map(|c| c.outside_procs()).transpose()?;
    let peers = spawn_population(processes, &script, outside)?;

    let mut tracker = Tracker::new(policy, n as usize);
    let mut handles: Vec<Watched<TcpStream>> = Vec::with_capacity(n as usize);
    let rss_before = lull_harness::process::rss_bytes()?;
    let setup = Instant::now();
    for (i, role) in roles.iter().enumerate() {
        if session.interrupted() {
            break;
        }
        let process = i % peers.ports.len();
        let port = peers.ports[process][Role::ALL.iter().position(|r| r == role).unwrap_or(0)];
        let stream = TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("connecting to peer port {port}"))?;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?.port();
        let watched = session
            .engine
            .watch(stream, policy)
            .context("watching a demo connection")?;
        let hangs_at = (*role == Role::Hung).then(|| Instant::now() + script.hang_after(local));
        tracker.expect(watched.id(), Some(*role), hangs_at);
        handles.push(watched);
        if i % 1_000 == 999 && !config.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())
        {
            eprint!("\rconnecting: {}/{n}", i + 1);
        }
    }
    // The engine takes watches in asynchronously; measure once it has all of them.
    let settle = Instant::now() + Duration::from_secs(5);
    while session.engine.stats().watched < handles.len() as u64 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(10));
    }
    let rss_after = lull_harness::process::rss_bytes()?;
    let udp = open_udp_flows(session, &peers, &script, population, &mut tracker)?;
    if !config.quiet {
        eprintln!(
            "\rconnected {} in {:.1?}{}; running for {duration:?}",
            handles.len(),
            setup.elapsed(),
            udp.as_ref().map_or(String::new(), |(flows, _, _)| format!(
                ", and {} UDP flows",
                flows.flows().len()
            )),
        );
    }
    if handles.len() as u64 != n && !session.interrupted() {
        bail!("only {} of {n} connections were opened", handles.len());
    }

    session.restart();
    let expected = Tally {
        dead: by_role[&Role::Hung],
        closed: by_role[&Role::Closing],
    };
    while !session.over() {
        session.pump_events(&mut tracker, Duration::from_millis(100));
        if !config.quiet {
            tracker.progress(
                session.elapsed(),
                &session.engine.stats(),
                Some(expected),
                false,
            );
        }
    }
    session.pump_events(&mut tracker, Duration::ZERO);
    if !config.quiet {
        tracker.progress(
            session.elapsed(),
            &session.engine.stats(),
            Some(expected),
            true,
        );
        tracker.finish_progress();
    }
    // Answering peers are idle between probes: their probe rate is what the policy promises.
    let answering: Vec<_> = handles
        .iter()
        .zip(&roles)
        .filter(|(_, role)| **role == Role::Answering)
        .map(|(w, _)| u64::from(w.stats().probes_sent))
        .collect();
    let udp_facts = match (&udp, &config.udp_policy) {
        (Some((flows, roles, by_role)), Some(udp_policy)) => {
            let (replies, other_datagrams) = flows.counted();
            let busy_probes = flows
                .flows()
                .iter()
                .zip(roles)
                .filter(|(_, role)| **role == Role::Busy)
                .map(|(w, _)| u64::from(w.stats().probes_sent))
                .sum();
            Some(UdpFacts {
                policy: udp_policy,
                flows: flows.flows().len() as u64,
                by_role: by_role.clone(),
                observers: flows.observers(),
                replies,
                other_datagrams,
                busy_probes: Some(busy_probes),
                expected_dead: Some(by_role.get(&Role::Hung).copied().unwrap_or(0)),
                primary: false,
            })
        }
        _ => None,
    };
    let facts = JobFacts {
        job: "demo",
        idle_probes: Some((answering.iter().sum(), answering.len() as u64)),
        policy,
        connections: handles.len() as u64,
        by_role,
        expected_dead: Some(expected.dead),
        expected_closed: Some(expected.closed),
        reconnects: 0,
        rss_growth: Some((rss_after.saturating_sub(rss_before), handles.len() as u64)),
        elapsed: session.elapsed(),
        interrupted: session.interrupted(),
        udp: udp_facts,
    };
    // The UDP flows are read from their own stats above; once they are no longer watched,
    // nothing more is sent to them, and the engine's UDP totals are final.
    drop(udp);
    let report = report::build(session.engine, &tracker, facts);
    drop(handles);
    drop(peers);
    Ok(report)
}
