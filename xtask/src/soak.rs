//! `cargo xtask soak`: churn connections through an engine for a while and check for leaks.

use std::process::Command;

use anyhow::Result;
use clap::Args;

use crate::{
    build_ebpf,
    toolchain::{run_checked, workspace_root},
};

/// Open, watch, probe and drop thousands of connections continuously for --minutes, then
/// report RSS growth and leaked slots, fds and BPF rows (each must be 0). `cargo xtask test`
/// runs one minute of it; the full run is 10.
#[derive(Debug, Args)]
pub struct Options {
    /// How long to churn.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
}

pub fn run(opts: &Options) -> Result<()> {
    let root = workspace_root();
    let release =
        build_ebpf::build_release_with_object(&["--package", "lull-tests", "--bin", "soak"])?;
    let json = root.join("target/soak.json");
    run_checked(
        Command::new(release.join("soak"))
            .args(["--minutes", &opts.minutes.to_string()])
            .arg("--json")
            .arg(&json),
    )
}
