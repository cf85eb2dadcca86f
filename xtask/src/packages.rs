//! Debian packages the tests use as real peers and tools, installed on demand.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::toolchain::{run_checked, which};

/// (command that must exist, Debian package that provides it).
pub const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("redis-server", "redis-server"),
    ("mosquitto", "mosquitto"),
];

/// Installs the packages whose commands are missing, with `apt-get` (as root).
pub fn ensure(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(cmd, _)| which(cmd).is_err() && !in_sbin(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::toolchain::is_root() {
        bail!(
            "these Debian packages are needed and missing: {}; install them with \
             `sudo apt-get install -y {}` or run as root",
            missing.join(", "),
            missing.join(" ")
        );
    }
    which("apt-get").with_context(|| {
        format!(
            "apt-get not found: install {} with your package manager",
            missing.join(", ")
        )
    })?;
    eprintln!("xtask: installing {} (apt-get)", missing.join(", "));
    run_checked(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install failed")
}

/// `PATH` for non-root users often lacks `/usr/sbin`, where `ip` and `iptables` live.
fn in_sbin(cmd: &str) -> bool {
    ["/usr/sbin", "/sbin"]
        .iter()
        .any(|dir| std::path::Path::new(dir).join(cmd).is_file())
}
