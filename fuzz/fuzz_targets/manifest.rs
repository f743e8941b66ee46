#![no_main]
//! Fuzzes `outpost::fuzzing::manifest`: see src/fuzzing.rs.

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzzing::manifest(data));
