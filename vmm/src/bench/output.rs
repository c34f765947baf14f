//! A child process's output as the benchmarks that run `colo pair` keep it: every line,
//! collected by a thread, and the tail shown when the child fails.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use super::error::{Error, Result};

/// How long a child asked to stop (SIGTERM) past its time limit gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// How a child run ended, with all it printed.
pub(crate) struct Ended {
    /// Its exit status; `None` if it overran its time limit and was stopped.
    pub status: Option<ExitStatus>,
    /// Its stdout lines.
    pub stdout: Vec<String>,
    /// Its stderr lines.
    pub stderr: Vec<String>,
}

/// Waits for `child`, started at `started`, collecting its output. Past `limit` it is
/// asked to stop (SIGTERM: `colo pair` then stops its own children before it exits), and
/// killed [`STOP_GRACE`] later.
///
/// # Errors
/// [`Error::Io`] if the child cannot be waited for.
pub(crate) fn wait_bounded(mut child: Child, started: Instant, limit: Duration) -> Result<Ended> {
    let out = collect_lines(child.stdout.take());
    let err = collect_lines(child.stderr.take());
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child
            .try_wait()
            .map_err(Error::io("wait for a `colo pair` run"))?
        {
            break s;
        }
        if started.elapsed() > limit && !timed_out {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet
            // (try_wait just saw it running), so the pid cannot have been reused.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            timed_out = true;
        }
        if timed_out && started.elapsed() > limit + STOP_GRACE {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Ended {
        status: (!timed_out).then_some(status),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Lines of a failed child's output shown in an error.
const TAIL_LINES: usize = 30;

/// Starts a reader of `pipe` that collects its lines.
pub(crate) fn collect_lines(
    pipe: Option<impl Read + Send + 'static>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        pipe.map(|p| {
            BufReader::new(p)
                .lines()
                .map_while(std::result::Result::ok)
                .collect()
        })
        .unwrap_or_default()
    })
}

/// The last lines of `lines`, indented, for an error message.
pub(crate) fn tail(lines: &[String]) -> String {
    let from = lines.len().saturating_sub(TAIL_LINES);
    let mut s = String::new();
    for l in &lines[from..] {
        let _ = writeln!(s, "    {l}");
    }
    if s.is_empty() {
        s.push_str("    (nothing)\n");
    }
    s
}
