//! cgroup v2: where lull's programs attach, and the cgroup a process can make for itself.
//!
//! A `cgroup_skb` program runs for every packet of every socket in the cgroup it is attached to
//! and in its descendants, whether lull watches the socket or not. So lull attaches where its
//! own sockets live and nowhere else: the cgroup the process runs in, or one it creates for
//! itself ([`OwnCgroup`]). The hierarchy's root, which taxes every socket on the host, is only
//! ever an explicit choice ([`CgroupScope::Root`]).
//!
//! A socket belongs to the cgroup of the process that created it (an accepted socket to its
//! listener's), so a process that wants its sockets watched must open them from inside the
//! cgroup the programs are attached to.

use std::{
    ffi::CString,
    io::{self, Write as _},
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, Weak},
};

use super::ActivityError;

const MOUNTS: &str = "/proc/mounts";
const SELF_CGROUP: &str = "/proc/self/cgroup";
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// The prefix of the cgroups [`OwnCgroup`] creates: `lull-<pid>`.
const OWN_PREFIX: &str = "lull-";

/// Which cgroup lull's programs attach to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CgroupScope {
    /// The cgroup this process runs in (the default): for a service, its own unit's cgroup,
    /// which holds exactly its sockets. If the process runs in the hierarchy's root, a child
    /// cgroup is made for it instead, as with [`CgroupScope::Own`]: the root is never chosen
    /// implicitly.
    #[default]
    Current,
    /// A child of the current cgroup made for this process, which moves into it, so that only
    /// this process's sockets (opened from now on) run the programs. It is removed when the
    /// last engine using it is dropped, and, after a crash, by the next lull to make one in the
    /// same place.
    Own,
    /// This cgroup v2 directory. The process's sockets must be in it (or below it) to be
    /// watched: [`move_self_to`] moves the process.
    Path(PathBuf),
    /// The root of the hierarchy: every socket on the host runs the programs.
    Root,
}

/// Where a [`CgroupScope`] resolved to, and what keeps it alive.
#[derive(Debug)]
pub(crate) struct ResolvedCgroup {
    pub(crate) path: PathBuf,
    /// Held while an engine uses a cgroup this process made for itself.
    pub(crate) _own: Option<Arc<OwnCgroup>>,
}

impl CgroupScope {
    pub(crate) fn resolve(&self) -> Result<ResolvedCgroup, ActivityError> {
        let plain = |path| ResolvedCgroup { path, _own: None };
        match self {
            Self::Root => Ok(plain(cgroup2_root()?)),
            Self::Path(path) => {
                check_cgroup_dir(path, false)?;
                Ok(plain(path.clone()))
            }
            Self::Current => {
                let current = current_cgroup()?;
                if current == cgroup2_root()? {
                    tracing::info!(
                        "this process runs in the root cgroup: lull makes a cgroup of its own \
                         rather than attach to every socket on the host"
                    );
                    return Self::Own.resolve();
                }
                Ok(plain(current))
            }
            Self::Own => {
                let own = OwnCgroup::shared()?;
                Ok(ResolvedCgroup {
                    path: own.path.clone(),
                    _own: Some(own),
                })
            }
        }
    }
}

/// The root of the cgroup v2 hierarchy, as mounted on this host.
///
/// It is read from `/proc/mounts`, not assumed: hosts mount it at `/sys/fs/cgroup` (unified
/// mode), at `/sys/fs/cgroup/unified` (hybrid mode), or elsewhere.
pub fn cgroup2_root() -> Result<PathBuf, ActivityError> {
    let mounts = std::fs::read_to_string(MOUNTS).map_err(|source| ActivityError::File {
        action: "reading",
        path: MOUNTS.into(),
        source,
    })?;
    find_cgroup2(&mounts).ok_or_else(|| ActivityError::NoCgroup2 {
        mounts: MOUNTS.into(),
    })
}

/// The cgroup v2 directory this process runs in, from `/proc/self/cgroup`.
pub fn current_cgroup() -> Result<PathBuf, ActivityError> {
    let own = std::fs::read_to_string(SELF_CGROUP).map_err(|source| ActivityError::File {
        action: "reading",
        path: SELF_CGROUP.into(),
        source,
    })?;
    // The v2 entry is `0::/path`; v1 entries have a hierarchy id and controllers.
    let relative = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| ActivityError::NoCgroup2 {
            mounts: SELF_CGROUP.into(),
        })?;
    Ok(cgroup2_root()?.join(relative.trim_start_matches('/')))
}

/// The cgroup's id, as the kernel reports it in `bpf_link_info` (its directory's inode).
pub fn cgroup_id(path: &Path) -> Result<u64, ActivityError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| ActivityError::File {
            action: "reading cgroup",
            path: path.into(),
            source,
        })
}

/// Checks that `path` is a cgroup v2 directory (and, with `writable`, that this process may
/// move processes into it), with an error that names it.
pub fn check_cgroup_dir(path: &Path, writable: bool) -> Result<(), ActivityError> {
    let bad = |why: String| ActivityError::BadCgroup {
        path: path.into(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a directory".into()));
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|e| bad(e.to_string()))?;
    // SAFETY: all-zero is a valid `statfs`.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 {
        return Err(bad(format!("statfs: {}", io::Error::last_os_error())));
    }
    if fs.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(bad(
            "not a cgroup v2 directory (see `mount -t cgroup2`)".into()
        ));
    }
    if writable {
        let procs = CString::new(path.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|e| bad(e.to_string()))?;
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::access(procs.as_ptr(), libc::W_OK) } != 0 {
            return Err(bad(format!(
                "cgroup.procs is not writable: {}",
                io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Moves this whole process (every thread) into the cgroup at `path`. Sockets it opens from
/// now on belong there; sockets it already has stay where they were made.
pub fn move_self_to(path: &Path) -> Result<(), ActivityError> {
    let procs = path.join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        // Writing 0 moves the writing process, with all its threads.
        .and_then(|mut f| f.write_all(b"0"))
        .map_err(|source| ActivityError::File {
            action: "moving this process into",
            path: procs,
            source,
        })
}

/// A cgroup this process made for itself (`lull-<pid>`, a child of the cgroup it ran in), and
/// moved into. Dropping the last handle moves the process back and removes the cgroup.
#[derive(Debug)]
pub struct OwnCgroup {
    path: PathBuf,
    parent: PathBuf,
}

impl OwnCgroup {
    /// This process's own cgroup, made (and entered) if it does not exist yet. Every engine of
    /// the process shares one.
    pub fn shared() -> Result<Arc<Self>, ActivityError> {
        static OWN: Mutex<Weak<OwnCgroup>> = Mutex::new(Weak::new());
        let mut own = OWN.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = own.upgrade() {
            return Ok(existing);
        }
        let made = Arc::new(Self::create()?);
        *own = Arc::downgrade(&made);
        Ok(made)
    }

    fn create() -> Result<Self, ActivityError> {
        let parent = current_cgroup()?;
        remove_orphans(&parent);
        let path = parent.join(format!("{OWN_PREFIX}{}", std::process::id()));
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(ActivityError::File {
                    action: "creating cgroup",
                    path,
                    source,
                });
            }
        }
        let own = Self { path, parent };
        move_self_to(&own.path)?;
        tracing::debug!(cgroup = %own.path.display(), "lull runs in a cgroup of its own");
        Ok(own)
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup the process ran in before: where processes it starts that must not be
    /// watched (peers, helpers) belong.
    pub fn parent(&self) -> &Path {
        &self.parent
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        // A cgroup with a process in it cannot be removed: leave first.
        if let Err(err) = move_self_to(&self.parent) {
            tracing::warn!("leaving {}: {err}", self.path.display());
        }
        if let Err(err) = std::fs::remove_dir(&self.path) {
            tracing::warn!("removing cgroup {}: {err}", self.path.display());
        }
    }
}

/// Removes the `lull-<pid>` cgroups under `parent` whose process is gone (a lull that was
/// killed before it could remove its own) and that hold no process any more.
fn remove_orphans(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(OWN_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // rmdir refuses a cgroup that still holds processes (children the dead lull left).
        match std::fs::remove_dir(entry.path()) {
            Ok(()) => tracing::info!(
                "removed {}, left behind by lull process {pid}, which is gone",
                entry.path().display()
            ),
            Err(err) => tracing::warn!(
                "{} was left behind by lull process {pid}, which is gone, and cannot be \
                 removed: {err}",
                entry.path().display()
            ),
        }
    }
}

fn find_cgroup2(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| Path::new(&unescape_octal(target)).to_path_buf())
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(digits, 8) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_mount_tables() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n",
                Some("/sys/fs/cgroup"),
            ),
            (
                "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                 cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                 cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n",
                Some("/sys/fs/cgroup/unified"),
            ),
            ("none /my\\040cgroups cgroup2 rw 0 0\n", Some("/my cgroups")),
            ("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n", None),
            ("", None),
        ];
        for (mounts, want) in cases {
            assert_eq!(
                find_cgroup2(mounts).as_deref(),
                want.map(Path::new),
                "{mounts:?}"
            );
        }
    }

    #[test]
    fn refuses_what_is_not_a_cgroup_v2_directory() {
        let file = std::env::temp_dir().join(format!("lull-not-a-dir-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        let cases: [(&Path, &str); 3] = [
            (Path::new("/no/such/dir"), "No such file"),
            (&file, "not a directory"),
            (Path::new("/proc"), "not a cgroup v2 directory"),
        ];
        for (path, why) in cases {
            let err = check_cgroup_dir(path, false).unwrap_err().to_string();
            assert!(
                err.contains(&path.display().to_string()) && err.contains(why),
                "{path:?}: {err}"
            );
        }
        std::fs::remove_file(file).unwrap();
    }
}
