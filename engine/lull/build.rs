//! Embeds the BPF object built by `cargo xtask build-ebpf`, when there is one.
//!
//! Plain `cargo build` on stable must work without nightly or bpf-linker, so a missing object
//! is not an error: the engine is then built without it and says at run time that it uses the
//! TCP_INFO fallback source.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(lull_embedded_bpf)");
    println!("cargo::rerun-if-env-changed=LULL_BPF_OBJECT");
    let object = env::var_os("LULL_BPF_OBJECT").map_or_else(
        || {
            PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
                .join("../../target/bpf/lull.bpf.o")
        },
        PathBuf::from,
    );
    // Watch the directory too: a path that does not exist yet would otherwise never be
    // noticed when `cargo xtask build-ebpf` creates it.
    if let Some(dir) = object.parent().filter(|d| d.exists()) {
        println!("cargo::rerun-if-changed={}", dir.display());
    }
    println!("cargo::rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("lull.bpf.o");
    if object.is_file() {
        fs::copy(&object, &out).expect("copying the BPF object into OUT_DIR");
        println!("cargo::rustc-cfg=lull_embedded_bpf");
    } else {
        let _ = fs::remove_file(&out);
    }
}
