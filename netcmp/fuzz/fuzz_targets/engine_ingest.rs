//! Fuzz target: see `colo_netcmp::fuzzing::engine_ingest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    colo_netcmp::fuzzing::engine_ingest(data);
});
