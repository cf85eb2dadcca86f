//! Real servers from Debian's packages, started on loopback ports for one test and stopped
//! (killed, and continued first if stopped) on drop.

use std::{
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{REQUIRE_EBPF, ebpf_required};

/// A server process on `127.0.0.1:port`.
pub struct Server {
    /// Its port.
    pub port: u16,
    child: Child,
    _dir: Option<PathBuf>,
}

/// A free loopback port (bound and released; good enough for a test).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn find(binary: &str, test: &str) -> Option<PathBuf> {
    let found = ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| PathBuf::from(d).join(binary))
        .find(|p| p.is_file());
    match found {
        Some(p) => Some(p),
        None if !ebpf_required() => {
            eprintln!(
                "SKIPPED {test}: {binary} is not installed (cargo xtask test installs it); set {REQUIRE_EBPF}=1 to fail instead"
            );
            None
        }
        None => {
            panic!("{test}: {binary} is required but not installed (cargo xtask test installs it)")
        }
    }
}

impl Server {
    /// `redis-server` with `timeout` (seconds of client idleness before the server closes the
    /// connection; 0 = never).
    pub fn redis(test: &str, timeout: u32) -> Option<Self> {
        let binary = find("redis-server", test)?;
        let port = free_port();
        let child = Command::new(binary)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--timeout",
                &timeout.to_string(),
            ])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .args([
                "--maxclients",
                "2000",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        Some(Self::ready(port, child, None))
    }

    /// `mosquitto` on a loopback listener with anonymous clients allowed.
    pub fn mosquitto(test: &str) -> Option<Self> {
        let binary = find("mosquitto", test)?;
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("lull-mosquitto-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mosquitto config dir");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n"),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        Some(Self::ready(port, child, Some(dir)))
    }

    fn ready(port: u16, child: Child, dir: Option<PathBuf>) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "server on port {port} did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            port,
            child,
            _dir: dir,
        }
    }

    /// `host:port` to hand to `lull run --connect`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sends a signal (SIGSTOP to freeze the application while its kernel keeps ACKing).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self._dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Sends an MQTT 3.1.1 CONNECT (clean session) with client id `id` and MQTT keepalive
/// `keepalive_s` (0: the broker never drops an idle client; else it drops one silent for 1.5x
/// that), and asserts the broker's CONNACK accepts it.
pub fn mqtt_connect(s: &mut std::net::TcpStream, id: &str, keepalive_s: u8) {
    use std::io::{Read as _, Write as _};
    let mut packet = vec![
        0x10,
        (12 + id.len()) as u8,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        2,
        0,
        keepalive_s,
    ];
    packet.extend_from_slice(&(id.len() as u16).to_be_bytes());
    packet.extend_from_slice(id.as_bytes());
    s.write_all(&packet).expect("send CONNECT");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).expect("read CONNACK");
    assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK accepted");
}
