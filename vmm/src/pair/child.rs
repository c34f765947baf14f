//! The supervisor's child processes (`colo secondary`, `colo primary`, or `colo run` for
//! the baseline): this executable started again, its output read line by line into the
//! shared log, killed when dropped.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::shared::{Shared, lock};
use crate::colo::ColoError;

/// A child process that is killed when dropped.
pub(super) struct Kid {
    name: &'static str,
    child: Child,
}

impl Kid {
    /// Whether the process still runs.
    pub(super) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, and reap it.
    pub(super) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `grace`, then SIGKILL.
    pub(super) fn stop(&mut self, grace: Duration) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < grace {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(child = self.name, "did not stop in time; killing");
        self.kill();
    }

    /// CPU seconds (user + system) the process used so far, from /proc.
    pub(super) fn cpu_secs(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .map_or(0.0, |s| stat_cpu_secs(&s))
    }

    /// CPU seconds (user + system) the process's vCPU threads (named `vcpu<i>-<vm>` by
    /// the machine's runner) used so far, from /proc: the guest's own work and its exits,
    /// without the VMM's device, push, proxy link or control threads. Threads that
    /// already ended are not counted (the runner keeps its vCPU threads for the VM's
    /// life).
    pub(super) fn vcpu_cpu_secs(&self) -> f64 {
        let dir = format!("/proc/{}/task", self.child.id());
        let Ok(tasks) = std::fs::read_dir(&dir) else {
            return 0.0;
        };
        let mut sum = 0.0;
        // A process has a few dozen threads; the bound only guards against a runaway.
        for task in tasks.flatten().take(MAX_TASKS) {
            let path = task.path();
            let is_vcpu = std::fs::read_to_string(path.join("comm"))
                .is_ok_and(|c| is_vcpu_thread(c.trim_end()));
            if is_vcpu && let Ok(stat) = std::fs::read_to_string(path.join("stat")) {
                sum += stat_cpu_secs(&stat);
            }
        }
        sum
    }
}

/// CPU seconds (user + system) this process (`colo pair`: the proxy, the client and the
/// supervisor) used so far, from /proc; its children are not counted.
pub(super) fn own_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat").map_or(0.0, |s| stat_cpu_secs(&s))
}

/// Threads of a child looked at for [`Kid::vcpu_cpu_secs`], at most.
const MAX_TASKS: usize = 4096;

/// Whether a thread's name (`comm`, at most 15 bytes) is a vCPU thread's: `vcpu<i>-...`.
fn is_vcpu_thread(comm: &str) -> bool {
    comm.strip_prefix("vcpu")
        .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
}

/// User + system CPU seconds of a `/proc/.../stat` line; 0 if it does not parse.
fn stat_cpu_secs(stat: &str) -> f64 {
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (t(11) + t(12)) / hz
}

/// How often an exit watcher looks at its stop flag.
const WATCH_TICK_MS: i32 = 100;

/// Stops an exit watcher's thread when dropped.
pub(super) struct ExitWatch(Arc<AtomicBool>);

impl Drop for ExitWatch {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Kid {
    /// Runs `on_exit` on a thread as soon as the process ends (not waiting for a poll
    /// round: a pidfd wakes the thread), unless the returned guard is dropped first.
    /// `None` where the kernel has no pidfd (the caller's own poll is then all there is).
    pub(super) fn watch_exit(&self, on_exit: impl FnOnce() + Send + 'static) -> Option<ExitWatch> {
        // SAFETY: pidfd_open(2) with a pid and no flags returns a new descriptor or -1; the
        // pid is our own child's, not reaped yet (we hold its `Child`), so it is this one.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.child.id() as libc::pid_t, 0) };
        let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let name = self.name;
        std::thread::Builder::new()
            .name(format!("exit-watch-{name}"))
            .spawn(move || {
                // Bounded by the guard: the pair drops it when it ends.
                while !stopped.load(Ordering::SeqCst) {
                    let mut p = libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, which lives across the call.
                    let n = unsafe { libc::poll(&mut p, 1, WATCH_TICK_MS) };
                    if n > 0 {
                        // A stop asked for before the exit is an orderly one.
                        if !stopped.load(Ordering::SeqCst) {
                            on_exit();
                        }
                        return;
                    }
                    if n < 0
                        && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                    {
                        tracing::warn!(child = name, "cannot watch the process's exit");
                        return;
                    }
                }
            })
            .ok()?;
        Some(ExitWatch(stop))
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        if self.alive() {
            self.kill();
        }
    }
}

/// Starts this executable with `args` as the child `name`. Its stdout and stderr go into
/// `shared`'s log (and to stderr with `verbose`), only to be shown: what the supervisor acts
/// on comes as typed events (`super::events`).
pub(super) fn spawn(
    name: &'static str,
    args: &[String],
    shared: &Arc<Shared>,
    verbose: bool,
) -> Result<Kid, ColoError> {
    let exe = std::env::current_exe().map_err(ColoError::io("find the own executable"))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ColoError::Child { name, source })?;
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let s = Arc::clone(shared);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if verbose {
                    eprintln!("{name}| {line}");
                }
                let mut log = lock(&s.log);
                log.push(format!("{name}| {line}"));
                let n = log.len();
                if n > 400 {
                    log.drain(..n - 200);
                }
            }
        });
    }
    Ok(Kid { name, child })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_are_told_by_their_name() {
        assert!(is_vcpu_thread("vcpu0-primary"));
        assert!(is_vcpu_thread("vcpu12-secondar"));
        assert!(!is_vcpu_thread("vcpu"));
        assert!(!is_vcpu_thread("vcpux"));
        assert!(!is_vcpu_thread("dev-primary"));
        assert!(!is_vcpu_thread("push-tx-0"));
    }

    #[test]
    fn stat_lines_give_user_plus_system_time() {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let line = "42 (vcpu0-a b) R 1 2 3 4 5 6 7 8 9 10 300 100 0 0 20 0 1 0";
        assert!((stat_cpu_secs(line) - 400.0 / hz).abs() < 1e-9);
        assert!(stat_cpu_secs("").abs() < f64::EPSILON);
        assert!(stat_cpu_secs("42 (x) R 1 2").abs() < f64::EPSILON);
    }
}
