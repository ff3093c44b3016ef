//! `ferrocd-bench` command line: one workload against given endpoints, or `compare`.

use clap::Parser;
use ferrocd_bench::cli::{Cli, Command, LoadArgs, Workload};
use ferrocd_bench::load::{self, Op};
use ferrocd_bench::{as_unsupported, compare, BenchResult};
use std::process::ExitCode;

/// Exit status of a run that completed but had failed requests, or whose server does not
/// implement the service the workload needs, so scripts notice.
const EXIT_REQUESTS_FAILED: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::RequestsFailed) => ExitCode::from(EXIT_REQUESTS_FAILED),
        Err(error) => {
            eprintln!("ferrocd-bench: {error}");
            if as_unsupported(error.as_ref()).is_some() {
                ExitCode::from(EXIT_REQUESTS_FAILED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

enum Outcome {
    Clean,
    RequestsFailed,
}

impl Outcome {
    fn from_errors(errors: u64) -> Outcome {
        if errors > 0 {
            Outcome::RequestsFailed
        } else {
            Outcome::Clean
        }
    }
}

async fn run(command: Command) -> BenchResult<Outcome> {
    match command.into_workload() {
        Workload::Load { args, op } => run_load(&args, op).await,
        Workload::Compare(args) => {
            let report = compare::run(args.into()).await?;
            Ok(Outcome::from_errors(report.errors()))
        }
    }
}

async fn run_load(args: &LoadArgs, op: Op) -> BenchResult<Outcome> {
    let spec = args.spec(op)?;
    let result = load::run(&spec, !args.quiet).await?;
    let summary = result.summary(&op.label());
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{summary}");
    }
    Ok(Outcome::from_errors(summary.errors))
}
