//! `colo client`: `colo pair`'s client load on its own, over a Unix socket of
//! length-prefixed Ethernet frames (a `colo proxy --client unix-listen:PATH` port, or a
//! side's own `--net-socket`). For clusters and tests, where the proxy and the sides are
//! separate processes: it prints what it saw and fails if any acknowledged write was lost
//! or any reply contradicted an earlier one.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use colo_netcmp::framing::{Decoder, MAX_FRAME, encode};

use super::client::{self, ClientNet, ClientStats};
use super::{CLIENT_IP, GUEST};
use crate::colo::ColoError;

/// `colo client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The Unix socket to connect to (4-byte big-endian length, then the frame).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// How long to run (e.g. 30s).
    #[arg(long, value_parser = crate::args::parse_secs)]
    pub duration: Duration,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// Print one JSON line of figures at the end.
    #[arg(long)]
    pub json: bool,
}

/// Runs `colo client`.
///
/// # Errors
/// [`ColoError::Io`] if the socket cannot be reached, [`ColoError::DataLost`] if an
/// acknowledged write was lost or a reply contradicted.
pub fn run(a: &ClientArgs) -> Result<(), ColoError> {
    let sock =
        UnixStream::connect(&a.socket).map_err(ColoError::io("connect to the client socket"))?;
    let reader = sock
        .try_clone()
        .map_err(ColoError::io("clone the client socket"))?;
    let writer = Arc::new(Mutex::new(sock));
    let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(4096);
    let stop = Arc::new(AtomicBool::new(false));
    // Frames in: the socket's bytes cut into frames, until it closes.
    let reading = std::thread::spawn(move || {
        let mut r = reader;
        let mut dec = Decoder::new(MAX_FRAME);
        let mut buf = vec![0u8; 65536];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => dec.feed(&buf[..n]),
            }
            while let Ok(Some(f)) = dec.next_frame() {
                if tx.send(f).is_err() {
                    return;
                }
            }
        }
    });
    let w = Arc::clone(&writer);
    let out: colo_machine::peer::FrameOut = Box::new(move |f: Vec<u8>| {
        let mut bytes = Vec::with_capacity(f.len() + 4);
        if encode(&f, &mut bytes).is_ok() {
            let mut s = w.lock().unwrap_or_else(|p| p.into_inner());
            let _ = s.write_all(&bytes);
        }
    });
    let stats = Arc::new(ClientStats::default());
    let net = ClientNet {
        ip: CLIENT_IP,
        server: GUEST,
        window: a.pipeline,
        vcpus: 1,
    };
    let (s2, st2) = (Arc::clone(&stats), Arc::clone(&stop));
    let start = Instant::now();
    let load = std::thread::spawn(move || client::run(net, out, rx, &s2, &st2));
    while start.elapsed() < a.duration {
        std::thread::sleep(Duration::from_millis(100).min(a.duration));
    }
    stop.store(true, Ordering::SeqCst);
    let acked = load.join().map(|m| m.len()).unwrap_or(0);
    let _ = writer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .shutdown(std::net::Shutdown::Both);
    let _ = reading.join();
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let (replies, lost, contra) = (
        get(&stats.replies),
        get(&stats.lost_acked),
        get(&stats.contradictions),
    );
    let max_wait_ms = get(&stats.max_wait_us) as f64 / 1e3;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "replies": replies,
                "acked_sets": get(&stats.acked_sets),
                "keys": acked,
                "lost_acked": lost,
                "contradictions": contra,
                "connects": get(&stats.connects),
                "max_wait_ms": max_wait_ms,
                "secs": start.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!(
            "client: {replies} replies, {} acknowledged SETs, {lost} lost acknowledged, \
             {contra} contradicted, longest wait {max_wait_ms:.0} ms",
            get(&stats.acked_sets)
        );
    }
    if lost > 0 || contra > 0 {
        if let Ok(a) = stats.anomalies.lock() {
            for what in a.iter() {
                eprintln!("client: {what}");
            }
        }
        return Err(ColoError::DataLost {
            lost,
            contradicted: contra,
        });
    }
    Ok(())
}
