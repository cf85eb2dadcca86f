//! Shared support for lull benchmarks.
