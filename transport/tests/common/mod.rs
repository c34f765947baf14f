//! Running the other side of a test in a second process: the test binary re-executes
//! itself, running only one `#[ignore]`d entry test, with the role in an environment
//! variable.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that tells the child which role to play.
pub const ROLE_VAR: &str = "COLO_TEST_CHILD_ROLE";

/// Starts this test binary again, running only `entry`, with `role` and extra env vars.
pub fn spawn_child(entry: &str, role: &str, env: &[(&str, String)]) -> Child {
    let exe = std::env::current_exe().expect("test binary path");
    let mut c = Command::new(exe);
    c.args([
        "--exact",
        entry,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE_VAR, role)
    .stdout(Stdio::inherit())
    .stderr(Stdio::inherit());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().expect("spawn child process")
}

/// Waits for `child` at most `limit`, killing it if it overruns; returns whether it
/// succeeded.
pub fn wait_child(mut child: Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("wait child") {
            return st.success();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A deterministic byte pattern for page `page` of epoch `epoch`.
pub fn pattern(epoch: u64, page: u64, out: &mut [u8]) {
    let mut x =
        epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ page.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// The pages written in `epoch` of the two-process tests: a sparse, deterministic set.
pub fn epoch_pages(epoch: u64, pages: u64) -> Vec<u64> {
    (0..pages)
        .filter(|p| (p * 7 + epoch * 3) % 5 == 0 || (*p == pages - 1))
        .collect()
}

/// The bitmap of `list` for a region of `pages` pages.
pub fn bitmap_of(list: &[u64], pages: u64) -> colo_memory::PageBitmap {
    let mut b = colo_memory::PageBitmap::new(pages);
    for &p in list {
        b.set(p);
    }
    b
}
