//! Run: `cargo fuzz run decode_messages` (from the repository root). See fuzz/README.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stellar_proto::fuzzing::decode_messages(data));
