//! Readings of this process, each failing loudly: a reading of 0 would make every growth or
//! leak check that uses it pass.

use std::io;

/// This process's resident memory, in bytes, from `/proc/self/statm`.
pub fn rss_bytes() -> io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::other("no resident page count in /proc/self/statm"))?;
    Ok(pages * page_size())
}

/// The number of file descriptors this process has open, from `/proc/self/fd`.
pub fn open_fds() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit now in force.
///
/// A process that may not raise it keeps its limit: that is not an error, the returned limit
/// says what the caller may use. Only a failing `getrlimit` is.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(syscall_error("getrlimit(RLIMIT_NOFILE)"));
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: a valid pointer to limits the kernel just reported.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    Ok(lim.rlim_cur)
}

/// The size of a memory page.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).unwrap_or(4096)
}

fn syscall_error(call: &str) -> io::Error {
    let err = io::Error::last_os_error();
    io::Error::new(err.kind(), format!("{call}: {err}"))
}

/// Makes `command`'s process move into the cgroup whose `cgroup.procs` is `procs` (open for
/// writing) before it runs anything, so that every socket it opens belongs there. `procs`
/// must stay open until the command is spawned.
pub fn enter_cgroup_on_exec(command: &mut std::process::Command, procs: &std::fs::File) {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let fd = procs.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls are allowed; write(2) is one,
    // on an fd opened before the fork (inherited, and closed at exec).
    unsafe {
        command.pre_exec(move || {
            // Writing 0 to cgroup.procs moves the writing process.
            if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_plausible() {
        assert!(
            rss_bytes().unwrap() > 1 << 20,
            "a Rust test binary holds more than 1 MiB"
        );
        let fds = open_fds().unwrap();
        let extra = std::fs::File::open("/proc/self/statm").unwrap();
        assert_eq!(open_fds().unwrap(), fds + 1);
        drop(extra);
        assert!(raise_fd_limit().unwrap() >= 64);
    }
}
