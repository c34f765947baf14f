//! The printed tables and the target lines.

use std::time::Duration;

use super::latency::Latencies;
use super::throughput::Measured;
use super::workloads::Workload;

/// One throughput row: a workload's figures, median and best of its repetitions.
pub struct Row {
    key: &'static str,
    name: String,
    primary: usize,
    secondary: usize,
    payload_bytes: u64,
    frame_bytes: usize,
    cmp: (Duration, Duration),
    base: (Duration, Duration),
    /// Median of the per-repetition ratios (each baseline and compare pair runs back to
    /// back, so drift in the machine's load cancels out).
    paired: f64,
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn best(v: &[Duration]) -> Duration {
    v.iter().copied().min().unwrap_or_default()
}

impl Row {
    pub fn new(key: &'static str, w: &Workload, m: &Measured) -> Self {
        Self {
            key,
            name: w.name.clone(),
            primary: w.primary_count,
            secondary: w.stream.len() - w.primary_count,
            payload_bytes: w.payload_bytes,
            frame_bytes: w.frame_bytes(),
            cmp: (median(&m.compare), best(&m.compare)),
            base: (median(&m.baseline), best(&m.baseline)),
            paired: {
                let mut r: Vec<f64> = m
                    .baseline
                    .iter()
                    .zip(&m.compare)
                    .map(|(b, c)| b.as_secs_f64() / c.as_secs_f64())
                    .collect();
                r.sort_by(f64::total_cmp);
                r.get(r.len() / 2).copied().unwrap_or_default()
            },
        }
    }

    fn pps(&self, d: Duration) -> f64 {
        self.primary as f64 / d.as_secs_f64()
    }

    fn gbit(&self, d: Duration) -> f64 {
        self.payload_bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
    }

    /// Compare throughput over baseline throughput: (median of the paired repetitions,
    /// best over best).
    fn ratio(&self) -> (f64, f64) {
        (
            self.paired,
            self.base.1.as_secs_f64() / self.cmp.1.as_secs_f64(),
        )
    }
}

pub fn print_throughput(rows: &[Row], reps: usize, mib: usize, udp_packets: usize) {
    println!(
        "throughput: one engine thread; tcp {mib} MiB stream, udp {udp_packets} datagrams; \
         {reps} reps, median [best]"
    );
    println!(
        "  baseline (same run): copy the same frames of both VMs into a pre-faulted tx ring, \
         no parse or compare; ratio = compare / baseline throughput, median of the paired \
         reps [best / best]"
    );
    println!(
        "  {:<30} {:>15} {:>7} | {:>19} {:>15} | {:>19} {:>15} | {:>15}",
        "workload",
        "frames p/s",
        "MiB",
        "compare pkt/s",
        "payload Gbit/s",
        "baseline pkt/s",
        "payload Gbit/s",
        "ratio"
    );
    for r in rows {
        let (rm, rb) = r.ratio();
        println!(
            "  {:<30} {:>15} {:>7.1} | {:>10.0} [{:>6.2}M] {:>6.2} [{:>6.2}] | {:>10.0} [{:>6.2}M] {:>6.2} [{:>6.2}] | {:>6.3} [{:>6.3}]",
            r.name,
            format!("{}/{}", r.primary, r.secondary),
            r.frame_bytes as f64 / f64::from(1 << 20),
            r.pps(r.cmp.0),
            r.pps(r.cmp.1) / 1e6,
            r.gbit(r.cmp.0),
            r.gbit(r.cmp.1),
            r.pps(r.base.0),
            r.pps(r.base.1) / 1e6,
            r.gbit(r.base.0),
            r.gbit(r.base.1),
            rm,
            rb,
        );
    }
}

/// The `p`-th percentile (0..=100) of `v`.
fn pct(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p / 100.0).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Proxy percentile minus direct percentile, in microseconds (may be negative: noise).
fn added(l: &Latencies, p: f64) -> f64 {
    us(pct(&l.proxy, p)) - us(pct(&l.direct, p))
}

pub fn print_latency(lats: &[(&str, Latencies)], rtts: usize, warmup: usize, block: usize) {
    println!(
        "latency: client frame in -> both VMs answer with identical replies -> primary's reply at the client"
    );
    println!(
        "  proxy = threaded Proxy on in-process channel ports; direct (same run) = the same \
         reader threads, event queue and hub thread with no engine"
    );
    println!(
        "  {rtts} round trips per path after {warmup} warm-up, alternating blocks of {block}; \
         64-byte payloads; microseconds; added = proxy - direct at each percentile"
    );
    println!(
        "  {:<5} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>9} {:>9} {:>9}",
        "", "proxy50", "p99", "p99.9", "direct50", "p99", "p99.9", "added50", "added99", "ratio99"
    );
    for (name, l) in lats {
        println!(
            "  {:<5} | {:>8.1} {:>8.1} {:>8.1} | {:>8.1} {:>8.1} {:>8.1} | {:>9.1} {:>9.1} {:>9.2}",
            name,
            us(pct(&l.proxy, 50.0)),
            us(pct(&l.proxy, 99.0)),
            us(pct(&l.proxy, 99.9)),
            us(pct(&l.direct, 50.0)),
            us(pct(&l.direct, 99.0)),
            us(pct(&l.direct, 99.9)),
            added(l, 50.0),
            added(l, 99.0),
            us(pct(&l.proxy, 99.0)) / us(pct(&l.direct, 99.0)),
        );
    }
    let s: Vec<String> = lats
        .iter()
        .map(|(n, l)| {
            format!(
                "{n}: {} released, {} checkpoints",
                l.released, l.checkpoints
            )
        })
        .collect();
    println!("  proxy counters: {}", s.join("; "));
}

/// One target line: what, the figure, its same-run context, and the verdict (none in a
/// quick run, which is a debug build on tiny inputs).
fn target(what: &str, figure: String, context: String, ok: bool, quick: bool) {
    let verdict = match (quick, ok) {
        (true, _) => "(quick run: not judged)",
        (false, true) => "MET",
        (false, false) => "NOT MET",
    };
    println!("  {what:<58} {figure:>13}  ({context})  {verdict}");
}

pub fn print_targets(rows: &[Row], lats: &[(&str, Latencies)], quick: bool) {
    println!("targets (medians; ratio = compare / same-run baseline):");
    for r in rows {
        let (rm, _) = r.ratio();
        let (pps, g) = (r.pps(r.cmp.0), r.gbit(r.cmp.0));
        match r.key {
            "udp-flows" | "udp-1flow" => target(
                &format!(">= 1 M matched small pkt/s: {}", r.name),
                format!("{:.2} M/s", pps / 1e6),
                format!("baseline {:.2} M/s, ratio {rm:.3}", r.pps(r.base.0) / 1e6),
                pps >= 1e6,
                quick,
            ),
            "tcp1448" => target(
                &format!(">= 10 Gbit/s payload: {}", r.name),
                format!("{g:.2} Gbit/s"),
                format!(
                    "{:.0} seg/s; baseline {:.2} Gbit/s, ratio {rm:.3}",
                    pps,
                    r.gbit(r.base.0)
                ),
                g >= 10.0,
                quick,
            ),
            _ => println!(
                "  {:<58} {:>13}  (baseline {:.2} Gbit/s, ratio {rm:.3})  informational",
                format!("(no target) {}", r.name),
                format!("{g:.2} Gbit/s"),
                r.gbit(r.base.0),
            ),
        }
    }
    for (name, l) in lats {
        let a = added(l, 99.0);
        target(
            &format!("p99 added latency < 100 us: {name} 64 B request/reply"),
            format!("{a:.1} us"),
            format!(
                "proxy p99 {:.1} us, direct p99 {:.1} us",
                us(pct(&l.proxy, 99.0)),
                us(pct(&l.direct, 99.0))
            ),
            a < 100.0,
            quick,
        );
    }
}
