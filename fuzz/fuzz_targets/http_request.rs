//! Run: `cargo fuzz run http_request` (from the repository root). See fuzz/README.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stellar_gateway::fuzzing::http_request(data));
