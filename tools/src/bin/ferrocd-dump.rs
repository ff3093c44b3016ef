//! `ferrocd-dump`: inspect a ferrocd data dir without modifying it.
//!
//! ```text
//! ferrocd-dump wal <data-dir | wal-dir | segment-file> [filters] [-o text|json] [--raw]
//!                  [--stop-on-error]
//! ferrocd-dump db <data-dir>        statistics of the store rebuilt from the WALs
//! ferrocd-dump db keys <data-dir>   the live keys at the latest revision
//! ferrocd-dump db check <data-dir>  verify every page of every shard's checkpoint file
//! ```
//!
//! Exit status: 0 when everything read was valid (a torn tail, which the server cuts at
//! start-up, is reported but allowed), 1 when corruption or an undecodable entry was seen, 2 on
//! a usage or I/O error. Output formats are described in `ferrocd_tools::wal`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ferrocd_tools::datadir::{resolve, Group};
use ferrocd_tools::wal::{self, Filters, Format, RowType};
use ferrocd_tools::{db, dbcheck, EXIT_CLEAN, EXIT_DAMAGED, EXIT_ERROR};

#[derive(Parser)]
#[command(
    name = "ferrocd-dump",
    about = "Inspect a ferrocd data dir (read-only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the records of the WALs of a data dir, of one WAL dir or of one segment file.
    Wal(WalArgs),
    /// Replay the WALs and print statistics of the resulting store.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Db {
        #[command(subcommand)]
        command: Option<DbCommand>,
        /// The data dir (`--data-dir` of the server).
        #[arg(required = true)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// List the live keys: key, create revision, mod revision, version, value size.
    Keys { data_dir: PathBuf },
    /// Verify every page and checksum of each shard's checkpoint file; print B+tree
    /// statistics (pages, free pages, depth, entries, size) and what each covers.
    Check { data_dir: PathBuf },
}

#[derive(Args)]
struct WalArgs {
    /// A data dir, a WAL dir (`<data-dir>/wal/shard-000`) or a segment file.
    path: PathBuf,
    /// Only this group's WAL: a shard number or `meta`.
    #[arg(long)]
    shard: Option<Group>,
    /// Only records with an index at or above this.
    #[arg(long)]
    start_index: Option<u64>,
    /// Only records with an index at or below this.
    #[arg(long)]
    end_index: Option<u64>,
    /// Only rows of these types (repeatable).
    #[arg(long, value_enum)]
    entry_type: Vec<RowType>,
    /// Only put and delete rows whose key starts with this (UTF-8 text).
    #[arg(long)]
    key_prefix: Option<String>,
    /// Output format: text rows or JSON lines (bytes as hex).
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    output: Format,
    /// Print each record's data undecoded, as hex.
    #[arg(long)]
    raw: bool,
    /// Stop at the first corruption or undecodable entry instead of going on.
    #[arg(long)]
    stop_on_error: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Wal(args) => run_wal(args),
        Command::Db {
            command: Some(DbCommand::Keys { data_dir }),
            ..
        } => run_db(&data_dir, true),
        Command::Db {
            command: Some(DbCommand::Check { data_dir }),
            ..
        } => run_db_check(&data_dir),
        Command::Db { data_dir, .. } => run_db(&data_dir.expect("clap requires a data dir"), false),
    };
    let code = result.unwrap_or_else(|e| {
        eprintln!("ferrocd-dump: {e}");
        EXIT_ERROR
    });
    ExitCode::from(u8::try_from(code).expect("exit codes are small"))
}

fn run_wal(args: WalArgs) -> Result<i32, String> {
    let target = resolve(&args.path)?;
    let options = wal::Options {
        filters: Filters {
            group: args.shard,
            start_index: args.start_index,
            end_index: args.end_index,
            types: args.entry_type,
            key_prefix: args.key_prefix.map(String::into_bytes),
        },
        format: args.output,
        raw: args.raw,
        stop_on_error: args.stop_on_error,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let summary = wal::dump(&target, &options, &mut out)?;
    out.flush().map_err(|e| format!("writing output: {e}"))?;
    if summary.exit_code() != EXIT_CLEAN {
        eprintln!(
            "ferrocd-dump: {} corrupt spot(s), {} undecodable entr(y/ies)",
            summary.corrupt, summary.undecodable
        );
    }
    Ok(summary.exit_code())
}

fn run_db_check(data_dir: &Path) -> Result<i32, String> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let clean = dbcheck::check_data_dir(data_dir, &mut out)?;
    out.flush().map_err(|e| format!("writing output: {e}"))?;
    Ok(if clean { EXIT_CLEAN } else { EXIT_DAMAGED })
}

fn run_db(data_dir: &Path, list_keys: bool) -> Result<i32, String> {
    if !data_dir.is_dir() {
        return Err(format!("{} is not a directory", data_dir.display()));
    }
    let replayed = db::replay(data_dir)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let printed = if list_keys {
        db::print_keys(&replayed, &mut out)
    } else {
        db::print_stats(&replayed, &mut out)
    };
    printed
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing output: {e}"))?;
    for torn in &replayed.torn_tails {
        eprintln!("ferrocd-dump: torn tail (cut by the server at start-up) in {torn}");
    }
    for problem in &replayed.problems {
        eprintln!("ferrocd-dump: {problem}");
    }
    Ok(if replayed.problems.is_empty() {
        EXIT_CLEAN
    } else {
        EXIT_DAMAGED
    })
}
