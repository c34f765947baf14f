//! Fuzz target: see `colo_transport::fuzzing::push_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    colo_transport::fuzzing::push_stream(data);
});
