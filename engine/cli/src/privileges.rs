//! `--user NAME`: give up root once the BPF programs are attached.
//!
//! Loading and attaching needs CAP_BPF and CAP_NET_ADMIN; nothing after that does. The
//! programs stay attached through their link fds, the table stays mapped, and registering a
//! socket is a map update on an fd this process already holds, which the kernel (since 6.5)
//! permits without capabilities.

use std::ffi::CString;

use anyhow::{Context as _, Result, bail, ensure};
use caps::CapSet;

/// Switches the whole process to `name` (uid, gid, supplementary groups) and drops every
/// capability, with `no_new_privs` so nothing can regain them.
///
/// The uid change applies to every thread (glibc broadcasts it), and with it the kernel
/// empties every thread's permitted and effective sets. The bounding set and `no_new_privs`
/// are per thread and only matter across `execve`: they are set on this thread, the only one
/// that starts processes (the demo's peers), which inherit them.
pub fn drop_to(name: &str) -> Result<()> {
    let (uid, gid) = lookup(name)?;
    // SAFETY: prctl with integer arguments only.
    let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    ensure!(
        ret == 0,
        "prctl(PR_SET_NO_NEW_PRIVS): {}",
        std::io::Error::last_os_error()
    );
    // The bounding set can only shrink while CAP_SETPCAP is still held, so first.
    for cap in caps::all() {
        caps::drop(None, CapSet::Bounding, cap).context("dropping the capability bounding set")?;
    }
    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    // SAFETY: plain syscalls with valid arguments. glibc applies the id changes to every
    // thread of the process; a uid change from 0 clears the permitted and effective sets.
    unsafe {
        ensure!(
            libc::setgroups(1, &gid) == 0,
            "setgroups: {}",
            std::io::Error::last_os_error()
        );
        ensure!(
            libc::setresgid(gid, gid, gid) == 0,
            "setresgid: {}",
            std::io::Error::last_os_error()
        );
        ensure!(
            libc::setresuid(uid, uid, uid) == 0,
            "setresuid: {}",
            std::io::Error::last_os_error()
        );
    }
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::clear(None, set).context("clearing capabilities")?;
    }
    // SAFETY: getters without preconditions.
    let (now_uid, now_euid) = unsafe { (libc::getuid(), libc::geteuid()) };
    let left = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    if now_uid != uid || now_euid != uid || !left.is_empty() {
        bail!("privileges were not fully dropped (uid {now_uid}, euid {now_euid}, caps {left:?})");
    }
    tracing::info!("running as {name} (uid {uid}, gid {gid}) with no capabilities");
    Ok(())
}

fn lookup(name: &str) -> Result<(libc::uid_t, libc::gid_t)> {
    let c_name = CString::new(name).context("a user name cannot contain NUL")?;
    // SAFETY: all-zero is a valid `passwd` to be filled in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, `buf` for its stated length.
    let ret = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if ret != 0 {
        bail!(
            "looking up user {name}: {}",
            std::io::Error::from_raw_os_error(ret)
        );
    }
    if result.is_null() {
        bail!("no such user: {name}");
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}
