//! Bad input and faults around where lull attaches and pins (issue: the kernel half must pay
//! for itself): a `--cgroup` that cannot be used, another build's pins, and no bpffs.
//!
//! The stale-pin test makes `/sys/fs/bpf/lull/engine-0000000000000000` (and its `/run/lull`
//! directory) for a few seconds; everything it makes is removed when it ends, also on failure.

use std::{
    ffi::CString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use lull::activity::PIN_ROOT;
use lull_tests::{
    cgroups::TestCgroup,
    cli::{lull, lull_bin, scratch},
    pins::{KillOnDrop, RUN_ROOT, lock_holder},
    root_or_skip, serial, wait_until,
};

/// The one `error:` line of a run that must have failed with `code`.
#[track_caller]
fn one_error(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "want one error line: {stderr}");
    errors[0].to_string()
}

/// A short eBPF demo run, as each test starts it.
const RUN: &[&str] = &[
    "run",
    "--conns",
    "20",
    "--duration",
    "1s",
    "--source",
    "ebpf",
    "--quiet",
    "--hung",
    "0",
    "--closing",
    "0",
];

#[test]
fn a_cgroup_that_is_missing_not_cgroup_v2_or_read_only_is_one_line_naming_it() {
    let _serial = serial();
    if !root_or_skip("a_cgroup_that_is_missing_not_cgroup_v2_or_read_only") {
        return;
    }
    for dir in ["/no/such/lull-cgroup", "/tmp"] {
        let mut args = RUN.to_vec();
        args.extend(["--cgroup", dir]);
        let line = one_error(&lull(&args), 2);
        assert!(
            line.contains("--cgroup") && line.contains(dir),
            "names the flag and {dir}: {line}"
        );
    }
    // Root may write any file, but not on a read-only mount: a read-only bind of a real cgroup
    // directory, in a mount namespace of lull's own.
    let cgroup = TestCgroup::new("read-only");
    let dir = cgroup.path().to_str().expect("a UTF-8 path");
    let script = format!(
        "mount --bind {dir} {dir} && mount -o remount,bind,ro {dir} || exit 90; exec {} {} \
         --cgroup {dir}",
        lull_bin().display(),
        RUN.join(" ")
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("RUST_LOG", "warn")
        .output()
        .expect("unshare");
    let line = one_error(&out, 2);
    assert!(
        line.contains("--cgroup") && line.contains(dir) && line.contains("not writable"),
        "names the flag, {dir} and what is wrong: {line}"
    );
}

/// Another build's pins, made by hand: a directory with one pinned map, and a `/run/lull`
/// directory for its users. Removed on drop.
struct OtherBuild {
    pins: PathBuf,
    run: PathBuf,
}

impl OtherBuild {
    const NAME: &str = "engine-0000000000000000";

    fn make() -> Self {
        let build = Self {
            pins: Path::new(PIN_ROOT).join(Self::NAME),
            run: Path::new(RUN_ROOT).join(Self::NAME),
        };
        std::fs::create_dir_all(&build.pins).expect("a pin directory");
        std::fs::create_dir_all(build.run.join("users")).expect("a users directory");
        pin_dummy_map(&build.pins.join("LULL_ACTIVITY"));
        // A user that died without a trace but its record: it does not count.
        std::fs::write(build.run.join("users/999999.0"), "pid 999999\n").expect("a record");
        build
    }
}

impl Drop for OtherBuild {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

/// Pins a one-entry BPF array at `path` (`BPF_MAP_CREATE`, then `BPF_OBJ_PIN`).
fn pin_dummy_map(path: &Path) {
    let mut create = [0u32; 16];
    create[..4].copy_from_slice(&[2, 4, 4, 1]); // array, key 4, value 4, 1 entry
    // SAFETY: BPF_MAP_CREATE (0) reads a zero-tailed attr of the size given.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, create.as_ptr(), 64) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let name = CString::new(path.to_str().expect("UTF-8")).expect("no NUL");
    let mut pin = [0u64; 2];
    pin[0] = name.as_ptr() as u64;
    pin[1] = fd as u64; // bpf_fd, then file_flags 0
    // SAFETY: BPF_OBJ_PIN (6) reads a path pointer (valid for the call) and the fd.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_ptr(), 16) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd the kernel gave us; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
    assert_eq!(ret, 0, "BPF_OBJ_PIN {}: {err}", path.display());
}

/// A process that holds an exclusive `flock` on `record` (taken between fork and exec, on an
/// fd that survives the exec) and sleeps: a live user of the other build, as lull's records
/// are held.
fn live_user(record: &Path) -> KillOnDrop {
    let path = CString::new(record.to_str().expect("UTF-8")).expect("no NUL");
    let mut command = Command::new("sleep");
    command.arg("60");
    // SAFETY: open and flock are async-signal-safe; the path was allocated before the fork.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644);
            if fd < 0 || libc::flock(fd, libc::LOCK_EX) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = KillOnDrop::new(command.stdin(Stdio::null()).spawn().expect("sleep"));
    assert!(
        wait_until(Duration::from_secs(5), || lock_holder(record)
            == Some(child.id())),
        "the user's lock is taken"
    );
    std::fs::write(record, format!("pid {}\n", child.id())).expect("the record");
    child
}

#[test]
fn another_builds_pins_are_removed_when_unused_and_left_alone_while_used() {
    let _serial = serial();
    if !root_or_skip("another_builds_pins_are_removed_when_unused") {
        return;
    }
    let json = scratch("other-build.json");
    let json_arg = json.to_str().expect("UTF-8");
    {
        let build = OtherBuild::make();
        let mut args = RUN.to_vec();
        args.extend(["--json", json_arg]);
        let out = Command::new(lull_bin())
            .args(&args)
            .env("RUST_LOG", "info")
            .output()
            .expect("run lull");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("removed {}", build.pins.display())),
            "the removal is logged: {stderr}"
        );
        assert!(!build.pins.exists(), "the unused pins are gone");
        assert!(!build.run.join("users").exists(), "with their records");
        let report = lull_tests::cli::report(&json);
        assert_eq!(report["source"], "ebpf");
    }
    {
        // In use (an upgrade under way): left alone, and this build runs beside it, saying so.
        let build = OtherBuild::make();
        let user = live_user(&build.run.join("users/4242.0"));
        let mut args = RUN.to_vec();
        args.extend(["--json", json_arg]);
        let out = Command::new(lull_bin())
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run lull");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let pid = user.id().to_string();
        let warning: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(&build.pins.display().to_string()))
            .collect();
        assert!(
            warning.len() == 1 && warning[0].contains("WARN") && warning[0].contains(&pid),
            "one warning names {} and process {pid}: {stderr}",
            build.pins.display()
        );
        assert!(
            build.pins.join("LULL_ACTIVITY").exists(),
            "pins in use are left alone"
        );
        assert_eq!(lull_tests::cli::report(&json)["source"], "ebpf");
        drop(user);
    }
}

#[test]
fn a_missing_bpffs_is_mounted() {
    let _serial = serial();
    if !root_or_skip("a_missing_bpffs_is_mounted") {
        return;
    }
    let json = scratch("bpffs.json");
    // In a mount namespace of its own: unmount every bpffs at /sys/fs/bpf, run lull, and check
    // that bpffs is mounted there again afterwards.
    let script = format!(
        "while grep -q ' /sys/fs/bpf ' /proc/self/mounts; do umount /sys/fs/bpf || exit 90; \
         done; {} {} --json {}; rc=$?; grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts || exit 91; \
         exit $rc",
        lull_bin().display(),
        RUN.join(" "),
        json.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("RUST_LOG", "info")
        .output()
        .expect("unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("mounted bpffs at /sys/fs/bpf"),
        "says so: {stderr}"
    );
    assert_eq!(lull_tests::cli::report(&json)["source"], "ebpf");
    // Nothing leaked into this namespace: bpffs is still mounted here.
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(mounts.contains(" /sys/fs/bpf bpf "));
}
