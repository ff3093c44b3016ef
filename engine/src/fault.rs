//! Test-only disk fault injection, behind the hidden server flag
//! `--experimental-fault-injection fsync-error` (tests/robustness.rs, docs/RELIABILITY.md).
//!
//! A failing fsync cannot be provoked from outside a process without kernel modules
//! (dm-flakey) that a CI container lacks, so the fault is injected at the two places the
//! engine makes files durable: the WAL segments' fdatasync (`wal/writer.rs`) and the tree
//! file's (`btree/io.rs`). The real fdatasync still runs, then the injected error replaces its
//! result, so everything above (poisoning the WAL, the shard's fatal exit) runs the code a real
//! EIO would.
//!
//! The fault is armed at a moment the test picks: `install` makes SIGUSR2 arm it, and from
//! then on every fdatasync of the process fails. The signal handler also writes
//! [`ARMED_LOG_LINE`] to stderr, so a test knows from the server log when the fault is in
//! effect. Without `install` (every production run), [`injected_fsync_error`] is one relaxed
//! atomic load that returns `Ok`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// Written to stderr by the signal handler once the fault is armed (one line).
pub const ARMED_LOG_LINE: &str = "ferrocd: fault injection: fsync-error armed\n";
/// The errno an armed fsync fails with: what a failing device reports.
pub const INJECTED_ERRNO: i32 = libc::EIO;

/// Set by the SIGUSR2 handler; never cleared (a restart removes the fault).
static FSYNC_ERROR_ARMED: AtomicBool = AtomicBool::new(false);

/// The faults `--experimental-fault-injection` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every fdatasync after SIGUSR2 fails with EIO.
    FsyncError,
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(spec: &str) -> Result<Fault, String> {
        match spec {
            "fsync-error" => Ok(Fault::FsyncError),
            other => Err(format!("unknown fault `{other}` (expected fsync-error)")),
        }
    }
}

/// Makes SIGUSR2 arm `fault`. Call once, at start-up, before the engine does any I/O.
pub fn install(fault: Fault) -> io::Result<()> {
    match fault {
        Fault::FsyncError => install_handler(arm_fsync_error),
    }
}

/// `Err(EIO)` once the fsync fault is armed; `Ok` otherwise (always, without `install`).
pub fn injected_fsync_error() -> io::Result<()> {
    match FSYNC_ERROR_ARMED.load(Ordering::Relaxed) {
        true => Err(io::Error::from_raw_os_error(INJECTED_ERRNO)),
        false => Ok(()),
    }
}

extern "C" fn arm_fsync_error(_signal: libc::c_int) {
    FSYNC_ERROR_ARMED.store(true, Ordering::SeqCst);
    // SAFETY: write(2) is async-signal-safe and reads the static string only for its length.
    // A failed write only loses the log line, so its result is not checked.
    unsafe {
        libc::write(
            libc::STDERR_FILENO,
            ARMED_LOG_LINE.as_ptr().cast(),
            ARMED_LOG_LINE.len(),
        );
    }
}

fn install_handler(handler: extern "C" fn(libc::c_int)) -> io::Result<()> {
    // SAFETY: sigaction with a zeroed, then filled, local struct and a handler that only
    // stores an atomic and calls write(2). SA_RESTART keeps interrupted system calls of the
    // other threads from failing with EINTR.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
