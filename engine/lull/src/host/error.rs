use std::{io, path::PathBuf};

use crate::activity::{ActivityError, kernel_btf::BtfError};

use super::rules::RulesError;

/// Errors of host mode: loading, attaching and pinning its programs, writing its tables, and
/// reading what they report.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The rule file is not valid; nothing was changed.
    #[error(transparent)]
    Rules(#[from] RulesError),

    /// This build of lull carries no BPF object.
    #[error(
        "this lull was built without its BPF object; run `cargo xtask build-ebpf`, then rebuild"
    )]
    NoBpfObject,

    /// Another `lull host` of the same instance runs.
    #[error("another `lull host` ({instance}) is running{}; stop it first", pid_text(*pid))]
    AlreadyRunning {
        /// The instance name.
        instance: String,
        /// Its process id, if its lock file says.
        pid: Option<u32>,
    },

    /// No `lull host` of this instance runs.
    #[error("no `lull host` is running ({instance}: nothing holds {lock})", lock = lock.display())]
    NotRunning {
        /// The instance name.
        instance: String,
        /// The lock file a running host holds.
        lock: PathBuf,
    },

    /// Host mode's objects are not pinned (it was never started, or was uninstalled).
    #[error("host mode is not installed: {dir} does not exist", dir = dir.display())]
    NotInstalled {
        /// The pin directory.
        dir: PathBuf,
    },

    /// The kernel's BTF lacks a struct field the programs read.
    #[error("reading kernel struct offsets: {0}")]
    Btf(#[from] BtfError),

    /// A shared piece of the activity layer (cgroups, lock files, bpffs) failed.
    #[error(transparent)]
    Activity(#[from] ActivityError),

    /// The kernel rejected the BPF object.
    #[error("loading lull's BPF object: {}", chain(.0))]
    Load(#[source] aya::EbpfError),

    /// Loading one program failed (the verifier's log is in the source; the message quotes
    /// its end).
    #[error("loading program `{name}`: {}", program_error(source))]
    Program {
        /// Program name.
        name: &'static str,
        /// The error from aya.
        source: aya::programs::ProgramError,
    },

    /// The BPF object lacks a program or map host mode needs (it is from another build).
    #[error("the BPF object has no {kind} `{name}`; rebuild it with `cargo xtask build-ebpf`")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },

    /// A map could not be used as host mode expects.
    #[error("map `{name}`: {}", chain(source))]
    Map {
        /// Map name.
        name: &'static str,
        /// The error from aya.
        source: aya::maps::MapError,
    },

    /// A pinned map has another layout than this build's (left by another version of lull).
    #[error(
        "{path} does not match this build of lull ({why}); run `lull host --uninstall` to \
         remove the old pins (this drops the watched connections' state) and start again",
        path = path.display()
    )]
    PinMismatch {
        /// The pin.
        path: PathBuf,
        /// What differs.
        why: String,
    },

    /// A system call failed.
    #[error("{call}: {source}")]
    Syscall {
        /// The call, with what it was for (e.g. "bpf(BPF_LINK_UPDATE) on links/1234").
        call: String,
        /// The error.
        source: io::Error,
    },

    /// An iterator's output did not have the expected shape.
    #[error("the {program} iterator wrote {len} bytes, not whole records")]
    IterOutput {
        /// The program.
        program: &'static str,
        /// Bytes read.
        len: usize,
    },
}

/// An aya program error, with only the last lines of a verifier log (the whole log can run
/// to megabytes; its end says what was refused).
fn program_error(err: &aya::programs::ProgramError) -> String {
    match err {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!(
                "BPF_PROG_LOAD: {io_error}; the verifier's log ends:\n{}",
                tail.join("\n")
            )
        }
        other => chain(other),
    }
}

fn pid_text(pid: Option<u32>) -> String {
    pid.map(|p| format!(" as process {p}")).unwrap_or_default()
}

impl HostError {
    /// A [`HostError::Syscall`] for `call`, from the last OS error.
    pub(crate) fn last_os(call: impl Into<String>) -> Self {
        Self::Syscall {
            call: call.into(),
            source: io::Error::last_os_error(),
        }
    }

    /// A [`HostError::Syscall`] for `call`.
    pub(crate) fn syscall(call: impl Into<String>, source: io::Error) -> Self {
        Self::Syscall {
            call: call.into(),
            source,
        }
    }
}

pub(crate) use crate::activity::chain;
