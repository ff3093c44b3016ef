//! Offline inspection of a ferrocd data directory, behind the `ferrocd-dump` binary.
//!
//! Everything here only reads: files are opened read-only, so the tools are safe on the data
//! dir of a running node (they then see a snapshot that may end in a record being written,
//! which is reported as a torn tail).
//!
//! * [`wal`]: `ferrocd-dump wal`, one row per change of every WAL entry.
//! * [`db`]: `ferrocd-dump db`, the store rebuilt from the checkpoints and logs, as recovery
//!   does.
//! * [`dbcheck`]: `ferrocd-dump db check`, every page of every checkpoint file verified.

pub mod datadir;
pub mod db;
pub mod dbcheck;
pub mod render;
pub mod scan;
pub mod wal;

/// Exit status when every record read was valid (a torn tail is allowed: see [`scan`]).
pub const EXIT_CLEAN: i32 = 0;
/// Exit status when corruption or an undecodable entry was seen.
pub const EXIT_DAMAGED: i32 = 1;
/// Exit status on a usage or I/O error (clap uses 2 for usage errors too).
pub const EXIT_ERROR: i32 = 2;
