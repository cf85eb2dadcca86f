use std::{io, os::fd::RawFd, path::PathBuf};

/// Errors of the activity sources: loading and attaching the eBPF program, registering
/// sockets, and reading `TCP_INFO`.
#[derive(Debug, thiserror::Error)]
pub enum ActivityError {
    /// This build of lull carries no BPF object.
    #[error(
        "this lull was built without its BPF object; run `cargo xtask build-ebpf`, then rebuild"
    )]
    NoBpfObject,

    /// No cgroup v2 hierarchy is mounted.
    #[error(
        "no cgroup2 filesystem in {mounts}; lull attaches to a cgroup v2 hierarchy \
         (mount one with `mount -t cgroup2 none /sys/fs/cgroup`)",
        mounts = mounts.display()
    )]
    NoCgroup2 {
        /// The mount table that was searched.
        mounts: PathBuf,
    },

    /// A cgroup lull was told to use is not a usable cgroup v2 directory.
    #[error("cgroup {path}: {why}", path = path.display())]
    BadCgroup {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },

    /// A file the source needs could not be read or opened.
    #[error("{action} {path}: {source}", path = path.display())]
    File {
        /// What was being done, e.g. "opening cgroup".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    /// The process lacks the privileges to load or attach BPF programs.
    #[error(
        "{action} needs CAP_BPF and CAP_NET_ADMIN (or root); run as root, or let lull fall back \
         to TCP_INFO: {}",
        chain(source.as_ref())
    )]
    NotPermitted {
        /// What was refused.
        action: String,
        /// The error as the kernel reported it.
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The kernel rejected the BPF object.
    #[error("loading the BPF object: {}", chain(.0))]
    Load(#[source] aya::EbpfError),

    /// The BPF object lacks a program lull expects (it is from another build).
    #[error("the BPF object has no program `{name}`; rebuild it with `cargo xtask build-ebpf`")]
    MissingProgram {
        /// Program name.
        name: &'static str,
    },

    /// The BPF object lacks a map lull expects (it is from another build).
    #[error("the BPF object has no map `{name}`; rebuild it with `cargo xtask build-ebpf`")]
    MissingMap {
        /// Map name.
        name: &'static str,
    },

    /// Loading or attaching one program failed.
    #[error("{action} program `{name}`: {}", chain(source))]
    Program {
        /// Program name.
        name: &'static str,
        /// "loading" or "attaching".
        action: &'static str,
        /// The error from aya.
        source: aya::programs::ProgramError,
    },

    /// A map could not be used as lull expects.
    #[error("map `{name}`: {}", chain(source))]
    Map {
        /// Map name.
        name: &'static str,
        /// The error from aya.
        source: aya::maps::MapError,
    },

    /// A system call failed.
    #[error("{call}: {source}")]
    Syscall {
        /// The call, with enough detail to tell which one (e.g. "mmap(LULL_ACTIVITY)").
        call: &'static str,
        /// The error.
        source: io::Error,
    },

    /// Every slot of the table is in use.
    #[error("the activity table is full ({capacity} slots)")]
    Full {
        /// The table's capacity.
        capacity: u32,
    },

    /// Registering a socket in the kernel's socket storage failed.
    #[error("bpf_map_update_elem(LULL_SLOTS) for fd {fd}: {}", chain(source))]
    Register {
        /// The socket.
        fd: RawFd,
        /// The error from aya.
        source: aya::maps::MapError,
    },

    /// The source needs a socket and was given a simulated connection.
    #[error("this activity source needs a socket; simulated connections need SimulatedSource")]
    NoSocket,

    /// bpffs is not mounted at `/sys/fs/bpf`, and mounting it failed.
    #[error(
        "bpffs is not mounted at /sys/fs/bpf and lull could not mount it ({why}); mount it with \
         `mount -t bpf bpf /sys/fs/bpf`"
    )]
    Bpffs {
        /// Why the mount failed.
        why: String,
    },

    /// Pinning, or opening a pinned, program, map or link failed.
    #[error("{action} {path}: {}", chain(source.as_ref()), path = path.display())]
    Pin {
        /// "pinning", "opening" or "reading".
        action: &'static str,
        /// The pin.
        path: PathBuf,
        /// The error from aya.
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A pin is not what this build of lull expects.
    #[error(
        "{path} is not what this lull expects ({why}); remove it (processes using it lose \
         their eBPF source)",
        path = path.display()
    )]
    PinMismatch {
        /// The pin.
        path: PathBuf,
        /// What differs.
        why: String,
    },

    /// The host's shared activity table has no free extent left.
    #[error(
        "the host's activity table ({rows} rows, shared by every lull process) has no free \
         extent left; watch fewer connections, or stop other lull processes"
    )]
    TableFull {
        /// Rows in the table.
        rows: u32,
    },

    /// A link of lull's programs is no longer attached to its cgroup.
    #[error(
        "lull's BPF program `{program}` was detached from its cgroup by someone else \
         (link id {link_id})"
    )]
    Detached {
        /// Program name.
        program: &'static str,
        /// The kernel's id of the detached link.
        link_id: u32,
    },
}

impl ActivityError {
    /// Whether the error means "not allowed", as opposed to "broken".
    pub fn is_permission(&self) -> bool {
        matches!(self, Self::NotPermitted { .. })
    }

    /// Turns an aya error into [`ActivityError::NotPermitted`] when an EPERM/EACCES is at its
    /// root, so that the message says what privilege is missing.
    pub(crate) fn classify<E>(
        action: impl Into<String>,
        err: E,
        other: impl FnOnce(E) -> Self,
    ) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<io::Error>() {
                // EPERM only: EACCES from BPF_PROG_LOAD is the verifier rejecting the program.
                if io.raw_os_error() == Some(libc::EPERM) {
                    return Self::NotPermitted {
                        action: action.into(),
                        source: Box::new(err),
                    };
                }
            }
            cause = c.source();
        }
        other(err)
    }
}

/// Renders an error and its sources as "outer: inner: root". aya's errors keep the errno (and
/// the verifier's log) in a source, and a message without it does not say what went wrong.
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
