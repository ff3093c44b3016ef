#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferrocd_fuzz::wal_reader(data));
