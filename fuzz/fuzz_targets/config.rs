#![no_main]
//! Fuzzes `outpost::fuzzing::config`: see src/fuzzing.rs.

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzzing::config(data));
