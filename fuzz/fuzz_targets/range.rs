#![no_main]
//! Fuzzes `outpost::fuzzing::range`: see src/fuzzing.rs.

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzzing::range(data));
