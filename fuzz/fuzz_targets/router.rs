#![no_main]
//! Fuzzes `outpost::fuzzing::router`: see src/fuzzing.rs.

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzzing::router(data));
