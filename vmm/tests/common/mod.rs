//! Helpers shared by the end-to-end tests of the `colo` binary: the binary itself, skips
//! that say why, child processes that are always reaped, network namespaces that are
//! always removed.

#![allow(dead_code, reason = "each test binary uses a part of the helpers")]

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// The `colo` binary under test.
pub const COLO: &str = env!("CARGO_BIN_EXE_colo");

/// A command that runs the `colo` binary.
pub fn colo() -> Command {
    Command::new(COLO)
}

/// Whether /dev/kvm exists; says that the test is skipped if not.
pub fn kvm() -> bool {
    let ok = std::path::Path::new("/dev/kvm").exists();
    if !ok {
        eprintln!("skipped: /dev/kvm is absent");
    }
    ok
}

/// Whether this runs as root and /dev/kvm exists; says that the test is skipped if not.
pub fn root_and_kvm() -> bool {
    // SAFETY: geteuid has no preconditions.
    let ok = unsafe { libc::geteuid() } == 0 && std::path::Path::new("/dev/kvm").exists();
    if !ok {
        eprintln!("skipped: needs root and /dev/kvm");
    }
    ok
}

/// A child process killed and reaped when dropped.
pub struct Reaper(pub Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child, which has not been reaped (try_wait just
            // saw it running), so the pid is still its. SIGCONT first, so that a stopped
            // child can die.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGCONT) };
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Waits at most `limit` for `child` to exit by itself; `None` if it still runs.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait for the child") {
            return Some(s);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A network namespace, removed on drop.
pub struct Netns(pub String);

impl Netns {
    /// Creates the namespace `name`; says that the test is skipped if that fails.
    pub fn add(name: String) -> Option<Self> {
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot create the network namespace {name}");
            return None;
        }
        Some(Self(name))
    }
}

impl Netns {
    /// Creates the namespace `name` with its loopback up (a new namespace has it down,
    /// and the two sides of a pair talk over it); says that the test is skipped if that
    /// fails.
    pub fn with_loopback(name: String) -> Option<Self> {
        let ns = Self::add(name)?;
        let lo = Command::new("ip")
            .args(["netns", "exec", &ns.0, "ip", "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(lo.success(), "loopback up in {}", ns.0);
        Some(ns)
    }
}

/// A loopback port P with P + 1 free too (a secondary's control and disk replication
/// ports).
pub fn two_free_ports() -> u16 {
    (0..100)
        .find_map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
            let p = l.local_addr().ok()?.port();
            (p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()).then_some(p)
        })
        .expect("two consecutive free ports")
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `f` on a thread that has entered the network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        // SAFETY: setns with a namespace fd only changes this thread's network namespace.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns");
        f()
    })
    .join()
    .unwrap()
}

pub mod sides;
