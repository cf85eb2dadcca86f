//! lull's kernel half.
//!
//! Two programs share two maps:
//! - `LULL_SLOTS`, socket-local storage: for a socket that userspace registered, the slot it owns
//!   in the table, with a generation, and the program's own per-socket bookkeeping. Userspace
//!   writes it by fd; the kernel frees it with the socket.
//! - `LULL_ACTIVITY`, a `BPF_F_MMAPABLE` array that userspace maps into its own memory: per slot,
//!   the last time payload was received, the last time the peer acknowledged new data, and
//!   close flags.
//!
//! The `cgroup_skb` ingress program sees every packet of every socket in the cgroup it is
//! attached to, including sockets opened before it was attached, so registration alone starts
//! tracking. A socket that is not registered costs exactly one storage lookup per packet; a
//! registered one a lookup and a jiffies compare, and a header read and a row write once per
//! jiffy. The `sock_ops` program sees what packets cannot show: our own FIN and RST, and a
//! socket the kernel closed on a timeout.
//!
//! UDP sockets (connected ones, registered like TCP) need one more program: a datagram is
//! never acknowledged, so what it sends is only seen leaving. The `cgroup_skb` egress program
//! (`datagram`) stamps tx for registered UDP sockets and is attached to a cgroup only once a
//! UDP flow there is watched; cgroups with TCP connections alone run nothing on egress.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic OR/AND on the flags word; see `programs::set_flag`.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod datagram;
#[cfg(target_arch = "bpf")]
mod host;
#[cfg(target_arch = "bpf")]
mod ladder;
#[cfg(target_arch = "bpf")]
mod programs;

/// Lets `cargo check --workspace` on the host compile this crate to nothing.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
