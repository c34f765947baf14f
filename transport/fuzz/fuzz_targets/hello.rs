//! Fuzz target: see `colo_transport::fuzzing::hello`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    colo_transport::fuzzing::hello(data);
});
