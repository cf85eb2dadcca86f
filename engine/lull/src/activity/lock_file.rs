//! [`LockFile`]: an advisory `flock(2)` lock on a file, which the kernel releases when the
//! process dies, however it dies.
//!
//! That release is what lets lull processes share one set of pinned programs safely: a lock
//! held is a user alive, and a process killed with SIGKILL leaves nothing held behind.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, Write as _},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use super::ActivityError;

/// Where lull keeps its lock files: in `/run`, which is per boot, like bpffs.
pub(crate) const RUN_DIR: &str = "/run/lull";

/// An open lock file. Locks are tied to this open file: dropping it releases them, and two
/// `LockFile`s on one path in one process conflict just as two processes do.
#[derive(Debug)]
pub(crate) struct LockFile {
    file: File,
    path: PathBuf,
}

impl LockFile {
    /// Opens (creating it and its directory if needed) the lock file at `path`.
    pub(crate) fn open(path: &Path) -> Result<Self, ActivityError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ActivityError::File {
                action: "creating",
                path: dir.into(),
                source,
            })?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| ActivityError::File {
                action: "opening lock file",
                path: path.into(),
                source,
            })?;
        Ok(Self {
            file,
            path: path.into(),
        })
    }

    /// Waits for an exclusive lock.
    pub(crate) fn lock_exclusive(&self) -> Result<(), ActivityError> {
        self.flock(libc::LOCK_EX, "flock(LOCK_EX)").map(|_| ())
    }

    /// Takes an exclusive lock if nobody holds any lock on the file; returns whether it did.
    pub(crate) fn try_lock_exclusive(&self) -> Result<bool, ActivityError> {
        self.flock(libc::LOCK_EX | libc::LOCK_NB, "flock(LOCK_EX|LOCK_NB)")
    }

    /// Takes a shared lock unless someone holds an exclusive one; returns whether it did.
    pub(crate) fn try_lock_shared(&self) -> Result<bool, ActivityError> {
        self.flock(libc::LOCK_SH | libc::LOCK_NB, "flock(LOCK_SH|LOCK_NB)")
    }

    fn flock(&self, operation: libc::c_int, call: &'static str) -> Result<bool, ActivityError> {
        loop {
            // SAFETY: flock on a file descriptor this struct owns; no pointers.
            if unsafe { libc::flock(self.file.as_raw_fd(), operation) } == 0 {
                return Ok(true);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if operation & libc::LOCK_NB != 0 => return Ok(false),
                _ => {
                    return Err(ActivityError::File {
                        action: call,
                        path: self.path.clone(),
                        source: err,
                    });
                }
            }
        }
    }

    /// The file's text (for the small records lull keeps in its lock files).
    pub(crate) fn read_text(&mut self) -> Result<String, ActivityError> {
        let mut text = String::new();
        self.file
            .rewind()
            .and_then(|()| self.file.read_to_string(&mut text))
            .map_err(|source| self.error("reading", source))?;
        Ok(text)
    }

    /// Replaces the file's text.
    pub(crate) fn write_text(&mut self, text: &str) -> Result<(), ActivityError> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.rewind())
            .and_then(|()| self.file.write_all(text.as_bytes()))
            .map_err(|source| self.error("writing", source))
    }

    fn error(&self, action: &'static str, source: io::Error) -> ActivityError {
        ActivityError::File {
            action,
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_conflict_between_open_files_and_end_with_them() {
        let dir = std::env::temp_dir().join(format!("lull-lock-test-{}", std::process::id()));
        let path = dir.join("a.lock");
        let a = LockFile::open(&path).unwrap();
        let mut b = LockFile::open(&path).unwrap();
        assert!(a.try_lock_shared().unwrap());
        assert!(b.try_lock_shared().unwrap(), "shared locks coexist");
        assert!(
            !b.try_lock_exclusive().unwrap(),
            "not while `a` holds a shared lock"
        );
        drop(a);
        assert!(
            b.try_lock_exclusive().unwrap(),
            "`a` let go when it was dropped"
        );
        b.write_text("7\n").unwrap();
        assert_eq!(b.read_text().unwrap(), "7\n");
        let c = LockFile::open(&path).unwrap();
        assert!(!c.try_lock_shared().unwrap(), "`b` holds it exclusively");
        drop(b);
        assert!(c.try_lock_shared().unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
