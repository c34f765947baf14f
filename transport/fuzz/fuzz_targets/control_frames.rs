//! Fuzz target: see `colo_transport::fuzzing::control_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    colo_transport::fuzzing::control_frames(data);
});
