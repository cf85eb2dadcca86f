//! `cargo xtask test`: every test, from a fresh machine.

use std::process::Command;

use anyhow::{Context as _, Result};
use clap::Args;

use crate::{
    build_ebpf, packages, soak,
    toolchain::{is_root, run_checked, workspace_root},
};

/// Run every test: install the Debian packages the tests use as peers, build the BPF object,
/// check formatting and lints, run the unit, integration and property tests (the overload
/// tests in a release build), and a one-minute churn soak.
///
/// As root, the eBPF and network-namespace tests run; otherwise they are skipped with a
/// message, unless LULL_REQUIRE_EBPF=1 (as in CI) turns that into a failure.
#[derive(Debug, Args)]
pub struct Options {
    /// Skip `cargo fmt --check` and `cargo clippy`.
    #[arg(long)]
    pub no_lint: bool,
    /// Arguments passed on to `cargo test` after `--`, e.g. a test-name filter.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    let root = workspace_root();
    let step = |n: u32, what: &str| eprintln!("xtask test: [{n}/5] {what}");

    step(1, "Debian packages used by the tests");
    packages::ensure(packages::TEST_PACKAGES)?;

    step(2, "BPF object");
    build_ebpf::run(&build_ebpf::Options { no_btf: false })?;

    if opts.no_lint {
        step(3, "lints skipped (--no-lint)");
    } else {
        step(3, "cargo fmt --check and cargo clippy -D warnings");
        run_checked(
            Command::new("cargo")
                .current_dir(&root)
                .args(["fmt", "--all", "--", "--check"]),
        )
        .context("code is not formatted: run `cargo fmt --all`")?;
        run_checked(Command::new("cargo").current_dir(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }

    step(4, "cargo test");
    if !is_root() {
        eprintln!(
            "xtask test: not root: eBPF and network-namespace tests will be skipped (or fail \
             with LULL_REQUIRE_EBPF=1)"
        );
    }
    // The CLI tests run the real binary; build it first and tell them where it is.
    run_checked(Command::new("cargo").current_dir(&root).args([
        "build",
        "--package",
        "lull-cli",
        "--bin",
        "lull",
    ]))?;
    run_checked(
        Command::new("cargo")
            .current_dir(&root)
            .args(["test", "--workspace"])
            .args(&opts.cargo_args)
            .env("LULL_BIN", root.join("target/debug/lull")),
    )?;
    // The overload tests bound the engine loop's time per turn: meaningless unoptimized.
    run_checked(Command::new("cargo").current_dir(&root).args([
        "test",
        "--release",
        "--package",
        "lull-tests",
        "--test",
        "overload",
    ]))?;

    step(5, "a one-minute churn soak");
    soak::run(&soak::Options { minutes: 1.0 })?;
    eprintln!("xtask test: all passed");
    Ok(())
}
