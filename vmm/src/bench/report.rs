//! Results of `colo bench transport` and their two presentations: a table for people and
//! one JSON object for scripts.

use std::fmt::Write as _;

/// The lowest push/memcpy ratio the random-page cases aim for.
pub const RANDOM_TARGET: f64 = 0.60;
/// The lowest push/raw-TCP ratio the contiguous case aims for.
pub const CONTIGUOUS_TARGET: f64 = 1.50;

const GIB: f64 = (1u64 << 30) as f64;

/// Timings of one measurement repeated.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Bytes moved per repetition.
    pub bytes: u64,
    /// Seconds of every repetition.
    pub secs: Vec<f64>,
}

impl Sample {
    /// An empty sample of `bytes` per repetition.
    pub fn new(bytes: u64) -> Self {
        Self {
            bytes,
            secs: Vec::new(),
        }
    }

    /// GiB/s of one repetition.
    pub fn rate(&self, secs: f64) -> f64 {
        self.bytes as f64 / GIB / secs.max(1e-9)
    }

    fn rates(&self) -> Vec<f64> {
        let mut r: Vec<f64> = self.secs.iter().map(|&s| self.rate(s)).collect();
        r.sort_by(f64::total_cmp);
        r
    }

    /// Median GiB/s (the mean of the middle two for an even count).
    pub fn median(&self) -> f64 {
        let r = self.rates();
        match r.len() {
            0 => 0.0,
            n if n % 2 == 1 => r[n / 2],
            n => (r[n / 2 - 1] + r[n / 2]) / 2.0,
        }
    }

    /// Best GiB/s.
    pub fn best(&self) -> f64 {
        self.rates().last().copied().unwrap_or(0.0)
    }
}

/// What a case pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseKind {
    /// Distinct random pages.
    Random,
    /// The whole region in one run.
    Contiguous,
}

/// The pushes of one case with one stream count.
#[derive(Debug, Clone)]
pub struct PushResult {
    /// Streams of the push path.
    pub streams: usize,
    /// Push timings.
    pub sample: Sample,
    /// Epochs whose checksum matched (every one, or the bench failed).
    pub verified: u32,
}

/// Everything measured for one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// Name, e.g. `random-65536` or `contiguous`.
    pub name: String,
    /// What it pushes.
    pub kind: CaseKind,
    /// Pages pushed.
    pub pages: u64,
    /// Runs the pages form.
    pub runs: u64,
    /// The in-process copy limit.
    pub memcpy: Sample,
    /// The single-stream socket limit.
    pub raw: Sample,
    /// The push path, per stream count.
    pub push: Vec<PushResult>,
}

impl CaseResult {
    /// Bytes per repetition.
    pub fn bytes(&self) -> u64 {
        self.memcpy.bytes
    }

    /// The stream count with the highest median push rate.
    pub fn best_push(&self) -> Option<&PushResult> {
        self.push
            .iter()
            .max_by(|a, b| a.sample.median().total_cmp(&b.sample.median()))
    }

    /// The target line's ratio and goal: push/memcpy for random pages, push/raw-TCP for
    /// the contiguous case, at the best stream count.
    pub fn target(&self) -> Option<(usize, f64, f64)> {
        let best = self.best_push()?;
        let (limit, goal) = match self.kind {
            CaseKind::Random => (&self.memcpy, RANDOM_TARGET),
            CaseKind::Contiguous => (&self.raw, CONTIGUOUS_TARGET),
        };
        Some((best.streams, ratio(&best.sample, limit), goal))
    }
}

fn ratio(a: &Sample, b: &Sample) -> f64 {
    let d = b.median();
    if d > 0.0 { a.median() / d } else { 0.0 }
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct Report {
    /// Region size in bytes.
    pub size: u64,
    /// Page size.
    pub page_size: u32,
    /// Repetitions per measurement.
    pub reps: u32,
    /// Stream counts pushed with.
    pub streams: Vec<usize>,
    /// Most bytes per push batch.
    pub batch_bytes: u64,
    /// Most runs per push batch.
    pub batch_runs: usize,
    /// Seed of data and pages.
    pub seed: u64,
    /// The cases.
    pub cases: Vec<CaseResult>,
}

impl Report {
    /// Epochs whose checksums were verified.
    pub fn verified_epochs(&self) -> u64 {
        self.cases
            .iter()
            .flat_map(|c| &c.push)
            .map(|p| u64::from(p.verified))
            .sum()
    }

    /// The human-readable table and target lines.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "colo bench transport: {} region ({} pages of {} KiB), TCP on 127.0.0.1, {} rep(s)",
            fmt_bytes(self.size),
            self.size / u64::from(self.page_size),
            self.page_size / 1024,
            self.reps
        );
        let _ = writeln!(
            o,
            "push batches of up to {} / {} runs; rates in GiB/s; ratios compare medians\n",
            fmt_bytes(self.batch_bytes),
            self.batch_runs
        );
        let _ = writeln!(
            o,
            "{:<14} {:>10}  {:>6}  {:>7}  {:>8}  {:>6}  {:>6}  {:>7}  {:>11}  {:>8}",
            "case",
            "bytes",
            "runs",
            "streams",
            "push med",
            "best",
            "memcpy",
            "raw-tcp",
            "push/memcpy",
            "push/raw"
        );
        for c in &self.cases {
            for p in &c.push {
                let _ = writeln!(
                    o,
                    "{:<14} {:>10}  {:>6}  {:>7}  {:>8.2}  {:>6.2}  {:>6.2}  {:>7.2}  {:>11.2}  {:>8.2}",
                    c.name,
                    fmt_bytes(c.bytes()),
                    c.runs,
                    p.streams,
                    p.sample.median(),
                    p.sample.best(),
                    c.memcpy.median(),
                    c.raw.median(),
                    ratio(&p.sample, &c.memcpy),
                    ratio(&p.sample, &c.raw),
                );
            }
        }
        let _ = writeln!(
            o,
            "\nchecksums: all {} pushed epochs verified",
            self.verified_epochs()
        );
        for c in &self.cases {
            let Some((streams, r, goal)) = c.target() else {
                continue;
            };
            let (what, limit) = match c.kind {
                CaseKind::Random => ("random pages", "memcpy"),
                CaseKind::Contiguous => ("contiguous", "raw-tcp"),
            };
            let _ = writeln!(
                o,
                "{what}: push/{limit} = {r:.2} (target >= {goal:.2})  [{}, best at {streams} \
                 stream(s): {}]",
                c.name,
                if r >= goal { "met" } else { "NOT met" }
            );
        }
        o
    }

    /// One JSON object with every number.
    pub fn json(&self) -> String {
        let mut o = String::new();
        let _ = write!(
            o,
            "{{\"bench\":\"transport\",\"size_bytes\":{},\"page_size\":{},\"reps\":{},\
             \"streams\":{},\"batch_bytes\":{},\"batch_runs\":{},\"seed\":{},\
             \"checksums_verified\":true,\"verified_epochs\":{},\"cases\":[",
            self.size,
            self.page_size,
            self.reps,
            json_list(self.streams.iter().map(|s| s.to_string())),
            self.batch_bytes,
            self.batch_runs,
            self.seed,
            self.verified_epochs()
        );
        for (i, c) in self.cases.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            let pushes = json_list(c.push.iter().map(|p| {
                format!(
                    "{{\"streams\":{},{},\"push_over_memcpy\":{},\"push_over_raw_tcp\":{},\
                     \"checksums_verified\":{},\"verified_epochs\":{}}}",
                    p.streams,
                    json_sample_fields(&p.sample),
                    json_num(ratio(&p.sample, &c.memcpy)),
                    json_num(ratio(&p.sample, &c.raw)),
                    p.verified == c.push_reps(),
                    p.verified
                )
            }));
            let _ = write!(
                o,
                "{{\"name\":{},\"kind\":\"{}\",\"pages\":{},\"runs\":{},\"bytes\":{},\
                 \"memcpy\":{{{}}},\"raw_tcp\":{{{}}},\"push\":{}",
                json_str(&c.name),
                match c.kind {
                    CaseKind::Random => "random",
                    CaseKind::Contiguous => "contiguous",
                },
                c.pages,
                c.runs,
                c.bytes(),
                json_sample_fields(&c.memcpy),
                json_sample_fields(&c.raw),
                pushes
            );
            if let Some((streams, r, goal)) = c.target() {
                let _ = write!(
                    o,
                    ",\"target\":{{\"ratio\":\"{}\",\"best_streams\":{streams},\"value\":{},\
                     \"goal\":{},\"met\":{}}}",
                    match c.kind {
                        CaseKind::Random => "push/memcpy",
                        CaseKind::Contiguous => "push/raw_tcp",
                    },
                    json_num(r),
                    json_num(goal),
                    r >= goal
                );
            }
            o.push('}');
        }
        o.push_str("]}");
        o
    }
}

impl CaseResult {
    /// Repetitions each push result should have verified.
    fn push_reps(&self) -> u32 {
        self.push.first().map_or(0, |p| p.sample.secs.len() as u32)
    }
}

fn json_sample_fields(s: &Sample) -> String {
    format!(
        "\"median_gibs\":{},\"best_gibs\":{},\"secs\":{}",
        json_num(s.median()),
        json_num(s.best()),
        json_list(s.secs.iter().map(|&x| json_num(x)))
    )
}

fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.6}")
    } else {
        "null".into()
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", u32::from(c));
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_list(items: impl Iterator<Item = String>) -> String {
    format!("[{}]", items.collect::<Vec<_>>().join(","))
}

/// Bytes with a binary unit, three significant digits.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    match u {
        0 => format!("{n} B"),
        _ if v >= 100.0 => format!("{v:.0} {}", UNITS[u]),
        _ if v >= 10.0 => format!("{v:.1} {}", UNITS[u]),
        _ => format!("{v:.2} {}", UNITS[u]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(bytes: u64, secs: &[f64]) -> Sample {
        Sample {
            bytes,
            secs: secs.to_vec(),
        }
    }

    #[test]
    fn median_and_best() {
        let s = sample(1 << 30, &[0.5, 1.0, 0.25]);
        assert_eq!(s.median(), 2.0);
        assert_eq!(s.best(), 4.0);
        assert_eq!(sample(1 << 30, &[1.0, 0.5]).median(), 1.5);
        assert_eq!(sample(1, &[]).median(), 0.0);
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(64 << 20), "64.0 MiB");
        assert_eq!(fmt_bytes(2 << 30), "2.00 GiB");
        assert_eq!(fmt_bytes(256 << 20), "256 MiB");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(json_num(f64::NAN), "null");
    }

    #[test]
    fn targets_pick_the_best_stream_count() {
        let c = CaseResult {
            name: "random-4".into(),
            kind: CaseKind::Random,
            pages: 4,
            runs: 4,
            memcpy: sample(1 << 30, &[0.25]),
            raw: sample(1 << 30, &[0.5]),
            push: vec![
                PushResult {
                    streams: 1,
                    sample: sample(1 << 30, &[1.0]),
                    verified: 1,
                },
                PushResult {
                    streams: 2,
                    sample: sample(1 << 30, &[0.5]),
                    verified: 1,
                },
            ],
        };
        assert_eq!(c.target(), Some((2, 0.5, RANDOM_TARGET)));
    }
}
