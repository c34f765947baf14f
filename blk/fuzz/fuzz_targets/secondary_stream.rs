//! Fuzz target: see `colo_blk::fuzzing::secondary_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    colo_blk::fuzzing::secondary_stream(data);
});
