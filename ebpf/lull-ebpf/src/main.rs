//! lull's kernel half.
//!
//! Three programs share two maps:
//! - `LULL_SLOTS`, socket-local storage: for a socket that userspace registered, the slot it owns
//!   in the table, with a generation. Userspace writes it by fd; the kernel frees it with the
//!   socket.
//! - `LULL_ACTIVITY`, a `BPF_F_MMAPABLE` array that userspace maps into its own memory: per slot,
//!   the last time payload was received and sent, and close flags.
//!
//! `cgroup_skb` programs see every packet of every socket in the cgroup, including sockets
//! opened before they were attached, so registration alone is enough to start tracking. A
//! socket that is not registered costs exactly one storage lookup per packet. `sock_ops` adds
//! the one thing packets cannot show: a socket that died of a timeout without sending anything.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic OR/AND on the flags word; see `programs::set_flag`.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod host;
#[cfg(target_arch = "bpf")]
mod programs;

/// Lets `cargo check --workspace` on the host compile this crate to nothing.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
