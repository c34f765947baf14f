//! Compare throughput: identical TCP streams cut differently, against plain forwarding.
//!
//! `cargo bench -p colo-netcmp --bench compare`
//!
//! One TCP connection carries `COMPARE_BENCH_MIB` MiB (default 32) from the VM to the
//! client. The primary cuts it into 1448-byte segments, the secondary into 1000-byte
//! segments, and their ISNs differ. The frames are built once, before any timing.
//!
//! - **compare**: a fresh [`Engine`] takes the handshake, then the primary's and the
//!   secondary's frames interleaved by stream position; every primary frame must come out
//!   released and every byte must match (checked after timing, so a wrong result fails
//!   the benchmark).
//! - **baseline (same run)**: plain forwarding of the same frames without parsing or
//!   compare: each primary and secondary frame is copied into a pre-faulted transmit
//!   buffer, which is what a forwarder must at least do with both VMs' output.
//!
//! Input frames for each repetition are cloned outside the timed region (the engine
//! consumes its frames). Packets/s counts primary frames released; Gbit/s counts stream
//! payload bytes. The ratio is compare throughput over baseline throughput.

use std::hint::black_box;
use std::time::{Duration, Instant};

use colo_netcmp::testing::Seg;
use colo_netcmp::{Config, Engine, Output};

const P_ISN: u32 = 0xF000_0000;
const S_ISN: u32 = 0x0000_1000;
const C_ISN: u32 = 5000;
const REPS: usize = 5;

struct Frames {
    handshake_p: Vec<u8>,
    handshake_s: Vec<u8>,
    /// (is_primary, frame), interleaved by stream position.
    stream: Vec<(bool, Vec<u8>)>,
    primary_count: usize,
    bytes: u64,
}

fn build(total: usize) -> Frames {
    let data: Vec<u8> = (0..total)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
        .collect();
    let seg = |isn: u32, at: usize, c: &[u8]| {
        Seg::vm(
            isn.wrapping_add(1).wrapping_add(at as u32),
            Some(C_ISN + 1),
            c,
        )
        .frame()
    };
    let p: Vec<(usize, Vec<u8>)> = data
        .chunks(1448)
        .enumerate()
        .map(|(i, c)| (i * 1448, seg(P_ISN, i * 1448, c)))
        .collect();
    let s: Vec<(usize, Vec<u8>)> = data
        .chunks(1000)
        .enumerate()
        .map(|(i, c)| (i * 1000, seg(S_ISN, i * 1000, c)))
        .collect();
    let primary_count = p.len();
    let mut stream = Vec::with_capacity(p.len() + s.len());
    let (mut pi, mut si) = (p.into_iter().peekable(), s.into_iter().peekable());
    loop {
        match (pi.peek(), si.peek()) {
            (Some((a, _)), Some((b, _))) if a <= b => stream.push((true, pi.next().unwrap().1)),
            (Some(_), Some(_)) | (None, Some(_)) => stream.push((false, si.next().unwrap().1)),
            (Some(_), None) => stream.push((true, pi.next().unwrap().1)),
            (None, None) => break,
        }
    }
    Frames {
        handshake_p: Seg::vm(P_ISN, Some(C_ISN + 1), b"").syn().frame(),
        handshake_s: Seg::vm(S_ISN, Some(C_ISN + 1), b"").syn().frame(),
        stream,
        primary_count,
        bytes: total as u64,
    }
}

/// One compare run; returns the elapsed time.
fn run_compare(f: &Frames, input: Vec<(bool, Vec<u8>)>) -> Duration {
    let mut engine = Engine::new(Config::default()).expect("config");
    let mut out = Output::default();
    let now = Instant::now();
    engine.primary_frame(f.handshake_p.clone(), now, &mut out);
    engine.secondary_frame(f.handshake_s.clone(), now, &mut out);
    assert_eq!(out.to_client.len(), 1, "handshake released");
    out.clear();
    let mut released = 0usize;
    let t = Instant::now();
    for (primary, frame) in input {
        if primary {
            engine.primary_frame(frame, now, &mut out);
        } else {
            engine.secondary_frame(frame, now, &mut out);
        }
        released += out.to_client.len();
        out.to_client.clear();
    }
    let el = t.elapsed();
    let m = engine.metrics().snapshot();
    assert_eq!(released, f.primary_count, "every primary frame released");
    assert_eq!(m.matched_tcp_bytes, f.bytes, "every byte compared");
    assert_eq!(
        m.checkpoint_requests, 0,
        "identical streams ask for no checkpoint"
    );
    el
}

/// One baseline run: copy every frame into a transmit buffer.
fn run_baseline(input: &[(bool, Vec<u8>)], tx: &mut [u8]) -> Duration {
    let t = Instant::now();
    let mut at = 0usize;
    for (_, frame) in input {
        if at + frame.len() > tx.len() {
            at = 0;
        }
        tx[at..at + frame.len()].copy_from_slice(frame);
        at += frame.len();
    }
    black_box(&tx);
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: run tiny.
    let quick = !std::env::args().any(|a| a == "--bench");
    let mib: usize = std::env::var("COMPARE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 32 });
    let f = build(mib << 20);
    let frame_bytes: usize = f.stream.iter().map(|(_, fr)| fr.len()).sum();
    // A pre-faulted transmit ring of 8 MiB for the baseline.
    let mut tx = vec![1u8; 8 << 20];
    let reps = if quick { 1 } else { REPS };
    let (mut cmp_t, mut base_t) = (Vec::new(), Vec::new());
    // One warm-up of each, then alternate so both see the same machine state.
    let _ = run_baseline(&f.stream, &mut tx);
    let _ = run_compare(&f, f.stream.clone());
    for _ in 0..reps {
        base_t.push(run_baseline(&f.stream, &mut tx));
        let input = f.stream.clone();
        cmp_t.push(run_compare(&f, input));
    }
    let (c, b) = (median(cmp_t.clone()), median(base_t.clone()));
    let best_c = *cmp_t.iter().min().unwrap();
    let best_b = *base_t.iter().min().unwrap();
    let pps = |d: Duration| f.primary_count as f64 / d.as_secs_f64();
    let gbit = |d: Duration| f.bytes as f64 * 8.0 / d.as_secs_f64() / 1e9;
    println!(
        "compare bench: {mib} MiB stream; primary {} frames of 1448 B payload, secondary {} frames of 1000 B; \
         {:.1} MiB of frames in total; {reps} reps (median, best)",
        f.primary_count,
        f.stream.len() - f.primary_count,
        frame_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "  compare   (engine: parse, track, reassemble, compare, release): {:>10.0} pkt/s {:>7.2} Gbit/s  (best {:.2} Gbit/s)",
        pps(c),
        gbit(c),
        gbit(best_c)
    );
    println!(
        "  baseline  (copy both VMs' frames to a tx buffer, no compare):   {:>10.0} pkt/s {:>7.2} Gbit/s  (best {:.2} Gbit/s)",
        pps(b),
        gbit(b),
        gbit(best_b)
    );
    println!(
        "  ratio compare/baseline: {:.3} (median), {:.3} (best)",
        b.as_secs_f64() / c.as_secs_f64(),
        best_b.as_secs_f64() / best_c.as_secs_f64()
    );
}
