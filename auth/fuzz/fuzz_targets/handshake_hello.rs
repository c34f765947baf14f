//! Fuzz target: see `colo_auth::fuzzing::hello`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    colo_auth::fuzzing::hello(data);
});
