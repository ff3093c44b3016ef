//! Replays every committed fuzz input (`fuzz/regressions/<target>/*`: the inputs that found
//! bugs, and seeds) through the fuzz targets' own code (fuzz/src/lib.rs), so that CI keeps
//! those bugs fixed without cargo-fuzz or a nightly toolchain. Fuzzing itself:
//! `cd fuzz && cargo +nightly fuzz run <target>` (docs/RELIABILITY.md, "Fuzzing").

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::path::Path;

/// Replays every file under `fuzz/regressions/<target>`; returns how many.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    inputs.sort();
    for input in &inputs {
        let bytes = std::fs::read(input).expect("read input");
        eprintln!("replaying {}", input.display());
        run(&bytes);
    }
    inputs.len()
}

#[test]
fn wal_reader_inputs() {
    assert!(replay("wal_reader", targets::wal_reader) > 0);
}

#[test]
fn mvcc_payload_inputs() {
    assert!(replay("mvcc_payload", targets::mvcc_payload) > 0);
}

#[test]
fn btree_file_inputs() {
    assert!(replay("btree_file", targets::btree_file) > 0);
}

#[test]
fn kv_requests_inputs() {
    assert!(replay("kv_requests", targets::kv_requests) > 0);
}
