//! What the sealed record layer costs on its own, beside a memcpy of the same bytes.
//!
//! `cargo bench -p colo-auth --bench seal` prints, for 4 KiB and 64 KiB records, the
//! throughput of sealing, of opening, and of both in turn (the work one pushed byte costs,
//! sender and receiver together) over 64 MiB of data, as the codec ([`Sealer::seal`] into
//! a buffer, [`Opener::open`] in place) and through the stream types ([`SealWriter`],
//! [`OpenReader`], which add a copy in and a copy out); then a same-run memcpy of the same
//! bytes in the same chunks, and the ratio. Last, one TCP loopback stream carrying 1 MiB
//! batches, plain and sealed (a writer thread and a reader thread: on this 2-core machine
//! sealing and opening each get a core, as on two hosts). Each figure is the median of
//! seven rounds; buffers are allocated and touched once.
//!
//! Measured on this project's 2-core machine (AMD EPYC with AES-NI, PCLMULQDQ and VAES;
//! 2026-12-05, machine otherwise quiet), GiB/s, with ring's AES-256-GCM (assembly that
//! runs AES and GHASH in one pass):
//!
//! | record | seal | open | seal+open | streams seal / open | memcpy | ratio |
//! |---|---|---|---|---|---|---|
//! | 4 KiB | 4.55 | 7.09 | 2.77 | 3.87 / 3.06 | 11.8 | 0.235 |
//! | 64 KiB | 4.40 | 8.62 | 2.91 | 3.19 / 3.30 | 10.8 | 0.269 |
//!
//! TCP loopback, one stream of 1 MiB batches: plain 2.83, sealed 1.10 (0.39 of plain).
//! With RustCrypto's aes-gcm 0.11 (AES-CTR and POLYVAL as two passes) the codec did 1.9-2.4
//! and one sealed stream 0.27-0.29 of plain, which is why the record layer uses ring.

use std::hint::black_box;
use std::io::{Cursor, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use colo_auth::seal::{OpenReader, Opened, Opener, SealWriter, Sealer, SessionKeys};
use colo_auth::{Channel, Role};

const DATA: usize = 64 << 20;
const ROUNDS: usize = 7;
const GIB: f64 = (1u64 << 30) as f64;

fn keys() -> (Sealer, Opener) {
    let session = [0x42; 32];
    let (sealer, _) = SessionKeys::new(&session, Role::Primary, Channel::Push(0)).split();
    let (_, opener) = SessionKeys::new(&session, Role::Secondary, Channel::Push(0)).split();
    (sealer, opener)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gibps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / GIB / secs
}

/// Seconds per round of `seal` then `open` (each timed), median of the rounds.
struct Timing {
    seal: f64,
    open: f64,
}

fn codec(payload: &[u8], record: usize, wire: &mut Vec<u8>) -> Timing {
    let (mut sealer, mut opener) = keys();
    let (mut seal, mut open) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        wire.clear();
        let t = Instant::now();
        for chunk in payload.chunks(record) {
            sealer.seal(&[chunk], wire).expect("seal");
        }
        seal.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut at = 0;
        let mut got = 0;
        while at < wire.len() {
            match opener.open(&mut wire[at..]).expect("open") {
                Opened::Data { plain, consumed } => {
                    got += plain.len();
                    at += consumed;
                }
                other => panic!("{other:?}"),
            }
        }
        open.push(t.elapsed().as_secs_f64());
        assert_eq!(got, payload.len());
    }
    Timing {
        seal: median(seal),
        open: median(open),
    }
}

fn stream(payload: &[u8], record: usize, wire: Vec<u8>, dst: &mut [u8]) -> (Timing, Vec<u8>) {
    let (sealer, opener) = keys();
    let mut w = SealWriter::new(wire, sealer);
    let mut r = OpenReader::new(
        Cursor::new(Vec::with_capacity(w.get_ref().capacity())),
        opener,
    );
    let (mut seal, mut open) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        w.get_mut().clear();
        let t = Instant::now();
        for chunk in payload.chunks(record) {
            w.write_all(chunk).expect("write");
            w.flush().expect("flush");
        }
        seal.push(t.elapsed().as_secs_f64());
        std::mem::swap(w.get_mut(), r.get_mut().get_mut());
        r.get_mut().set_position(0);
        let t = Instant::now();
        for chunk in dst.chunks_mut(record) {
            r.read_exact(chunk).expect("read");
        }
        open.push(t.elapsed().as_secs_f64());
    }
    assert!(dst == payload);
    let wire = std::mem::take(r.get_mut().get_mut());
    (
        Timing {
            seal: median(seal),
            open: median(open),
        },
        wire,
    )
}

fn memcpy(payload: &[u8], record: usize, dst: &mut [u8]) -> f64 {
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for (d, s) in dst.chunks_mut(record).zip(payload.chunks(record)) {
            d.copy_from_slice(s);
        }
        black_box(&mut *dst);
        times.push(t.elapsed().as_secs_f64());
    }
    median(times)
}

/// GiB/s of one TCP loopback stream carrying `total` bytes in `batch`-byte writes.
fn tcp(total: usize, batch: usize, sealed: bool) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let reader = thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        let mut buf = vec![1u8; batch];
        let mut r: Box<dyn Read> = if sealed {
            Box::new(OpenReader::new(s, keys().1))
        } else {
            Box::new(s)
        };
        let t = Instant::now();
        let mut got = 0;
        while got < total {
            r.read_exact(&mut buf).expect("read");
            got += batch;
        }
        t.elapsed()
    });
    let s = TcpStream::connect(addr).expect("connect");
    let batch_bytes = vec![7u8; batch];
    let mut w: Box<dyn Write> = if sealed {
        Box::new(SealWriter::new(s, keys().0))
    } else {
        Box::new(s)
    };
    let mut sent = 0;
    while sent < total {
        w.write_all(&batch_bytes).expect("write");
        w.flush().expect("flush");
        sent += batch;
    }
    let took: Duration = reader.join().expect("reader");
    gibps(total, took.as_secs_f64())
}

fn main() {
    let payload: Vec<u8> = (0..DATA).map(|i| (i * 31 + (i >> 12)) as u8).collect();
    let mut dst = vec![1u8; DATA];
    let mut wire = vec![1u8; DATA + DATA / 100];
    wire.clear();
    println!(
        "AES-256-GCM record layer over {} MiB, median of {ROUNDS} rounds (GiB/s of plaintext)",
        DATA >> 20
    );
    println!(
        "{:>8} {:>7} {:>7} {:>7} {:>10} {:>7} {:>7} {:>7} {:>10} {:>7} {:>7}",
        "record", "seal", "open", "both", "", "w seal", "r open", "both", "", "memcpy", "ratio"
    );
    for record in [4096, 65_536] {
        let c = codec(&payload, record, &mut wire);
        let (s, w) = stream(&payload, record, std::mem::take(&mut wire), &mut dst);
        wire = w;
        let m = memcpy(&payload, record, &mut dst);
        let both = gibps(DATA, c.seal + c.open);
        let stream_both = gibps(DATA, s.seal + s.open);
        println!(
            "{:>6}KiB {:>7.2} {:>7.2} {:>7.2} {:>10} {:>7.2} {:>7.2} {:>7.2} {:>10} {:>7.2} {:>7.3}",
            record >> 10,
            gibps(DATA, c.seal),
            gibps(DATA, c.open),
            both,
            "(codec)",
            gibps(DATA, s.seal),
            gibps(DATA, s.open),
            stream_both,
            "(streams)",
            gibps(DATA, m),
            both / gibps(DATA, m),
        );
    }
    println!("ratio: codec seal+open against memcpy of the same bytes in the same chunks");
    let total = 512 << 20;
    let batch = 1 << 20;
    let mut plain = Vec::new();
    let mut sealed = Vec::new();
    for _ in 0..3 {
        plain.push(tcp(total, batch, false));
        sealed.push(tcp(total, batch, true));
    }
    let (plain, sealed) = (median(plain), median(sealed));
    println!(
        "TCP loopback, one stream, {} MiB in 1 MiB batches (median of 3): plain {plain:.2} GiB/s, sealed {sealed:.2} GiB/s, sealed/plain {:.2}",
        total >> 20,
        sealed / plain
    );
}
