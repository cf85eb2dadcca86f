//! `cargo xtask bench`: every benchmark, its JSON and Markdown reports, charts and a summary.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{
    build_ebpf,
    toolchain::{describe, run_checked, workspace_root},
};

/// The benchmarks, in the order they run (and their binaries in `benches/`).
pub const BENCHES: &[&str] = &[
    "wheel",
    "engine-sim",
    "probe-path",
    "ebpf-overhead",
    "real",
    "host-scale",
    "udp",
];

/// Run the benchmarks (all, or the ones named) and write their reports.
///
/// Each benchmark prints a table; the JSON and Markdown reports, the SVG charts and
/// SUMMARY.md land in target/bench/. Benchmarks print figures: they never fail on timing.
/// Without host-scale the full suite takes about 35 minutes here, most of it `real` (five
/// strategies in two traffic mixes at two sizes); --quick about 4. host-scale's ladder up to a
/// million connections needs about 10 GiB of memory and a quiet machine (see its report for
/// how long each step took); --quick runs it at 20,000 and 50,000.
///
/// Options after `--` go to the one benchmark named, e.g.
/// `cargo xtask bench real --quick -- --mixes standard --strategies lull-ebpf,tokio`.
#[derive(Debug, Args)]
pub struct Options {
    /// Benchmarks to run: wheel, engine-sim, probe-path, ebpf-overhead, real, host-scale,
    /// udp (default: all).
    pub names: Vec<String>,
    /// Shorter runs: every benchmark at a smaller scale.
    #[arg(long)]
    pub quick: bool,
    /// Also copy the reports and charts to docs/bench/, the figures BENCHMARKS.md quotes
    /// (full runs of every benchmark only).
    #[arg(long)]
    pub publish: bool,
    /// host-scale's ladder of connection counts, comma-separated, e.g. 100000,250000,500000,
    /// 1000000 (its default; with --quick, 20000,50000).
    #[arg(long, value_name = "COUNTS")]
    pub ladder: Option<String>,
    /// Options for the one benchmark named (after `--`), e.g. `-- --mixes standard`.
    #[arg(last = true)]
    pub extra: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    // target/bench/ keeps the reports of earlier runs; only a full run of everything replaces
    // all of them, so only that may stand as the published figures.
    if opts.publish
        && (opts.quick || !opts.names.is_empty() || opts.ladder.is_some() || !opts.extra.is_empty())
    {
        bail!(
            "--publish needs the full suite: drop --quick, --ladder, the benchmark names and \
             the options after --"
        );
    }
    if !opts.extra.is_empty() && opts.names.len() != 1 {
        bail!(
            "options after `--` go to one benchmark: name exactly one (got {})",
            opts.names.len()
        );
    }
    for name in &opts.names {
        if !BENCHES.contains(&name.as_str()) {
            bail!(
                "unknown benchmark `{name}`; the benchmarks are: {}",
                BENCHES.join(", ")
            );
        }
    }
    let names: Vec<&str> = if opts.names.is_empty() {
        BENCHES.to_vec()
    } else {
        opts.names.iter().map(String::as_str).collect()
    };
    let root = workspace_root();
    // host-scale runs the `lull` binary (`lull host`, `lull ls`) beside its own.
    build_ebpf::build_release_with_object(&[
        "--package",
        "lull-benches",
        "--bins",
        "--package",
        "lull-cli",
    ])?;
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    for (i, name) in names.iter().enumerate() {
        eprintln!(
            "xtask bench: [{}/{}] {name} ({:.0?} so far)",
            i + 1,
            names.len(),
            started.elapsed()
        );
        let mut cmd = Command::new(binary(name));
        if opts.quick {
            cmd.arg("--quick");
        }
        if *name == "host-scale"
            && let Some(ladder) = &opts.ladder
        {
            cmd.args(["--ladder", ladder]);
        }
        cmd.arg("--out")
            .arg(&out)
            .args(&opts.extra)
            .current_dir(&root);
        run_checked(&mut cmd).with_context(|| format!("benchmark {name} failed"))?;
    }
    let command = format!(
        "cargo xtask bench{}{}{}",
        if opts.quick { " --quick" } else { "" },
        if opts.names.is_empty() {
            String::new()
        } else {
            format!(" {}", opts.names.join(" "))
        },
        if opts.extra.is_empty() {
            String::new()
        } else {
            format!(" -- {}", opts.extra.join(" "))
        }
    );
    let mut summary = Command::new(binary("bench-summary"));
    summary.arg("--dir").arg(&out).args(["--command", &command]);
    run_checked(&mut summary).with_context(|| format!("{} failed", describe(&summary)))?;
    eprintln!(
        "xtask bench: done in {:.0?}; reports, charts and SUMMARY.md in {}",
        started.elapsed(),
        out.display()
    );
    if opts.publish {
        publish(&out, &root.join("docs/bench"))?;
    }
    Ok(())
}

/// Copies this run's reports and charts over the published ones, replacing the directory so
/// that nothing from an older run is left beside them.
fn publish(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to).with_context(|| format!("removing {}", to.display()))?;
    }
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "md" | "json" | "svg"));
        if wanted && let Some(name) = path.file_name() {
            std::fs::copy(&path, to.join(name))
                .with_context(|| format!("copying {} to {}", path.display(), to.display()))?;
        }
    }
    eprintln!("xtask bench: published to {}", to.display());
    Ok(())
}

fn binary(name: &str) -> PathBuf {
    workspace_root().join("target/release").join(name)
}
