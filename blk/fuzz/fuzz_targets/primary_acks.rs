//! Fuzz target: see `colo_blk::fuzzing::primary_acks`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    colo_blk::fuzzing::primary_acks(data);
});
