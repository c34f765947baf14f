//! Helpers for tests of the machine that need files a test set-up script provides; not part
//! of the machine's interface.

use std::path::{Path, PathBuf};

/// Where `scripts/test-kernel.sh` leaves Debian's kernel and the busybox initramfs
/// (`target/test-kernel`, or `COLO_TEST_KERNEL_DIR`), if every one of `files` is there;
/// otherwise `None`, after one line saying how to get them.
pub fn test_kernel_dir(files: &[&str]) -> Option<PathBuf> {
    let dir = std::env::var_os("COLO_TEST_KERNEL_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-kernel"),
        PathBuf::from,
    );
    if files.iter().all(|f| dir.join(f).exists()) {
        Some(dir)
    } else {
        eprintln!(
            "skipped: no test kernel in {} (run `bash scripts/test-kernel.sh`, which the test \
             command does first)",
            dir.display()
        );
        None
    }
}
