#![no_main]
//! Fuzzes `outpost::fuzzing::names`: see src/fuzzing.rs.

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzzing::names(data));
