//! Engine throughput on one thread, against a copy baseline timed in the same run.

use std::hint::black_box;
use std::time::{Duration, Instant};

use colo_netcmp::{Config, Engine, Output};

use super::workloads::{Kind, Workload};

/// The timings of one workload: compare and baseline, one entry per repetition, taken
/// alternately so that both see the same machine state.
pub struct Measured {
    pub compare: Vec<Duration>,
    pub baseline: Vec<Duration>,
}

/// One warm-up of each, then `reps` alternating repetitions.
pub fn measure(w: &Workload, reps: usize, tx: &mut [u8]) -> Measured {
    let _ = run_baseline(w, tx);
    let _ = run_compare(w, w.stream.clone());
    let mut m = Measured {
        compare: Vec::with_capacity(reps),
        baseline: Vec::with_capacity(reps),
    };
    for _ in 0..reps {
        m.baseline.push(run_baseline(w, tx));
        // The engine consumes its frames: the copy is made outside the timed region.
        let input = w.stream.clone();
        m.compare.push(run_compare(w, input));
    }
    m
}

/// One compare run on a fresh engine; returns the time of the timed frames. Checks
/// afterwards that every primary frame was released, everything matched and no checkpoint
/// was asked for, so a wrong result fails the benchmark.
fn run_compare(w: &Workload, mut input: Vec<(bool, Vec<u8>)>) -> Duration {
    let mut engine = Engine::new(Config::default()).expect("config");
    let mut out = Output::default();
    let now = Instant::now();
    for (primary, frame) in &w.setup {
        feed(&mut engine, *primary, frame.clone(), now, &mut out);
    }
    assert_eq!(out.to_client.len(), w.setup_released, "{}: setup", w.name);
    out.clear();
    let mut released = 0usize;
    let t = Instant::now();
    for (primary, frame) in input.drain(..) {
        feed(&mut engine, primary, frame, now, &mut out);
        released += out.to_client.len();
        out.to_client.clear();
    }
    let el = t.elapsed();
    // The harness's input list is freed outside the timed region (freeing it would make
    // malloc consolidate every frame freed during the run there and then).
    drop(input);
    let m = engine.metrics().snapshot();
    assert_eq!(released, w.primary_count, "{}: every primary frame", w.name);
    match w.kind {
        Kind::Tcp => assert_eq!(m.matched_tcp_bytes, w.payload_bytes, "{}", w.name),
        Kind::Udp => assert_eq!(
            m.matched_packets as usize,
            w.primary_count + w.setup_released,
            "{}",
            w.name
        ),
    }
    assert_eq!(m.checkpoint_requests, 0, "{}: no checkpoint", w.name);
    assert_eq!(m.checkpoint_triggers, 0, "{}: no trigger", w.name);
    el
}

fn feed(engine: &mut Engine, primary: bool, frame: Vec<u8>, now: Instant, out: &mut Output) {
    if primary {
        engine.primary_frame(frame, now, out);
    } else {
        engine.secondary_frame(frame, now, out);
    }
}

/// One baseline run: copies every frame (both VMs') into a pre-faulted transmit ring,
/// which is what a forwarder must at least do with the output of both VMs.
fn run_baseline(w: &Workload, tx: &mut [u8]) -> Duration {
    let t = Instant::now();
    let mut at = 0usize;
    for (_, frame) in &w.stream {
        if at + frame.len() > tx.len() {
            at = 0;
        }
        tx[at..at + frame.len()].copy_from_slice(frame);
        at += frame.len();
    }
    black_box(&tx);
    t.elapsed()
}
