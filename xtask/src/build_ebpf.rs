//! `cargo xtask build-ebpf`: build lull's BPF object from a fresh machine.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result, ensure};
use clap::Args;

use crate::toolchain::{
    ensure_bpf_linker, ensure_rust_src, nightly, nightly_sysroot, run_checked, workspace_root,
};

/// Where the object lands; `engine/lull/build.rs` embeds it from here when it exists.
pub const OBJECT_PATH: &str = "target/bpf/lull.bpf.o";

/// Build the eBPF object (installs nightly's rust-src and a bpf-linker on first use).
///
/// The object is written to `target/bpf/lull.bpf.o`, where the engine's build embeds it. Without
/// it the engine still builds, and uses the TCP_INFO fallback source at run time.
#[derive(Debug, Args)]
pub struct Options {
    /// Build without BTF. Only for kernels whose BTF loader rejects the object; the socket
    /// storage map needs BTF, so such a build cannot be loaded by lull.
    #[arg(long)]
    pub no_btf: bool,
}

pub fn run(opts: &Options) -> Result<PathBuf> {
    let root = workspace_root();
    let sysroot = nightly_sysroot()?;
    ensure_rust_src(&sysroot)?;
    let linker = ensure_bpf_linker(&sysroot)?;
    let linker_dir = linker
        .parent()
        .context("bpf-linker has no parent directory")?;

    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![linker_dir.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(dirs).context("PATH contains an invalid entry")?;

    // BTF is not optional in practice: SK_STORAGE maps are only created with BTF key/value
    // types, and `#[btf_map]` definitions live in BTF. `--cpu v3` allows atomic OR/AND on
    // the flags word (Linux 5.12+).
    let mut rustflags = vec!["-Cdebuginfo=2", "-Ctarget-cpu=v3"];
    if !opts.no_btf {
        rustflags.push("-Clink-arg=--btf");
    }
    let target_dir = root.join("target/bpf-build");
    let mut cmd = nightly("cargo");
    cmd.current_dir(&root)
        .args(["build", "--package", "lull-ebpf", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", path)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"));
    run_checked(&mut cmd).context("building the eBPF program failed (see the output above)")?;

    let built = target_dir.join("bpfel-unknown-none/release/lull");
    ensure!(
        built.exists(),
        "the BPF build did not produce {}",
        built.display()
    );
    let object = root.join(OBJECT_PATH);
    fs::create_dir_all(object.parent().expect("OBJECT_PATH has a parent"))?;
    let bytes = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    // The engine's build script watches the object's mtime: rewriting identical bytes would
    // recompile the engine and everything on top of it at every xtask command.
    if fs::read(&object).ok().as_deref() != Some(bytes.as_slice()) {
        // Write, then rename: the build script must never see a half-written object.
        let tmp = object.with_extension("o.tmp");
        fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &object).with_context(|| format!("writing {}", object.display()))?;
    }
    eprintln!("xtask: BPF object at {}", object.display());
    Ok(object)
}

/// Builds the BPF object, then `cargo build --release` with `cargo_args` (a package and its
/// targets), so the binaries embed the object. Returns the release directory they land in.
pub fn build_release_with_object(cargo_args: &[&str]) -> Result<PathBuf> {
    let root = workspace_root();
    run(&Options { no_btf: false })?;
    run_checked(
        std::process::Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--release"])
            .args(cargo_args),
    )?;
    Ok(root.join("target/release"))
}
