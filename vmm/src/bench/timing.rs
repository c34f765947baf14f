//! Small timing helpers shared by the in-process benchmarks.

use std::time::{Duration, Instant};

/// Runs `f` `reps` times and returns every duration, sorted.
pub fn time_reps<T>(reps: u32, mut f: impl FnMut() -> T) -> (Vec<Duration>, T) {
    let mut times = Vec::with_capacity(reps as usize);
    let mut last = None;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let out = std::hint::black_box(f());
        times.push(t.elapsed());
        last = Some(out);
    }
    times.sort();
    (times, last.expect("at least one repetition"))
}

/// The median of sorted durations (the lower middle for an even count).
pub fn median(sorted: &[Duration]) -> Duration {
    sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default()
}

/// A duration in the unit that reads best: ns, us or ms.
pub fn fmt_dur(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 10_000 {
        format!("{ns} ns")
    } else if ns < 10_000_000 {
        format!("{:.1} us", ns as f64 / 1e3)
    } else {
        format!("{:.2} ms", ns as f64 / 1e6)
    }
}
