//! lull: a kernel-assisted keepalive engine for millions of mostly idle TCP connections.
#![warn(missing_docs)]

pub mod activity;
pub mod clock;
