//! `ferrocd-dump`: WAL and data-dir inspection (not built yet; see the tools-and-benchmarks
//! issue). The WAL reader it will use is `ferrocd_engine::wal::WalReader`.
