//! Shared support for lull's benchmarks: one report format for every benchmark, the summaries
//! they give of repeated measurements, and the readings of the machine they share.
//!
//! A benchmark prints its [`BenchReport`] as plain tables on stdout and, with `--out DIR`,
//! writes `DIR/<name>.json` and `DIR/<name>.md`, which `cargo xtask bench` gathers into
//! `target/bench/SUMMARY.md`. Benchmarks never pass or fail on timing: goals are reported as
//! met or not met, with the measured figure next to the target.

mod machine;
mod report;
mod stats;

pub use machine::{
    allowed_cpus, drop_traffic_of, machine_description, net_counter, pin_thread, process_cpu_ns,
    thread_cpu_ns, thread_user_system_ns,
};
pub use report::{BenchReport, Goal, Series, Table, thousands};
pub use stats::{median, spread};
