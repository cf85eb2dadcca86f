//! The connection fleet: server processes in the watched cgroup holding the accepted ends,
//! client processes in another cgroup holding the connecting ends, all children of this
//! binary (`host-scale serve` and `host-scale connect`). The fd limit is 20,000 per process,
//! so each process holds at most `per_process` sockets.
//!
//! Clients bind each socket to a source address and port chosen here (127.0.0.2 upwards,
//! ports 32768 to 60999 on each) rather than let `connect` pick an ephemeral port: with
//! hundreds of thousands of connections the kernel's search for a free port, which checks
//! every candidate's users, makes each `connect` slower than the last, quadratically.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Socket, Type};

/// The first port of the mass servers (one port per server process).
pub const FIRST_PORT: u16 = 20_000;
/// The port of the server that vanished-client samples connect to.
pub const SAMPLE_PORT: u16 = 19_999;
/// Source address of the sample clients (the ones that vanish).
pub const SAMPLE_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 250);
/// The source ports clients bind to, on each source address.
const SOURCE_PORTS: std::ops::Range<u16> = 32_768..61_000;

/// A child process of this binary, talked to over its stdin and stdout.
pub struct Kid {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Kid {
    /// Starts `host-scale <args>` in `cgroup` (joined between fork and exec).
    pub fn spawn(cgroup: &Path, args: &[String]) -> Result<Self> {
        let procs = std::fs::File::options()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        lull_harness::process::enter_cgroup_on_exec(&mut cmd, &procs);
        let mut child = cmd.spawn().context("starting a host-scale child")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("child stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// Reads one line the child wrote (blocking).
    pub fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("child {} exited", self.child.id());
        }
        Ok(line.trim().to_string())
    }

    /// Sends one line to the child.
    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("child stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every server and client process of the run.
pub struct Fleet {
    watched: std::path::PathBuf,
    clients: std::path::PathBuf,
    per_process: u64,
    servers: Vec<(Kid, u64)>,
    connectors: Vec<Kid>,
    /// The next source address and port to hand out.
    next_source: (u8, u16),
    /// Sample rounds so far (each binds its own ports).
    samples: u16,
    /// Connections made so far (not counting samples).
    pub conns: u64,
}

impl Fleet {
    pub fn new(watched: &Path, clients: &Path, per_process: u64) -> Self {
        Self {
            watched: watched.into(),
            clients: clients.into(),
            per_process,
            servers: Vec::new(),
            connectors: Vec::new(),
            next_source: (2, SOURCE_PORTS.start),
            samples: 0,
            conns: 0,
        }
    }

    /// A run of `count` (source address, first port) for one client process.
    fn sources(&mut self, count: u64) -> Result<(Ipv4Addr, u16)> {
        let (mut ip, mut port) = self.next_source;
        if u64::from(port) + count > u64::from(SOURCE_PORTS.end) {
            (ip, port) = (ip + 1, SOURCE_PORTS.start);
        }
        if ip >= SAMPLE_SOURCE.octets()[3] {
            bail!("out of loopback source addresses");
        }
        self.next_source = (ip, port + count as u16);
        Ok((Ipv4Addr::new(127, 0, 0, ip), port))
    }

    /// Grows the fleet to `target` established connections, within `timeout`.
    pub fn grow_to(&mut self, target: u64, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        let mut pending = Vec::new();
        while self.conns < target {
            // Fill the last server process first, then start new ones.
            let (index, room) = match self.servers.last() {
                Some((_, held)) if *held < self.per_process => {
                    (self.servers.len() - 1, self.per_process - held)
                }
                _ => {
                    let port = FIRST_PORT + self.servers.len() as u16;
                    let mut kid = Kid::spawn(&self.watched, &serve_args(port))?;
                    let ready = kid.line()?;
                    if ready != "listening" {
                        bail!("server on port {port}: {ready}");
                    }
                    self.servers.push((kid, 0));
                    (self.servers.len() - 1, self.per_process)
                }
            };
            let count = room.min(target - self.conns);
            let port = FIRST_PORT + index as u16;
            let (source, first_port) = self.sources(count)?;
            let kid = Kid::spawn(
                &self.clients,
                &connect_args(port, source, first_port, count),
            )?;
            pending.push((kid, count));
            self.servers[index].1 += count;
            self.conns += count;
        }
        for (mut kid, count) in pending {
            let line = kid.line()?;
            if line != format!("connected {count}") {
                bail!(
                    "a client process made fewer connections than asked ({line}) after {:.0?}",
                    started.elapsed()
                );
            }
            self.connectors.push(kid);
        }
        // The servers must have accepted them all (they are in the watched cgroup).
        for (kid, held) in &mut self.servers {
            loop {
                kid.send("count")?;
                let accepted: u64 = kid
                    .line()?
                    .strip_prefix("accepted ")
                    .and_then(|n| n.parse().ok())
                    .context("a server's count")?;
                if accepted >= *held {
                    break;
                }
                if started.elapsed() > timeout {
                    bail!("servers accepted {accepted} of {held} within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Starts the sample server (in the watched cgroup) on [`SAMPLE_PORT`].
    pub fn sample_server(&self) -> Result<Kid> {
        let mut kid = Kid::spawn(&self.watched, &serve_args(SAMPLE_PORT))?;
        let ready = kid.line()?;
        if ready != "listening" {
            bail!("sample server: {ready}");
        }
        Ok(kid)
    }

    /// `count` sample clients from [`SAMPLE_SOURCE`]; their ports follow "connected N".
    pub fn sample_clients(&mut self, count: u64) -> Result<(Kid, Vec<u16>)> {
        // Each round binds fresh ports: the last round's may still be in TIME_WAIT.
        let first = SOURCE_PORTS.start + self.samples * count as u16;
        self.samples += 1;
        let mut args = connect_args(SAMPLE_PORT, SAMPLE_SOURCE, first, count);
        args.push("--print-ports".into());
        let mut kid = Kid::spawn(&self.clients, &args)?;
        let line = kid.line()?;
        if line != format!("connected {count}") {
            bail!("sample clients: {line}");
        }
        let ports = kid
            .line()?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        Ok((kid, ports))
    }
}

fn serve_args(port: u16) -> Vec<String> {
    vec!["serve".into(), "--port".into(), port.to_string()]
}

fn connect_args(port: u16, source: Ipv4Addr, first_port: u16, count: u64) -> Vec<String> {
    vec![
        "connect".into(),
        "--port".into(),
        port.to_string(),
        "--source".into(),
        source.to_string(),
        "--first-port".into(),
        first_port.to_string(),
        "--count".into(),
        count.to_string(),
    ]
}

/// `host-scale serve`: accepts on 127.0.0.1:PORT and holds every connection; answers
/// `count` on stdin with `accepted N`; exits when stdin closes.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[arg(long)]
    port: u16,
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], args.port)).into())?;
    socket.listen(4096)?;
    let listener: std::net::TcpListener = socket.into();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            match stream {
                Ok(s) => {
                    held.push(s);
                    counter.store(held.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    eprintln!("host-scale serve {}: accept: {e}", args_port(&listener));
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
    control(
        || format!("accepted {}", accepted.load(Ordering::Relaxed)),
        "listening",
    )
}

fn args_port(listener: &std::net::TcpListener) -> u16 {
    listener.local_addr().map_or(0, |a| a.port())
}

/// `host-scale connect`: opens COUNT connections to 127.0.0.1:PORT from SOURCE, ports
/// FIRST_PORT upwards, and holds them; prints `connected N` (and the local ports with
/// `--print-ports`); exits when stdin closes.
#[derive(clap::Args, Debug)]
pub struct ConnectArgs {
    #[arg(long)]
    port: u16,
    #[arg(long)]
    source: Ipv4Addr,
    #[arg(long)]
    first_port: u16,
    #[arg(long)]
    count: u64,
    #[arg(long)]
    print_ports: bool,
}

pub fn connect(args: &ConnectArgs) -> Result<()> {
    let target = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, args.port));
    let mut held = Vec::with_capacity(args.count as usize);
    let mut failure = None;
    for i in 0..args.count {
        let from = SocketAddr::from((args.source, args.first_port + i as u16));
        match connect_one(from, target) {
            Ok(s) => held.push(s),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let mut out = std::io::stdout().lock();
    match failure {
        None => writeln!(out, "connected {}", held.len())?,
        Some(e) => writeln!(out, "failed after {}: {e:#}", held.len())?,
    }
    if args.print_ports {
        let ports: Vec<String> = held
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .map(|a| a.port().to_string())
            .collect();
        writeln!(out, "{}", ports.join(" "))?;
    }
    out.flush()?;
    drop(out);
    control(String::new, "")
}

fn connect_one(from: SocketAddr, target: SocketAddr) -> Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    // A port of an earlier run may still be in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket
        .bind(&from.into())
        .with_context(|| format!("bind {from}"))?;
    socket.connect_timeout(&target.into(), Duration::from_secs(10))?;
    Ok(socket.into())
}

/// Prints `ready` (if not empty), then answers each stdin line with `answer()` until stdin
/// closes, then exits the process (dropping every socket at once).
fn control(answer: impl Fn() -> String, ready: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if !ready.is_empty() {
        writeln!(out, "{ready}")?;
        out.flush()?;
    }
    for line in std::io::stdin().lock().lines() {
        if line?.trim() == "count" {
            writeln!(out, "{}", answer())?;
            out.flush()?;
        }
    }
    std::process::exit(0);
}
