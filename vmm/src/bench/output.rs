//! A child process's output as the benchmarks that run `colo pair` keep it: every line,
//! collected by a thread, and the tail shown when the child fails.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};

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
