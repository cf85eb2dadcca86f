//! `lull check`: what lull can use on this host, and what it will fall back to.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use lull::activity::{ActivityTable, TableOptions, bpf_object_embedded, cgroup2_root};

/// Show what lull can use on this host: kernel, cgroup v2, BPF object, privileges, io_uring.
///
/// Loads and detaches the BPF programs once to prove they work, and prints the activity
/// source `lull run` would pick. Exits 0 when the eBPF source is usable, 1 otherwise.
#[derive(Debug, Args)]
pub struct CheckArgs {}

pub fn run(_args: &CheckArgs) -> Result<ExitCode> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel           {}", kernel.trim());
    match cgroup2_root() {
        Ok(root) => println!("cgroup v2        {}", root.display()),
        Err(err) => println!("cgroup v2        missing: {err}"),
    }
    println!(
        "BPF object       {}",
        if bpf_object_embedded() {
            "embedded in this build"
        } else {
            "not built in (run `cargo xtask build-ebpf`, then rebuild)"
        }
    );
    println!(
        "RLIMIT_NOFILE    {}",
        lull_harness::process::raise_fd_limit()?
    );
    let ring = io_uring_ok();
    println!(
        "io_uring         {}",
        ring.as_deref().unwrap_or("available")
    );
    let ebpf = ActivityTable::load(&TableOptions {
        capacity: 16,
        cgroup: None,
    });
    match &ebpf {
        Ok(table) => println!(
            "eBPF source      usable (attached to {} and detached again)",
            table.cgroup().display()
        ),
        Err(err) => println!("eBPF source      unavailable: {err}"),
    }
    println!(
        "lull run uses    {}",
        if ebpf.is_ok() {
            "ebpf"
        } else {
            "tcp_info (fallback)"
        }
    );
    Ok(if ebpf.is_ok() && ring.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `None` when an io_uring can be set up, else why not.
fn io_uring_ok() -> Option<String> {
    let params_len = 120; // sizeof(struct io_uring_params)
    let mut params = vec![0u8; params_len];
    // SAFETY: io_uring_setup with a zeroed params struct of the right size.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 2, params.as_mut_ptr()) };
    if fd < 0 {
        return Some(format!("unavailable: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: closing the fd just created.
    unsafe { libc::close(fd as i32) };
    None
}
