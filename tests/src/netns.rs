//! A pair of network namespaces joined by a veth link, created by the test and removed on
//! drop: the only place tests may black-hole traffic.

use std::{
    fs::File,
    net::{Ipv4Addr, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use lull_harness::{Behaviour, PeerServer, socket::listener};

use crate::{REQUIRE_EBPF, ebpf_required};

/// Namespaces `a` and `b`, with `10.77.N.1` in `a` and `10.77.N.2` in `b`.
pub struct NetnsPair {
    /// Name of the client-side namespace.
    pub a: String,
    /// Name of the server-side namespace.
    pub b: String,
    /// Address of the `a` side.
    pub addr_a: Ipv4Addr,
    /// Address of the `b` side.
    pub addr_b: Ipv4Addr,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetnsPair {
    /// Creates the pair, or explains loudly why the test is skipped (not root, no `ip`).
    /// With `LULL_REQUIRE_EBPF=1` (CI), a failure is a test failure.
    pub fn create(test: &str) -> Option<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = (pid % 200) as u8;
        let pair = Self {
            a: format!("lull{pid}x{n}a"),
            b: format!("lull{pid}x{n}b"),
            addr_a: Ipv4Addr::new(10, 77, tag, (n % 60 * 4 + 1) as u8),
            addr_b: Ipv4Addr::new(10, 77, tag, (n % 60 * 4 + 2) as u8),
        };
        match pair.setup() {
            Ok(()) => Some(pair),
            Err(err) if !ebpf_required() => {
                eprintln!(
                    "SKIPPED {test}: network namespaces unavailable ({err}); set \
                     {REQUIRE_EBPF}=1 to fail instead"
                );
                None
            }
            Err(err) => panic!("{test}: network namespaces are required but unavailable: {err}"),
        }
    }

    fn setup(&self) -> Result<(), String> {
        let (va, vb) = (format!("{}v", self.a), format!("{}v", self.b));
        let (va, vb) = (
            &va[va.len().saturating_sub(15)..],
            &vb[vb.len().saturating_sub(15)..],
        );
        run(&["ip", "netns", "add", &self.a])?;
        run(&["ip", "netns", "add", &self.b])?;
        run(&["ip", "link", "add", va, "type", "veth", "peer", "name", vb])?;
        run(&["ip", "link", "set", va, "netns", &self.a])?;
        run(&["ip", "link", "set", vb, "netns", &self.b])?;
        for (ns, dev, addr) in [(&self.a, va, self.addr_a), (&self.b, vb, self.addr_b)] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                dev,
            ])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Runs `f` on a thread that has entered namespace `ns`; sockets it creates belong to
    /// that namespace for their whole life.
    pub fn within<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = File::open(format!("/var/run/netns/{ns}"))
                        .expect("open the namespace handle");
                    // SAFETY: setns on a namespace fd; it only changes this thread's namespace.
                    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("the namespace thread panicked")
        })
    }

    /// A peer with `behaviour`, listening in `b`.
    pub fn peer_in_b(&self, behaviour: Behaviour) -> PeerServer {
        let listener = self.within(&self.b, || {
            listener((self.addr_b, 0).into()).expect("a listener in b")
        });
        PeerServer::start_on(listener, behaviour)
    }

    /// `n` connections from `a` to `peer` (in `b`), across the veth.
    pub fn connect_from_a(&self, peer: &PeerServer, n: usize) -> Vec<TcpStream> {
        let addr = peer.addr();
        self.within(&self.a, || {
            (0..n)
                .map(|_| TcpStream::connect(addr).expect("connect across the veth"))
                .collect()
        })
    }

    /// Drops every packet into and out of `b`: the peer's host vanishes without a FIN or RST.
    pub fn blackhole_b(&self) {
        for chain in ["INPUT", "OUTPUT"] {
            run(&[
                "ip", "netns", "exec", &self.b, "iptables", "-A", chain, "-j", "DROP",
            ])
            .expect("iptables DROP inside the test namespace");
        }
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth, which removes the other end.
        let _ = run(&["ip", "netns", "del", &self.a]);
        let _ = run(&["ip", "netns", "del", &self.b]);
    }
}
