#![no_main]
//! Fuzzes `outpost::fuzzing::credentials`: see src/fuzzing.rs.

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzzing::credentials(data));
