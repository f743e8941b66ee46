#![no_main]
//! Fuzzes `outpost::fuzzing::www_authenticate`: see src/fuzzing.rs.

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzzing::www_authenticate(data));
