//! Compare throughput and added latency of the COLO proxy, each beside a baseline timed in
//! the same run (the machine is noisy: only same-run ratios mean anything).
//!
//! `cargo bench -p colo-netcmp --bench compare`
//!
//! **Throughput** (one thread, the sans-I/O [`Engine`], `COMPARE_BENCH_REPS` repetitions,
//! default 9; median and best):
//! - `tcp 1448/1448`: one TCP connection carries `COMPARE_BENCH_MIB` MiB (default 32)
//!   from the VM to the client, both VMs cut it into 1448-byte segments, their ISNs differ.
//! - `tcp 1448/1000`: the same stream, the secondary cut into 1000-byte segments.
//! - `udp 64 B`: `COMPARE_BENCH_UDP_PACKETS` (default 262144) datagrams with 64 payload
//!   bytes, over 4096 flows and over one flow; the secondary runs 16 datagrams behind.
//!
//! The engine takes the primary's and the secondary's frames in arrival order; every
//! primary frame must come out released and everything must match (checked after timing,
//! so a wrong result fails the benchmark). Packets/s counts primary frames released;
//! Gbit/s counts their payload bytes.
//!
//! Input frames are cloned outside the timed region (the engine consumes them), and the
//! harness's list of them is freed outside it too; frames the engine drops or releases are
//! freed inside it.
//!
//! The **baseline** copies the same frames of both VMs into a pre-faulted 8 MiB transmit
//! ring, without parsing or compare: what a forwarder must at least do with both VMs'
//! output. Each repetition times the baseline and then the compare back to back; the ratio
//! printed is the median over repetitions of compare throughput over baseline throughput
//! (and, in brackets, best over best).
//!
//! **Latency** (`COMPARE_BENCH_RTTS` timed round trips per path, default 20000, in
//! alternating blocks of `COMPARE_BENCH_RTT_BLOCK`, default 10): see
//! `compare/latency.rs`. The threaded [`colo_netcmp::proxy::Proxy`] on in-process channel
//! ports against a direct path with the same threads and channels but no engine. Added
//! latency is the proxy's percentile minus the direct path's.
//!
//! `COMPARE_BENCH_ONLY=tcp1448,tcp1000,udp-flows,udp-1flow,latency` runs a subset (for
//! profiling). Without `--bench` (`cargo test --benches`) everything runs tiny and the
//! targets are not judged.

// The bench's own modules live in `benches/compare/` (Cargo does not take them for
// benchmarks of their own there).
#[path = "compare/latency.rs"]
mod latency;
#[path = "compare/report.rs"]
mod report;
#[path = "compare/throughput.rs"]
mod throughput;
#[path = "compare/workloads.rs"]
mod workloads;

use report::{Row, print_latency, print_targets, print_throughput};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: run tiny then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let only = std::env::var("COMPARE_BENCH_ONLY").unwrap_or_default();
    let want = |what: &str| only.is_empty() || only.split(',').any(|w| w == what);
    let mib = env("COMPARE_BENCH_MIB", if quick { 1 } else { 32 });
    let udp_packets = env(
        "COMPARE_BENCH_UDP_PACKETS",
        if quick { 4096 } else { 1 << 18 },
    );
    let reps = env("COMPARE_BENCH_REPS", if quick { 1 } else { 9 });
    let rtts = env("COMPARE_BENCH_RTTS", if quick { 200 } else { 20_000 });

    // The baseline's transmit ring, allocated and touched once.
    let mut tx = vec![1u8; 8 << 20];
    let mut rows = Vec::new();
    for key in ["tcp1448", "tcp1000", "udp-flows", "udp-1flow"] {
        if !want(key) {
            continue;
        }
        // Built one at a time: only one workload's frames are in memory at once.
        let w = match key {
            "tcp1448" => workloads::tcp(mib << 20, 1448, 1448),
            "tcp1000" => workloads::tcp(mib << 20, 1448, 1000),
            "udp-flows" => workloads::udp(udp_packets, 64, 4096, 16),
            _ => workloads::udp(udp_packets, 64, 1, 16),
        };
        let m = throughput::measure(&w, reps, &mut tx);
        rows.push(Row::new(key, &w, &m));
    }
    if !rows.is_empty() {
        print_throughput(&rows, reps, mib, udp_packets);
    }

    let mut lats = Vec::new();
    if want("latency") {
        let warmup = (rtts / 10).max(100);
        let block = env("COMPARE_BENCH_RTT_BLOCK", 10);
        for script in [
            latency::Script::udp(warmup + rtts, 64),
            latency::Script::tcp(warmup + rtts, 64),
        ] {
            let l = latency::measure(&script, warmup, rtts, block);
            lats.push((script.name, l));
        }
        print_latency(&lats, rtts, warmup, block);
    }
    print_targets(&rows, &lats, quick);
}
