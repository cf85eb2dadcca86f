//! [`UdpNat`]: a real UDP NAT in a test-created pair of network namespaces, with its mapping
//! timeouts lowered to seconds, so that a test can watch a mapping expire, or not.
//!
//! Namespace `a` (the client's side) masquerades the UDP it sends to `b` behind a random port
//! of its own (10000-19999, below the ephemeral range, so a mapped port never equals the
//! socket's): the server in `b` sees the mapping's port. The mapping lives as long as
//! conntrack's entry: `nf_conntrack_udp_timeout` (and `_stream`) after the last datagram.
//! Once it has expired, the next datagram gets a new entry, and a new random port.
//!
//! Everything is undone on drop, even when the test fails: the rule is deleted and the
//! sysctls restored inside `a`, then both namespaces are removed (which would take the rule
//! and the per-namespace sysctls with them anyway).

use std::{process::Command, time::Duration};

use crate::netns::NetnsPair;

/// The masquerading rule, as `iptables -t nat` arguments after the action (`-A`/`-D`).
fn rule(b: std::net::Ipv4Addr) -> Vec<String> {
    [
        "POSTROUTING",
        "-p",
        "udp",
        "-d",
        &b.to_string(),
        "-j",
        "MASQUERADE",
        "--to-ports",
        "10000-19999",
        "--random",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

const SYSCTLS: [&str; 2] = [
    "net.netfilter.nf_conntrack_udp_timeout",
    "net.netfilter.nf_conntrack_udp_timeout_stream",
];

fn run_in(ns: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .map_err(|e| format!("ip netns exec {ns} {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "ip netns exec {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A namespace pair whose `a` side is a UDP NAT with `timeout`-second mappings.
pub struct UdpNat {
    /// The namespaces: clients in `a`, servers in `b`.
    pub pair: NetnsPair,
    /// The mapping timeout.
    pub timeout: Duration,
    /// The sysctls' values before the test, restored on drop.
    saved: Vec<(String, String)>,
    rule_added: bool,
}

impl UdpNat {
    /// Builds it, or explains loudly why the test is skipped (not root, no `ip` or
    /// `iptables`); with `LULL_REQUIRE_EBPF=1` a failure fails the test.
    pub fn create(test: &str, timeout: Duration) -> Option<Self> {
        let pair = NetnsPair::create(test)?;
        let mut nat = Self {
            pair,
            timeout,
            saved: Vec::new(),
            rule_added: false,
        };
        match nat.setup() {
            Ok(()) => Some(nat),
            Err(err) if !crate::ebpf_required() => {
                eprintln!(
                    "SKIPPED {test}: a UDP NAT cannot be set up ({err}); set {}=1 to fail \
                     instead",
                    crate::REQUIRE_EBPF
                );
                None
            }
            Err(err) => panic!("{test}: a UDP NAT is required but cannot be set up: {err}"),
        }
    }

    fn setup(&mut self) -> Result<(), String> {
        let a = self.pair.a.clone();
        let mut add = vec![
            "iptables".to_string(),
            "-t".into(),
            "nat".into(),
            "-A".into(),
        ];
        add.extend(rule(self.pair.addr_b));
        run_in(&a, &add.iter().map(String::as_str).collect::<Vec<_>>())?;
        self.rule_added = true;
        // The rule loads conntrack, which makes the sysctls exist in this namespace.
        let secs = self.timeout.as_secs().max(1).to_string();
        for name in SYSCTLS {
            let before = run_in(&a, &["sysctl", "-n", name])?;
            self.saved.push((name.to_string(), before));
            run_in(&a, &["sysctl", "-w", &format!("{name}={secs}")])?;
        }
        Ok(())
    }
}

impl Drop for UdpNat {
    fn drop(&mut self) {
        let a = self.pair.a.clone();
        for (name, value) in self.saved.drain(..) {
            let _ = run_in(&a, &["sysctl", "-w", &format!("{name}={value}")]);
        }
        if self.rule_added {
            let mut delete = vec![
                "iptables".to_string(),
                "-t".into(),
                "nat".into(),
                "-D".into(),
            ];
            delete.extend(rule(self.pair.addr_b));
            let _ = run_in(&a, &delete.iter().map(String::as_str).collect::<Vec<_>>());
        }
        // `pair` drops next and removes both namespaces.
    }
}
