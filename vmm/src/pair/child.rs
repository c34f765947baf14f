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
    /// The supervisor's end of the child's lifeline, until a watcher takes it.
    lifeline: Option<Lifeline>,
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
    /// without the VMM's device, push, proxy link or control threads; and the seconds they
    /// were runnable but waited for a CPU (the scheduler's run delay, from `schedstat`).
    /// Threads that already ended are not counted (the runner keeps its vCPU threads for
    /// the VM's life).
    pub(super) fn vcpu_times(&self) -> VcpuTimes {
        let dir = format!("/proc/{}/task", self.child.id());
        let Ok(tasks) = std::fs::read_dir(&dir) else {
            return VcpuTimes::default();
        };
        let mut sum = VcpuTimes::default();
        // A process has a few dozen threads; the bound only guards against a runaway.
        for task in tasks.flatten().take(MAX_TASKS) {
            let path = task.path();
            let is_vcpu = std::fs::read_to_string(path.join("comm"))
                .is_ok_and(|c| is_vcpu_thread(c.trim_end()));
            if !is_vcpu {
                continue;
            }
            if let Ok(stat) = std::fs::read_to_string(path.join("stat")) {
                sum.cpu_s += stat_cpu_secs(&stat);
            }
            if let Ok(sched) = std::fs::read_to_string(path.join("schedstat")) {
                sum.wait_s += schedstat_wait_secs(&sched);
            }
        }
        sum
    }
}

/// Time of a process's vCPU threads, in seconds: see [`Kid::vcpu_times`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct VcpuTimes {
    /// User + system CPU: the guest's work and its exits.
    pub(super) cpu_s: f64,
    /// Runnable but waiting for a CPU that another thread held.
    pub(super) wait_s: f64,
}

impl std::ops::Sub for VcpuTimes {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self {
            cpu_s: self.cpu_s - earlier.cpu_s,
            wait_s: self.wait_s - earlier.wait_s,
        }
    }
}

/// CPU seconds (user + system) this process (`colo pair`: the proxy, the client and the
/// supervisor) used so far, from /proc; its children are not counted.
pub(super) fn own_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat").map_or(0.0, |s| stat_cpu_secs(&s))
}

/// Threads of a child looked at for [`Kid::vcpu_times`], at most.
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

/// The run delay of a `/proc/.../schedstat` line (`<on-CPU ns> <run-queue ns> <slices>`)
/// in seconds; 0 if it does not parse.
fn schedstat_wait_secs(line: &str) -> f64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
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

/// A child's lifeline: one end of a socket pair that the child holds, without knowing,
/// at the highest descriptor its limit allows, and never closes; the supervisor holds
/// the other end and reads its end of stream.
///
/// Why it tells the child's death sooner than its pidfd: the child's descriptors are
/// released only when its file table is, which the kernel does in `do_exit` after every
/// thread of the process has left user space for good (`exit_mm` comes before
/// `exit_files`, and the table is shared by all threads), so from then on the process can
/// send nothing and write nothing. The descriptors are then released highest first, so
/// this one goes before the guest memory and the KVM VM, whose release is most of a
/// process's end here (5-20 ms, and hundreds of ms on a loaded host), after which the
/// pidfd wakes. A grandchild that inherited the descriptor only delays the end of
/// stream, never brings it forward.
pub(super) struct Lifeline(std::os::unix::net::UnixStream);

impl Lifeline {
    /// Makes `cmd`'s child hold a lifeline; returns the supervisor's end and the child's,
    /// which the caller must keep open until the spawn has returned, then drop.
    ///
    /// # Errors
    /// The socket pair cannot be made.
    fn attach(cmd: &mut Command) -> std::io::Result<(Self, std::os::unix::net::UnixStream)> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct it is given, which lives across the call.
        let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        let top = if r == 0 { lim.rlim_cur.min(4096) } else { 1024 };
        let fd = i32::try_from(top.saturating_sub(1)).unwrap_or(1023).max(3);
        let src = theirs.as_raw_fd();
        // SAFETY: the hook runs in the child between fork and exec and calls only dup2,
        // which is async-signal-safe; the caller keeps `theirs` (and so `src`) open until
        // the spawn has returned, so the child's copy of it is valid. dup2 leaves
        // the new descriptor without close-on-exec, so the program keeps it; a failure
        // fails the spawn (a child without its lifeline would look dead at once).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if libc::dup2(src, fd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok((Self(ours), theirs))
    }
}

impl Kid {
    /// Runs `on_exit` on a thread as soon as the process can no longer act: its lifeline
    /// ended (if it has one), or it exited (its pidfd), whichever comes first; unless the
    /// returned guard is dropped first. `None` where the kernel has no pidfd and there
    /// is no lifeline (the caller's own poll is then all there is).
    pub(super) fn watch_exit(
        &mut self,
        on_exit: impl FnOnce() + Send + 'static,
    ) -> Option<ExitWatch> {
        // SAFETY: pidfd_open(2) with a pid and no flags returns a new descriptor or -1; the
        // pid is our own child's, not reaped yet (we hold its `Child`), so it is this one.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.child.id() as libc::pid_t, 0) };
        // SAFETY: a descriptor just returned to us, which nothing else owns.
        let pidfd = i32::try_from(fd)
            .ok()
            .filter(|&fd| fd >= 0)
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        let lifeline = self.lifeline.take();
        if pidfd.is_none() && lifeline.is_none() {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let name = self.name;
        std::thread::Builder::new()
            .name(format!("exit-watch-{name}"))
            .spawn(move || {
                let fds: Vec<i32> = [
                    pidfd.as_ref().map(AsRawFd::as_raw_fd),
                    lifeline.as_ref().map(|l| l.0.as_raw_fd()),
                ]
                .into_iter()
                .flatten()
                .collect();
                // Bounded by the guard: the pair drops it when it ends.
                while !stopped.load(Ordering::SeqCst) {
                    let mut p: Vec<libc::pollfd> = fds
                        .iter()
                        .map(|&fd| libc::pollfd {
                            fd,
                            events: libc::POLLIN,
                            revents: 0,
                        })
                        .collect();
                    // SAFETY: `p` holds p.len() valid pollfds and lives across the call.
                    let n = unsafe {
                        libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, WATCH_TICK_MS)
                    };
                    if n > 0 {
                        // Nobody writes on the lifeline: readable is its end (or an error:
                        // either way the child's end is gone). A stop asked for before is
                        // an orderly end.
                        if !stopped.load(Ordering::SeqCst) {
                            on_exit();
                        }
                        return;
                    }
                    if n < 0
                        && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                    {
                        tracing::warn!(child = name, "cannot watch the process's end");
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
    spawn_with(name, args, shared, verbose, false)
}

/// [`spawn`], and with `lifeline` the child holds a [`Lifeline`] (for
/// [`Kid::watch_exit`]).
pub(super) fn spawn_with(
    name: &'static str,
    args: &[String],
    shared: &Arc<Shared>,
    verbose: bool,
    lifeline: bool,
) -> Result<Kid, ColoError> {
    let exe = std::env::current_exe().map_err(ColoError::io("find the own executable"))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let ends = lifeline
        .then(|| Lifeline::attach(&mut cmd))
        .transpose()
        .map_err(|source| ColoError::Child { name, source })?;
    let spawned = cmd.spawn();
    // Only the child holds its end from here on.
    let ours = ends.map(|(ours, theirs)| {
        drop(theirs);
        ours
    });
    let mut child = spawned.map_err(|source| ColoError::Child { name, source })?;
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
            // To the pipe's end: a line that is not UTF-8 must not stop the reading (the
            // child would block once the pipe is full).
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                }
                let text = String::from_utf8_lossy(&buf);
                let line = text.trim_end_matches(['\n', '\r']);
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
    Ok(Kid {
        name,
        child,
        lifeline: ours,
    })
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

    #[test]
    fn schedstat_lines_give_the_run_delay() {
        assert!((schedstat_wait_secs("7000000000 250000000 1234\n") - 0.25).abs() < 1e-12);
        assert!(schedstat_wait_secs("").abs() < f64::EPSILON);
        assert!(schedstat_wait_secs("12 x 3").abs() < f64::EPSILON);
    }

    #[test]
    fn vcpu_times_subtract_field_by_field() {
        let a = VcpuTimes {
            cpu_s: 3.0,
            wait_s: 0.5,
        };
        let b = VcpuTimes {
            cpu_s: 1.0,
            wait_s: 0.25,
        };
        assert_eq!(
            a - b,
            VcpuTimes {
                cpu_s: 2.0,
                wait_s: 0.25
            }
        );
    }
}
