//! The generated libfabric bindings (`ofi/shim.h`, see `build.rs`).
#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    missing_docs,
    unreachable_pub
)]

include!(concat!(env!("OUT_DIR"), "/ofi_bindings.rs"));
