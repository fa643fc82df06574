//! `warren-perf`: the command line of the load generator in `lib.rs`. Prints a report and
//! exits non-zero when a confirmed message was not consumed.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let opts = warren_perf::Options::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warren-perf: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(warren_perf::run(&opts)) {
        Ok(report) => {
            if opts.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                println!("{}", report.text());
            }
            if report.lost > 0 {
                std::process::ExitCode::FAILURE
            } else {
                std::process::ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("warren-perf: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
