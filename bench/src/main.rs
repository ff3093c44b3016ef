//! `ferrocd-bench` command line: one workload against given endpoints, or `compare`.

use clap::Parser;
use ferrocd_bench::cli::{Cli, Command, LoadArgs};
use ferrocd_bench::load::{self, Op};
use ferrocd_bench::{compare, BenchResult};
use std::process::ExitCode;

/// Exit status of a run that completed but had failed requests, so scripts notice.
const EXIT_REQUESTS_FAILED: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::RequestsFailed) => ExitCode::from(EXIT_REQUESTS_FAILED),
        Err(error) => {
            eprintln!("ferrocd-bench: {error}");
            ExitCode::FAILURE
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
    match command {
        Command::Put(args) => run_load(&args, Op::Put).await,
        Command::Range { load, consistency } => run_load(&load, Op::Range(consistency)).await,
        Command::TxnPut(args) => run_load(&args, Op::TxnPut).await,
        Command::Mixed {
            load,
            read_ratio,
            consistency,
        } => {
            let op = Op::Mixed {
                read_ratio,
                consistency,
            };
            run_load(&load, op).await
        }
        Command::Compare(args) => {
            let report = compare::run(args.into()).await?;
            let errors = report.rows.iter().map(|r| r.etcd.errors + r.ferrocd.errors);
            Ok(Outcome::from_errors(errors.sum()))
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
