//! Running the `lull` binary from tests.

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
};

use std::collections::HashSet;

use crate::{Source, root_or_skip};

/// The `lull` binary under test: `$LULL_BIN` (set by `cargo xtask test`), else the workspace's
/// debug build.
pub fn lull_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("LULL_BIN") {
        return path.into();
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lull");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --bin lull` (cargo xtask test does)",
        path.display()
    );
    path
}

/// `lull <args>`, waited for.
pub fn lull(args: &[&str]) -> Output {
    Command::new(lull_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run lull")
}

/// `lull <args>`, started with stdout and stderr piped.
pub fn spawn_lull(args: &[&str]) -> Child {
    Command::new(lull_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lull")
}

/// A demo of `conns` connections on eBPF that runs for a minute unless stopped: what the
/// tests that stop lull with a signal start.
pub fn spawn_long_ebpf_demo(conns: u32) -> Child {
    let conns = conns.to_string();
    spawn_lull(&[
        "run",
        "--conns",
        &conns,
        "--duration",
        "60s",
        "--source",
        "ebpf",
        "--quiet",
    ])
}

/// `lull <args> --json <json>`, waited for; panics unless it succeeded. Returns its report.
pub fn lull_report(args: &[&str], json: &std::path::Path) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--json", json.to_str().expect("a UTF-8 path")]);
    let out = lull(&all);
    assert!(
        out.status.success(),
        "{all:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    report(json)
}

/// Reads the JSON report written with `--json`.
pub fn report(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading the report {}: {e}", path.display()));
    serde_json::from_str(&text).expect("the report is JSON")
}

/// A scratch file path unique to this process and `name`.
pub fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("lull-test-{}-{name}", std::process::id()))
}

/// `--source` for a test source; `None` (the test is skipped, loudly) when eBPF is wanted but
/// this is not root.
pub fn source_flag(source: Source, test: &str) -> Option<&'static str> {
    match source {
        Source::TcpInfo => Some("tcp-info"),
        Source::Ebpf => root_or_skip(test).then_some("ebpf"),
    }
}

/// The ids of the programs named like lull's that are loaded in the kernel now, from any
/// process: other lull runs on this host count too.
pub fn lull_programs() -> HashSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("lull_")))
        .map(|p| p.id())
        .collect()
}

/// The ids of lull's programs that process `pid` holds (through a program or link fd, from
/// its fdinfo): what that process attached, whatever other processes do meanwhile.
pub fn lull_programs_of(pid: u32) -> HashSet<u32> {
    let held: HashSet<u32> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect();
    lull_programs().intersection(&held).copied().collect()
}
