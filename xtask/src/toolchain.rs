//! Finding and bootstrapping the toolchain pieces the BPF build needs.
//!
//! Nothing here hard-codes an LLVM or Rust version: the LLVM library is found in the nightly
//! sysroot, and its major version picks bpf-linker's `llvm-N` feature.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

/// The bpf-linker release known to build against nightly's LLVM here (see DESIGN.md).
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// The toolchain that builds the BPF object.
pub const NIGHTLY: &str = "nightly";

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Runs `cmd`, failing with its full command line if it cannot start or exits non-zero.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", describe(cmd)))?;
    ensure!(status.success(), "{} failed: {status}", describe(cmd));
    Ok(())
}

/// Runs `cmd` and returns its stdout, failing with its stderr if it exits non-zero.
pub fn output_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("could not start {}", describe(cmd)))?;
    ensure!(
        out.status.success(),
        "{} failed: {}\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// A `Command` for a tool of the nightly toolchain, insulated from the stable toolchain that
/// runs xtask (cargo exports `RUSTC` and friends to its children).
pub fn nightly(tool: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", NIGHTLY, tool]);
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// The nightly sysroot, or an error that says how to get nightly.
pub fn nightly_sysroot() -> Result<PathBuf> {
    which("rustup").context(
        "rustup is not on PATH; lull's BPF build needs rustup to reach the nightly toolchain",
    )?;
    let sysroot = output_checked(nightly("rustc").args(["--print", "sysroot"])).context(
        "the nightly toolchain is missing; install it with `rustup toolchain install nightly`",
    )?;
    Ok(PathBuf::from(sysroot))
}

/// Installs nightly's `rust-src` (needed by `-Z build-std=core`) unless it is already there.
pub fn ensure_rust_src(sysroot: &Path) -> Result<()> {
    let marker = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if marker.exists() {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src for the {NIGHTLY} toolchain");
    run_checked(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        NIGHTLY,
    ]))
    .context("could not install rust-src; run `rustup component add rust-src --toolchain nightly`")
}

/// The nightly toolchain's own LLVM shared library and its major version.
pub fn nightly_llvm(sysroot: &Path) -> Result<(PathBuf, u32)> {
    let lib = sysroot.join("lib");
    let mut found = Vec::new();
    for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        // `libLLVM.so.22.1-rust-1.97.0-nightly` carries the soname bpf-linker links against.
        if let Some(rest) = name.strip_prefix("libLLVM.so.")
            && let Some(major) = rest.split('.').next().and_then(|m| m.parse().ok())
        {
            found.push((lib.join(&name), major));
        }
    }
    found.sort();
    found.pop().with_context(|| {
        format!(
            "no libLLVM.so.* in {}; the nightly toolchain looks incomplete, reinstall it with \
             `rustup toolchain install nightly --force`",
            lib.display()
        )
    })
}

/// Returns a `bpf-linker` built against nightly's LLVM, building it once into `target/`.
///
/// The cache key is the LLVM library's file name, so a new nightly gets a new linker and an
/// unchanged one costs nothing.
pub fn ensure_bpf_linker(sysroot: &Path) -> Result<PathBuf> {
    let (llvm_lib, major) = nightly_llvm(sysroot)?;
    let llvm_name = llvm_lib.file_name().unwrap_or(OsStr::new("llvm"));
    let cache = workspace_root().join("target/bpf-linker").join(format!(
        "{BPF_LINKER_VERSION}-{}",
        llvm_name.to_string_lossy()
    ));
    let linker = cache.join("bin/bpf-linker");
    if linker.exists() {
        return Ok(linker);
    }

    which("cc").context("a C compiler (`cc`) is needed to build bpf-linker; install gcc")?;
    // bpf-linker's build script finds LLVM as `$LLVM_PREFIX/lib/libLLVM.so`; nightly ships the
    // library under its versioned name only, so give it a prefix with both names.
    let prefix = cache.join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in [llvm_name, OsStr::new("libLLVM.so")] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm_lib, &link)
            .with_context(|| format!("linking {} to {}", link.display(), llvm_lib.display()))?;
    }

    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {} (once; about a minute)",
        llvm_lib.display()
    );
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "bpf-linker",
        "--locked",
        "--version",
        BPF_LINKER_VERSION,
    ])
    .args([
        "--no-default-features",
        "--features",
        &format!("llvm-{major}"),
    ])
    .arg("--root")
    .arg(&cache)
    .env("LLVM_PREFIX", &prefix)
    .env_remove("RUSTUP_TOOLCHAIN")
    .env_remove("CARGO_TARGET_DIR");
    run_checked(&mut cmd).context(
        "building bpf-linker failed; it needs network access to crates.io and a C compiler",
    )?;
    ensure!(
        linker.exists(),
        "cargo install did not produce {}",
        linker.display()
    );
    Ok(linker)
}

/// The first `name` on `PATH`.
pub fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("`{name}` not found on PATH")
}

/// Whether xtask runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
