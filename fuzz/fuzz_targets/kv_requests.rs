#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferrocd_fuzz::kv_requests(data));
