//! Argument helpers shared by the commands: the size and duration parsers, and the options
//! that describe one VM. The commands (`run`, `pair`, `colo`, `bench`) import from here;
//! nothing here imports from them.

mod parse;
mod vm;

pub use parse::{parse_mode, parse_ms, parse_ms_or_zero, parse_secs, parse_size};
pub use vm::{KernelArgs, VmArgs, configure_tap, parse_cidr, parse_pattern, prepare_disk};
