//! `lull check`: what lull can use on this host, and what it will fall back to.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use lull::activity::{
    ActivityTable, CgroupScope, TableOptions, bpf_object_embedded, cgroup2_root, pinned_builds,
};

/// Show what lull can use on this host: kernel, cgroup v2, BPF object, privileges, io_uring.
///
/// Lists what lull has pinned in bpffs, where it is attached and which processes use it;
/// attaches the BPF programs once (in a cgroup of its own) to prove they work, and prints the
/// activity source `lull run` would pick. Exits 0 when the eBPF source is usable, 1 otherwise.
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
    print_pins();
    // In a cgroup of its own: attaching to the shell's cgroup would tax its other processes.
    let ebpf = ActivityTable::load(&TableOptions {
        capacity: 16,
        cgroup: CgroupScope::Own,
        ..TableOptions::default()
    });
    match &ebpf {
        Ok(table) => println!(
            "eBPF source      usable (attached to {} and detached again)",
            table.cgroup().display()
        ),
        Err(err) => println!("eBPF source      unavailable: {err}"),
    }
    // UDP's egress program is attached only where UDP flows are watched: try it the same way.
    match &ebpf {
        Ok(table) if table.observe_datagrams() => println!(
            "UDP flows        ebpf for connected sockets (egress program attached to {} and \
             detached again); the peers of unconnected sockets are seen by their handles",
            table.cgroup().display()
        ),
        Ok(_) => println!(
            "UDP flows        seen by their handles' send and receive calls (the egress program \
             could not be attached)"
        ),
        Err(_) => println!(
            "UDP flows        seen by their handles' send and receive calls (no eBPF; TCP_INFO \
             has nothing for UDP)"
        ),
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

/// What lull has pinned on this host: the programs of each build, the cgroups they are
/// attached to, and the processes using them.
fn print_pins() {
    let builds = pinned_builds();
    if builds.is_empty() {
        println!("pinned           nothing (lull's programs are pinned while a lull runs)");
    }
    for build in builds {
        println!("pinned           {}", build.dir.display());
        for (id, path) in &build.links {
            let path = path.as_ref().map_or_else(
                || "no live user names it".into(),
                |p| p.display().to_string(),
            );
            let egress = if build.egress.contains(id) {
                ", with UDP's egress program"
            } else {
                ""
            };
            println!("  attached to    cgroup {id} ({path}){egress}");
        }
        for user in &build.users {
            let cgroups: Vec<String> = user.cgroups.iter().map(|c| c.0.to_string()).collect();
            let udp = if user.egress.is_empty() {
                String::new()
            } else {
                let ids: Vec<String> = user.egress.iter().map(ToString::to_string).collect();
                format!("; UDP flows in {}", ids.join(", "))
            };
            println!(
                "  used by        pid {} (cgroups {}{udp})",
                user.pid,
                cgroups.join(", ")
            );
        }
    }
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
