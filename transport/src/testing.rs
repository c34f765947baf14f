//! Helpers for tests that run the other side of a protocol in a second process: the test
//! binary re-executes itself, running only one `#[ignore]`d entry test, with its role in an
//! environment variable. Used by this crate's and colo-blk's two-process tests; not part of
//! the product.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that tells the child which role to play.
pub const ROLE_VAR: &str = "COLO_TEST_CHILD_ROLE";

/// The role this process was started with by [`spawn_child`], if any.
pub fn role() -> Option<String> {
    std::env::var(ROLE_VAR).ok()
}

/// Starts this test binary again, running only `entry`, with `role` and extra env vars.
///
/// # Panics
/// If the test binary cannot be found or started (a broken test environment).
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
/// succeeded. Bounded: it polls the child every 10 ms until the limit.
///
/// # Panics
/// If the child's status cannot be read.
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

/// The pair key of tests: both sides of a test pair use it.
pub fn credentials() -> colo_auth::Credentials {
    colo_auth::Credentials::key(colo_auth::PairKey::from_bytes([0x42; colo_auth::KEY_LEN]))
}
