//! Fuzz target: see `colo_netcmp::fuzzing::stream_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    colo_netcmp::fuzzing::stream_frames(data);
});
