//! Results of `colo bench transport` and their two presentations: a table for people and
//! one JSON object for scripts.

use std::fmt::Write as _;

use serde::Serialize;

use super::cpu::Cpu;

/// The lowest push/memcpy ratio the random-page cases aim for.
pub const RANDOM_TARGET: f64 = 0.60;
/// The highest push/raw-TCP ratio of CPU seconds per GiB the random-page cases aim for.
pub const RANDOM_CPU_TARGET: f64 = 1.20;
/// The lowest push/raw-TCP ratio the contiguous case aims for.
pub const CONTIGUOUS_TARGET: f64 = 1.50;

const GIB: f64 = (1u64 << 30) as f64;

/// The CPU one repetition of a transfer used, on each side.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuRep {
    /// The sending process (this one).
    pub sender: Cpu,
    /// The receiving process.
    pub receiver: Cpu,
}

impl CpuRep {
    /// Both sides together.
    pub fn both(&self) -> Cpu {
        self.sender + self.receiver
    }
}

/// Timings of one measurement repeated.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Bytes moved per repetition.
    pub bytes: u64,
    /// Seconds of every repetition.
    pub secs: Vec<f64>,
    /// CPU of every repetition (transfers between the processes only; empty for memcpy).
    pub cpu: Vec<CpuRep>,
}

/// The median of some numbers (the mean of the middle two for an even count), 0 for none.
fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl Sample {
    /// An empty sample of `bytes` per repetition.
    pub fn new(bytes: u64) -> Self {
        Self {
            bytes,
            secs: Vec::new(),
            cpu: Vec::new(),
        }
    }

    /// GiB moved per repetition.
    fn gib(&self) -> f64 {
        self.bytes as f64 / GIB
    }

    /// Median over the repetitions of `f(rep)` CPU seconds per GiB; `None` without CPU
    /// readings.
    pub fn cpu_per_gib_by(&self, f: impl Fn(&CpuRep) -> f64) -> Option<f64> {
        if self.cpu.is_empty() || self.bytes == 0 {
            return None;
        }
        Some(median_of(
            self.cpu.iter().map(|c| f(c) / self.gib()).collect(),
        ))
    }

    /// Median CPU seconds per GiB of sender and receiver together.
    pub fn cpu_per_gib(&self) -> Option<f64> {
        self.cpu_per_gib_by(|c| c.both().total())
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
        median_of(self.rates())
    }

    /// Best GiB/s.
    pub fn best(&self) -> f64 {
        self.rates().last().copied().unwrap_or(0.0)
    }
}

/// What a case pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
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
    /// Whether every stream was sealed (`--encrypt`).
    pub sealed: bool,
    /// Pushed with one-sided writes through libfabric (`--transport ofi`), not TCP.
    pub ofi: bool,
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

    /// The plain TCP stream count with the highest median push rate.
    pub fn best_push(&self) -> Option<&PushResult> {
        self.push
            .iter()
            .filter(|p| !p.sealed && !p.ofi)
            .max_by(|a, b| a.sample.median().total_cmp(&b.sample.median()))
    }

    /// The libfabric push's median rate over the best plain TCP push's, if both ran.
    pub fn ofi_over_tcp(&self) -> Option<f64> {
        let ofi = self.push.iter().find(|p| p.ofi)?;
        Some(ratio(&ofi.sample, &self.best_push()?.sample))
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

impl CaseResult {
    /// Push CPU per GiB over the raw stream's at `p`'s stream count, if both were measured.
    pub fn cpu_over_raw(&self, p: &PushResult) -> Option<f64> {
        cpu_ratio(&p.sample, &self.raw)
    }

    /// The plain stream count whose push costs the least CPU per GiB, with its ratio to the
    /// raw stream's.
    pub fn cpu_target(&self) -> Option<(usize, f64)> {
        self.push
            .iter()
            .filter(|p| !p.sealed && !p.ofi)
            .filter_map(|p| Some((p.streams, self.cpu_over_raw(p)?)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }
}

fn cpu_ratio(a: &Sample, b: &Sample) -> Option<f64> {
    let (a, b) = (a.cpu_per_gib()?, b.cpu_per_gib()?);
    (b > 0.0).then(|| a / b)
}

/// What `--encrypt` keeps of the plain push.
pub const SEALED_TARGET: f64 = 0.5;
/// What the libfabric push over the user-space `tcp` provider keeps of colo's own TCP
/// push (the point is the one-sided path, not beating the TCP push).
pub const OFI_TARGET: f64 = 0.8;
/// What the libfabric push over the shared-memory `shm` provider keeps of it.
pub const OFI_SHM_TARGET: f64 = 1.0;

/// The target of the libfabric push of `provider` against the TCP push.
pub fn ofi_target(provider: &str) -> f64 {
    if provider == "shm" {
        OFI_SHM_TARGET
    } else {
        OFI_TARGET
    }
}

impl CaseResult {
    /// The sealed push's median rate over the plain one's at `streams` streams, if both
    /// ran.
    pub fn sealed_over_plain(&self, streams: usize) -> Option<f64> {
        let of = |sealed: bool| {
            self.push
                .iter()
                .find(|p| p.streams == streams && p.sealed == sealed)
        };
        Some(ratio(&of(true)?.sample, &of(false)?.sample))
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
    /// The libfabric provider pushed with, if any.
    pub ofi_provider: Option<String>,
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
            "CPU: seconds of sender and receiver together per GiB moved (median); cpu/raw \
             compares it with the raw stream's\n"
        );
        let _ = writeln!(
            o,
            "{:<14} {:>10}  {:>6}  {:>7}  {:>6}  {:>8}  {:>6}  {:>6}  {:>7}  {:>11}  {:>8}  \
             {:>8}  {:>7}  {:>7}",
            "case",
            "bytes",
            "runs",
            "streams",
            "mode",
            "push med",
            "best",
            "memcpy",
            "raw-tcp",
            "push/memcpy",
            "push/raw",
            "cpu/GiB",
            "raw cpu",
            "cpu/raw"
        );
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
        for c in &self.cases {
            for p in &c.push {
                let _ = writeln!(
                    o,
                    "{:<14} {:>10}  {:>6}  {:>7}  {:>6}  {:>8.2}  {:>6.2}  {:>6.2}  {:>7.2}  \
                     {:>11.2}  {:>8.2}  {:>8}  {:>7}  {:>7}",
                    c.name,
                    fmt_bytes(c.bytes()),
                    c.runs,
                    p.streams,
                    match (p.ofi, p.sealed) {
                        (true, _) => "ofi",
                        (false, true) => "sealed",
                        (false, false) => "plain",
                    },
                    p.sample.median(),
                    p.sample.best(),
                    c.memcpy.median(),
                    c.raw.median(),
                    ratio(&p.sample, &c.memcpy),
                    ratio(&p.sample, &c.raw),
                    opt(p.sample.cpu_per_gib()),
                    opt(c.raw.cpu_per_gib()),
                    opt(c.cpu_over_raw(p)),
                );
            }
        }
        let _ = writeln!(
            o,
            "\nchecksums: all {} pushed epochs verified",
            self.verified_epochs()
        );
        for c in &self.cases {
            if let Some(r) = c.ofi_over_tcp() {
                let provider = self.ofi_provider.as_deref().unwrap_or("tcp");
                let target = ofi_target(provider);
                let _ = writeln!(
                    o,
                    "{}: libfabric push / best TCP push = {r:.2} (target >= {target:.2} for the \
                     {provider} provider: {})",
                    c.name,
                    if r >= target { "met" } else { "NOT met" }
                );
            }
        }
        for c in &self.cases {
            for p in c.push.iter().filter(|p| p.sealed) {
                if let Some(r) = c.sealed_over_plain(p.streams) {
                    let _ = writeln!(
                        o,
                        "{}: sealed/plain = {r:.2} at {} stream(s) (target >= {SEALED_TARGET:.2} \
                         per stream: {})",
                        c.name,
                        p.streams,
                        if r >= SEALED_TARGET { "met" } else { "NOT met" }
                    );
                }
            }
        }
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
        for c in &self.cases {
            let Some((streams, r)) = c.cpu_target() else {
                continue;
            };
            let raw = c.raw.cpu_per_gib().unwrap_or(0.0);
            let goal = match c.kind {
                CaseKind::Random => format!(
                    "target <= {RANDOM_CPU_TARGET:.2}: {}",
                    if r <= RANDOM_CPU_TARGET {
                        "met"
                    } else {
                        "NOT met"
                    }
                ),
                CaseKind::Contiguous => "no target".into(),
            };
            let _ = writeln!(
                o,
                "{}: push cpu/GiB / raw-tcp cpu/GiB = {r:.2} ({goal})  [lowest at {streams} \
                 stream(s); raw tcp {raw:.3} s/GiB]",
                c.name
            );
        }
        o
    }

    /// One JSON object with every number; NaN and infinities come out as `null`.
    pub fn json(&self) -> String {
        let doc = JsonReport {
            bench: "transport",
            size_bytes: self.size,
            page_size: self.page_size,
            reps: self.reps,
            streams: &self.streams,
            batch_bytes: self.batch_bytes,
            batch_runs: self.batch_runs,
            seed: self.seed,
            checksums_verified: true,
            verified_epochs: self.verified_epochs(),
            cases: self.cases.iter().map(JsonCase::new).collect(),
        };
        serde_json::to_string(&doc).expect("the report has only plain fields")
    }
}

impl CaseResult {
    /// Repetitions each push result should have verified.
    fn push_reps(&self) -> u32 {
        self.push.first().map_or(0, |p| p.sample.secs.len() as u32)
    }
}

// The JSON document's shape. serde_json writes non-finite floats as `null`.

#[derive(Serialize)]
struct JsonReport<'a> {
    bench: &'static str,
    size_bytes: u64,
    page_size: u32,
    reps: u32,
    streams: &'a [usize],
    batch_bytes: u64,
    batch_runs: usize,
    seed: u64,
    checksums_verified: bool,
    verified_epochs: u64,
    cases: Vec<JsonCase<'a>>,
}

#[derive(Serialize)]
struct JsonCase<'a> {
    name: &'a str,
    kind: CaseKind,
    pages: u64,
    runs: u64,
    bytes: u64,
    memcpy: JsonSample<'a>,
    raw_tcp: JsonSample<'a>,
    push: Vec<JsonPush<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<JsonTarget>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_target: Option<JsonCpuTarget>,
}

impl<'a> JsonCase<'a> {
    fn new(c: &'a CaseResult) -> Self {
        let push = c
            .push
            .iter()
            .map(|p| JsonPush {
                streams: p.streams,
                sealed: p.sealed,
                ofi: p.ofi,
                sealed_over_plain: p.sealed.then(|| c.sealed_over_plain(p.streams)).flatten(),
                ofi_over_tcp: if p.ofi { c.ofi_over_tcp() } else { None },
                sample: JsonSample::new(&p.sample),
                push_over_memcpy: ratio(&p.sample, &c.memcpy),
                push_over_raw_tcp: ratio(&p.sample, &c.raw),
                cpu_over_raw_tcp: c.cpu_over_raw(p),
                checksums_verified: p.verified == c.push_reps(),
                verified_epochs: p.verified,
            })
            .collect();
        let target = c.target().map(|(best_streams, value, goal)| JsonTarget {
            ratio: match c.kind {
                CaseKind::Random => "push/memcpy",
                CaseKind::Contiguous => "push/raw_tcp",
            },
            best_streams,
            value,
            goal,
            met: value >= goal,
        });
        let cpu_target = c.cpu_target().map(|(lowest_streams, value)| JsonCpuTarget {
            ratio: "push_cpu_per_gib/raw_tcp_cpu_per_gib",
            lowest_streams,
            value,
            goal: (c.kind == CaseKind::Random).then_some(RANDOM_CPU_TARGET),
            met: (c.kind == CaseKind::Random).then_some(value <= RANDOM_CPU_TARGET),
        });
        Self {
            name: &c.name,
            kind: c.kind,
            pages: c.pages,
            runs: c.runs,
            bytes: c.bytes(),
            memcpy: JsonSample::new(&c.memcpy),
            raw_tcp: JsonSample::new(&c.raw),
            push,
            target,
            cpu_target,
        }
    }
}

#[derive(Serialize)]
struct JsonSample<'a> {
    median_gibs: f64,
    best_gibs: f64,
    secs: &'a [f64],
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<JsonCpu>,
}

impl<'a> JsonSample<'a> {
    fn new(s: &'a Sample) -> Self {
        Self {
            median_gibs: s.median(),
            best_gibs: s.best(),
            secs: &s.secs,
            cpu: JsonCpu::new(s),
        }
    }
}

/// CPU seconds per GiB, each a median over the repetitions, and every repetition's
/// readings in seconds.
#[derive(Serialize)]
struct JsonCpu {
    s_per_gib: f64,
    sender_s_per_gib: f64,
    receiver_s_per_gib: f64,
    user_s_per_gib: f64,
    sys_s_per_gib: f64,
    reps: Vec<JsonCpuRep>,
}

#[derive(Serialize)]
struct JsonCpuRep {
    sender_user_s: f64,
    sender_sys_s: f64,
    receiver_user_s: f64,
    receiver_sys_s: f64,
}

impl JsonCpu {
    fn new(s: &Sample) -> Option<Self> {
        Some(Self {
            s_per_gib: s.cpu_per_gib()?,
            sender_s_per_gib: s.cpu_per_gib_by(|c| c.sender.total())?,
            receiver_s_per_gib: s.cpu_per_gib_by(|c| c.receiver.total())?,
            user_s_per_gib: s.cpu_per_gib_by(|c| c.both().user)?,
            sys_s_per_gib: s.cpu_per_gib_by(|c| c.both().sys)?,
            reps: s
                .cpu
                .iter()
                .map(|c| JsonCpuRep {
                    sender_user_s: c.sender.user,
                    sender_sys_s: c.sender.sys,
                    receiver_user_s: c.receiver.user,
                    receiver_sys_s: c.receiver.sys,
                })
                .collect(),
        })
    }
}

#[derive(Serialize)]
struct JsonPush<'a> {
    streams: usize,
    sealed: bool,
    /// One-sided writes through libfabric (`--transport ofi`).
    ofi: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    sealed_over_plain: Option<f64>,
    /// The libfabric push over the best plain TCP push of the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    ofi_over_tcp: Option<f64>,
    #[serde(flatten)]
    sample: JsonSample<'a>,
    push_over_memcpy: f64,
    push_over_raw_tcp: f64,
    cpu_over_raw_tcp: Option<f64>,
    checksums_verified: bool,
    verified_epochs: u32,
}

#[derive(Serialize)]
struct JsonCpuTarget {
    ratio: &'static str,
    lowest_streams: usize,
    value: f64,
    goal: Option<f64>,
    met: Option<bool>,
}

#[derive(Serialize)]
struct JsonTarget {
    ratio: &'static str,
    best_streams: usize,
    value: f64,
    goal: f64,
    met: bool,
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
            cpu: Vec::new(),
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
    fn non_finite_numbers_are_null() {
        let s = JsonSample {
            median_gibs: f64::NAN,
            best_gibs: f64::INFINITY,
            secs: &[f64::NEG_INFINITY, 0.5],
            cpu: None,
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"median_gibs":null,"best_gibs":null,"secs":[null,0.5]}"#
        );
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
                    sealed: false,
                    ofi: false,
                    sample: sample(1 << 30, &[1.0]),
                    verified: 1,
                },
                PushResult {
                    streams: 2,
                    sealed: false,
                    ofi: false,
                    sample: sample(1 << 30, &[0.5]),
                    verified: 1,
                },
                // Faster, but sealed: not what the target is about.
                PushResult {
                    streams: 2,
                    sealed: true,
                    ofi: false,
                    sample: sample(1 << 30, &[0.25]),
                    verified: 1,
                },
            ],
        };
        assert_eq!(c.target(), Some((2, 0.5, RANDOM_TARGET)));
        // 0.5 s plain against 0.25 s sealed at 2 streams: sealed is twice as fast here.
        assert_eq!(c.sealed_over_plain(2), Some(2.0));
        assert_eq!(c.sealed_over_plain(1), None);
        assert_eq!(c.cpu_target(), None);
    }

    fn cpu(sender: f64, receiver: f64) -> CpuRep {
        CpuRep {
            sender: Cpu {
                user: 0.0,
                sys: sender,
            },
            receiver: Cpu {
                user: receiver,
                sys: 0.0,
            },
        }
    }

    #[test]
    fn cpu_per_gib_is_the_median_of_both_sides_together() {
        let mut s = sample(2 << 30, &[1.0, 1.0, 1.0]);
        assert_eq!(s.cpu_per_gib(), None);
        s.cpu = vec![cpu(1.0, 1.0), cpu(0.5, 0.5), cpu(4.0, 4.0)];
        // 2, 1 and 8 CPU seconds for 2 GiB each.
        assert_eq!(s.cpu_per_gib(), Some(1.0));
        assert_eq!(s.cpu_per_gib_by(|c| c.sender.total()), Some(0.5));
        let mut raw = sample(2 << 30, &[1.0]);
        raw.cpu = vec![cpu(0.4, 0.4)];
        let c = CaseResult {
            name: "random-4".into(),
            kind: CaseKind::Random,
            pages: 4,
            runs: 4,
            memcpy: sample(2 << 30, &[1.0]),
            raw,
            push: vec![
                PushResult {
                    streams: 1,
                    sealed: false,
                    ofi: false,
                    sample: s.clone(),
                    verified: 3,
                },
                PushResult {
                    streams: 2,
                    sealed: false,
                    ofi: false,
                    sample: Sample {
                        cpu: vec![cpu(0.3, 0.3)],
                        ..s
                    },
                    verified: 3,
                },
            ],
        };
        // Raw: 0.4 s/GiB. Push: 1.0 at one stream, 0.3 at two: the lowest wins.
        let (streams, r) = c.cpu_target().unwrap();
        assert_eq!(streams, 2);
        assert!((r - 0.75).abs() < 1e-9, "{r}");
        let json = serde_json::to_string(&JsonCase::new(&c)).unwrap();
        assert!(json.contains(r#""cpu_over_raw_tcp":"#), "{json}");
        assert!(json.contains(r#""lowest_streams":2"#), "{json}");
    }
}
