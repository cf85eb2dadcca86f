//! `cargo xtask run`: build everything and run the `lull` binary.

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{
    build_ebpf,
    toolchain::{describe, is_root},
};

/// Build the BPF object and the `lull` binary (release), then run it. With no arguments it
/// runs `lull run`: the self-contained 10,000-connection demonstration.
///
/// Loading eBPF needs root: when not root, the binary runs under `sudo -E`.
#[derive(Debug, Args)]
pub struct Options {
    /// Arguments for `lull` (default: `run`). Put them after `--`, e.g.
    /// `cargo xtask run -- run --conns 20000`.
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    let binary =
        build_ebpf::build_release_with_object(&["--package", "lull-cli", "--bin", "lull"])?
            .join("lull");
    let args = if opts.args.is_empty() {
        vec!["run".to_string()]
    } else {
        opts.args.clone()
    };
    let mut cmd = if is_root() {
        Command::new(&binary)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.arg("-E").arg(&binary);
        sudo
    };
    cmd.args(&args);
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", describe(&cmd)))?;
    if !status.success() {
        // lull has already printed its own error; pass its exit code through.
        match status.code() {
            Some(code) => std::process::exit(code),
            None => bail!("{} was killed by a signal", describe(&cmd)),
        }
    }
    Ok(())
}
