//! Fuzz target: see `colo_netcmp::fuzzing::parse_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    colo_netcmp::fuzzing::parse_frame(data);
});
