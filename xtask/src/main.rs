//! `cargo xtask`: everything lull needs beyond plain `cargo`, from a fresh machine.
//!
//! Each subcommand lives in its own module and bootstraps what it needs (nightly's `rust-src`,
//! a `bpf-linker` built against nightly's own LLVM, Debian packages used as real peers), so the
//! README's two commands are all an operator or CI has to type.

mod bench;
mod build_ebpf;
mod packages;
mod run;
mod soak;
mod test;
mod toolchain;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Bench(bench::Options),
    BuildEbpf(build_ebpf::Options),
    Run(run::Options),
    Soak(soak::Options),
    Test(test::Options),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(opts) => bench::run(&opts),
        Command::BuildEbpf(opts) => build_ebpf::run(&opts).map(|_| ()),
        Command::Run(opts) => run::run(&opts),
        Command::Soak(opts) => soak::run(&opts),
        Command::Test(opts) => test::run(&opts),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line; a backtrace of xtask itself
            // would only bury the message that says what to do.
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
