//! Run: `cargo fuzz run check_module` (from the repository root). See fuzz/README.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stellar_proto::fuzzing::check_module(data));
