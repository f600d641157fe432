//! Run: `cargo fuzz run apply_commands` (from the repository root). See fuzz/README.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stellar_scheduler::fuzzing::apply_commands(data));
