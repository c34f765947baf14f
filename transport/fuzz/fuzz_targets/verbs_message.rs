//! Fuzz target: see `colo_transport::fuzzing::verbs_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    colo_transport::fuzzing::verbs_message(data);
});
