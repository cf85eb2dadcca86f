//! The network namespaces of this host, so iterators can visit each.
//!
//! A `sock_ops` program follows a socket's cgroup whatever its network namespace, but a TCP
//! iterator only visits the namespace of the thread that starts it. Containers put their
//! services in namespaces of their own, so host mode runs its iterators once per namespace:
//! every namespace a process is in (found through `/proc/*/ns/net`) and every one mounted
//! under `/run/netns` (`ip netns add`). A namespace kept alive by nothing but its sockets
//! cannot be entered; `lull ls` counts what it could not list.

use std::{
    collections::BTreeMap,
    fs::File,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use super::{HostError, sys};

/// One network namespace: its inode number and a path that opens it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    /// The namespace's inode number (as in `ls -L -i /proc/self/ns/net`).
    pub inode: u64,
    /// A path that opens it.
    pub path: PathBuf,
}

/// Every network namespace this process can find, its own first.
pub fn all() -> Vec<Netns> {
    let own = inode_of(Path::new("/proc/self/ns/net"));
    let mut found: BTreeMap<u64, PathBuf> = BTreeMap::new();
    if let Ok(dirs) = std::fs::read_dir("/run/netns") {
        for entry in dirs.flatten() {
            remember(&mut found, entry.path());
        }
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for entry in procs.flatten() {
            let is_pid = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
            if is_pid {
                remember(&mut found, entry.path().join("ns/net"));
            }
        }
    }
    let mut out = Vec::with_capacity(found.len() + 1);
    if let Some(own) = own {
        found.remove(&own);
        out.push(Netns {
            inode: own,
            path: "/proc/self/ns/net".into(),
        });
    }
    out.extend(found.into_iter().map(|(inode, path)| Netns { inode, path }));
    out
}

fn remember(found: &mut BTreeMap<u64, PathBuf>, path: PathBuf) {
    if let Some(inode) = inode_of(&path) {
        found.entry(inode).or_insert(path);
    }
}

fn inode_of(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Moves the calling thread into namespace `ns` (for a thread made for that purpose).
pub fn enter(ns: &Netns) -> Result<(), HostError> {
    let file = File::open(&ns.path)
        .map_err(|e| HostError::syscall(format!("open {}", ns.path.display()), e))?;
    // The pid may have been reused since the namespace was found: check it is the same one.
    if !file.metadata().is_ok_and(|m| m.ino() == ns.inode) {
        return Err(HostError::syscall(
            format!("open {}", ns.path.display()),
            std::io::Error::other("the namespace went away"),
        ));
    }
    sys::setns_net(file.as_fd())
}

/// Runs `f` in every namespace of `namespaces`: in this thread for the first (this process's
/// own), on a thread of its own for each other. Returns, per namespace, what `f` returned or
/// why the namespace could not be entered.
pub fn each<T: Send>(
    namespaces: &[Netns],
    f: impl Fn() -> Result<T, HostError> + Sync,
) -> Vec<(Netns, Result<T, HostError>)> {
    let own = inode_of(Path::new("/proc/self/ns/net"));
    namespaces
        .iter()
        .map(|ns| {
            let result = if Some(ns.inode) == own {
                f()
            } else {
                match File::open(&ns.path) {
                    // The namespace may be gone (its last process exited) or changed (the pid
                    // was reused): check that the file is still the same namespace.
                    Ok(file) if file.metadata().is_ok_and(|m| m.ino() == ns.inode) => {
                        sys::in_netns(file.as_fd(), &f)
                    }
                    Ok(_) => Err(HostError::syscall(
                        format!("open {}", ns.path.display()),
                        std::io::Error::other("the namespace went away"),
                    )),
                    Err(e) => Err(HostError::syscall(format!("open {}", ns.path.display()), e)),
                }
            };
            (ns.clone(), result)
        })
        .collect()
}
