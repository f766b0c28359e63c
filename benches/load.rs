//! `cargo bench --bench load -- [ARGS]`: the benchmark harness (the same code as
//! `tensorplace bench`). Every device's load against its baselines and ceiling, in one run.
//!
//! Examples:
//!   cargo bench --bench load -- --device cpu --size 1GiB
//!   cargo bench --bench load -- --json out.json
//!   cargo bench --bench load -- --sweep --device cpu

use clap::Parser;

#[derive(Parser)]
#[command(name = "load", about = "tensorplace's load benchmark")]
struct Args {
    #[command(flatten)]
    bench: tensorplace_bench::BenchArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match tensorplace_bench::run(&args.bench) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
