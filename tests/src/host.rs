//! Support for host-mode tests: cgroups and servers the test creates, a `lull host` daemon
//! under test, and reading a server's socket options from outside it.
//!
//! Everything made here is removed on drop, also when the test fails: processes in a test
//! cgroup are killed and the cgroup removed, and the daemon's pins are uninstalled.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{REQUIRE_EBPF, cli::lull_bin, ebpf_required};

/// Skips (returns `None` with a loud message) or, with `LULL_REQUIRE_EBPF=1`, fails.
pub fn unavailable<T>(test: &str, what: &str) -> Option<T> {
    assert!(
        !ebpf_required(),
        "{test}: {REQUIRE_EBPF}=1 but {what} is unavailable"
    );
    eprintln!("SKIPPED {test}: {what} is unavailable; set {REQUIRE_EBPF}=1 to fail instead");
    None
}

/// A cgroup v2 directory made for one test, removed (with every process left in it killed)
/// on drop.
pub struct TestCgroup {
    /// The directory.
    pub path: PathBuf,
}

impl TestCgroup {
    /// Makes `lull-test-<pid>-<n>-<name>` under the cgroup v2 root.
    pub fn create(test: &str, name: &str) -> Option<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let Ok(root) = lull::activity::cgroup2_root() else {
            return unavailable(test, "cgroup v2");
        };
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("lull-test-{}-{n}-{name}", std::process::id()));
        match std::fs::create_dir(&path) {
            Ok(()) => Some(Self { path }),
            Err(e) => unavailable(test, &format!("creating a cgroup ({e})")),
        }
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) on a process the test put in its own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A server process in a test cgroup and a test network namespace.
pub struct NsServer {
    /// Its port.
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl NsServer {
    /// Runs `program args` in cgroup `cgroup`, then network namespace `netns`: the process
    /// joins the cgroup first (`ip netns exec` would remount /sys and hide it), then enters
    /// the namespace with `nsenter --net`.
    pub fn spawn(
        cgroup: &TestCgroup,
        netns: &str,
        port: u16,
        program: &Path,
        args: &[String],
    ) -> Self {
        let procs = std::fs::File::options()
            .write(true)
            .open(cgroup.path.join("cgroup.procs"))
            .expect("opening the cgroup's cgroup.procs");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{netns}"))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        lull_harness::process::enter_cgroup_on_exec(&mut cmd, &procs);
        let child = cmd.spawn().expect("spawn nsenter");
        Self {
            port,
            child,
            dir: PathBuf::new(),
        }
    }

    /// `redis-server` listening on every address of `netns` (IPv4 and IPv6), with its own
    /// keepalive off (`--tcp-keepalive 0`) so that any keepalive is lull's.
    pub fn redis(test: &str, cgroup: &TestCgroup, netns: &str, port: u16) -> Option<Self> {
        let binary = find(test, "redis-server")?;
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "0.0.0.0 ::",
            "--tcp-keepalive",
            "0",
            "--timeout",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        Some(Self::spawn(cgroup, netns, port, &binary, &args))
    }

    /// `mosquitto` listening on every address of `netns`, anonymous clients allowed.
    pub fn mosquitto(test: &str, cgroup: &TestCgroup, netns: &str, port: u16) -> Option<Self> {
        let binary = find(test, "mosquitto")?;
        let dir =
            std::env::temp_dir().join(format!("lull-host-mqtt-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mosquitto config dir");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port}\nallow_anonymous true\npersistence false\n"),
        )
        .expect("write mosquitto.conf");
        let mut server = Self::spawn(
            cgroup,
            netns,
            port,
            &binary,
            &["-c".to_string(), conf.display().to_string()],
        );
        server.dir = dir;
        Some(server)
    }

    /// The server's process id (nsenter execs it, so it is the child's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn find(test: &str, binary: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(binary))
        .find(|p| p.is_file())
        .or_else(|| unavailable(test, &format!("{binary} (cargo xtask test installs it)")))
}

/// Connects to `addr` from the current thread's namespace, retrying while the server starts
/// (bounded: 10 s).
pub fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "connecting to {addr}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The keepalive options of a socket, as `getsockopt` returns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepaliveOpts {
    /// SO_KEEPALIVE.
    pub keepalive: i32,
    /// TCP_KEEPIDLE, seconds.
    pub idle: i32,
    /// TCP_KEEPINTVL, seconds.
    pub interval: i32,
    /// TCP_KEEPCNT.
    pub count: i32,
    /// TCP_USER_TIMEOUT, ms.
    pub user_timeout: i32,
}

/// The options of a socket this process holds.
pub fn opts_of(fd: &impl AsRawFd) -> KeepaliveOpts {
    let get = |level, name| {
        let mut v: libc::c_int = -1;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid out-pointer and length for an int option.
        let rc =
            unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut v).cast(), &mut len) };
        assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
        v
    };
    KeepaliveOpts {
        keepalive: get(libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        idle: get(libc::SOL_TCP, libc::TCP_KEEPIDLE),
        interval: get(libc::SOL_TCP, libc::TCP_KEEPINTVL),
        count: get(libc::SOL_TCP, libc::TCP_KEEPCNT),
        user_timeout: get(libc::SOL_TCP, libc::TCP_USER_TIMEOUT),
    }
}

/// The options of the socket process `pid` holds for its connection with `peer_port`,
/// read by duplicating the server's fd into this process (`pidfd_getfd`).
pub fn server_opts(pid: u32, peer_port: u16) -> KeepaliveOpts {
    let fd = server_socket(pid, peer_port)
        .unwrap_or_else(|| panic!("process {pid} holds no socket connected to port {peer_port}"));
    opts_of(&fd)
}

fn server_socket(pid: u32, peer_port: u16) -> Option<OwnedFd> {
    // /proc/PID/net/tcp{,6} list the sockets of PID's network namespace: find the inode of
    // the connection to `peer_port`.
    let mut inode = None;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = f
                .get(2)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if port == Some(peer_port) && f.get(3) == Some(&"01") {
                inode = f.get(9).and_then(|i| i.parse::<u64>().ok());
            }
        }
    }
    let inode = inode?;
    let target = format!("socket:[{inode}]");
    let fd_num = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == target.as_str()))?
        .file_name()
        .to_str()?
        .parse::<i32>()
        .ok()?;
    // SAFETY: pidfd_open on a pid, then pidfd_getfd on the returned fd; both return new fds
    // (or -1) that this function then owns.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        if pidfd < 0 {
            return None;
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd_num, 0);
        (fd >= 0).then(|| OwnedFd::from_raw_fd(fd as i32))
    }
}

/// `ss -tno` run in network namespace `netns`: one line per socket, with its timer.
pub fn ss_timers(netns: &str) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{netns}"))
        .args(["--", "ss", "-tnoH", "state", "established"])
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs iptables in `netns` (rules vanish with the namespace).
pub fn iptables_in(netns: &str, args: &[&str]) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{netns}"))
        .args(["--", "iptables"])
        .args(args)
        .output()
        .expect("run iptables");
    assert!(
        out.status.success(),
        "iptables {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `lull host` process under test, with its own instance name (so its pins and lock are
/// its own) and events file. Dropping it kills it and uninstalls the instance.
pub struct HostDaemon {
    /// The instance name.
    pub instance: String,
    /// The rule file.
    pub config: PathBuf,
    /// The events file (`--events`).
    pub events: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
    child: Option<Child>,
}

impl HostDaemon {
    /// Writes `rules` and starts `lull host`, waiting (up to 30 s) until it says it runs.
    /// `None` (after a loud message) if it cannot start and eBPF is not required.
    pub fn start(test: &str, rules: &str) -> Option<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("test{}x{n}", std::process::id());
        let dir = std::env::temp_dir();
        let daemon = Self {
            config: dir.join(format!("lull-{tag}.toml")),
            events: dir.join(format!("lull-{tag}.events")),
            log: dir.join(format!("lull-{tag}.log")),
            instance: tag,
            child: None,
        };
        let _ = std::fs::remove_file(&daemon.events);
        std::fs::write(&daemon.config, rules).expect("write the rule file");
        let mut daemon = daemon;
        if daemon.spawn() {
            return Some(daemon);
        }
        unavailable(
            test,
            &format!("lull host (it said: {})", daemon.log_text().trim()),
        )
    }

    /// Starts (again) the daemon process; returns whether it came up (within 30 s).
    pub fn spawn(&mut self) -> bool {
        let _ = std::fs::remove_file(&self.log);
        let log = File::create(&self.log).expect("daemon log");
        let child = Command::new(lull_bin())
            .args(["host", "--config"])
            .arg(&self.config)
            .arg("--events")
            .arg(&self.events)
            .args(["--instance", &self.instance])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lull host");
        self.child = Some(child);
        self.wait_log(Duration::from_secs(30), "lull host (")
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (or the process exits); returns whether it did.
    pub fn wait_log(&mut self, timeout: Duration, needle: &str) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            if exited || Instant::now() > deadline {
                return self.log_text().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    /// SIGKILL, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The verdict lines written so far.
    pub fn events(&self) -> Vec<Value> {
        let Ok(file) = File::open(&self.events) else {
            return Vec::new();
        };
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("event line {l:?}: {e}")))
            .collect()
    }

    /// Waits (bounded) for a verdict whose peer port is `peer_port`.
    pub fn wait_verdict(&self, peer_port: u16, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .events()
                .into_iter()
                .find(|e| peer_port_of(e) == Some(peer_port));
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `lull ls --json` of this instance.
    pub fn ls(&self) -> Vec<Value> {
        let out = Command::new(lull_bin())
            .args(["ls", "--json", "--instance", &self.instance])
            .output()
            .expect("run lull ls");
        assert!(
            out.status.success(),
            "lull ls: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("lull ls --json prints JSON");
        v.as_array().expect("a JSON array").clone()
    }
}

/// The port of an event's or `ls` row's `peer`.
pub fn peer_port_of(v: &Value) -> Option<u16> {
    v["peer"].as_str()?.rsplit(':').next()?.parse().ok()
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new(lull_bin())
            .args(["host", "--uninstall", "--instance", &self.instance])
            .output();
        for f in [&self.config, &self.events, &self.log] {
            let _ = std::fs::remove_file(f);
        }
    }
}
