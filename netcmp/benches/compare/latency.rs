//! Added latency of the threaded proxy, against a direct path of the same shape.
//!
//! Both paths have the same threads and channels:
//!
//! ```text
//!  client ─ch─> reader ─┐                  ┌─ch─> primary responder ─ch─> reader ─┐
//!  (bench)              ├─ events ─> hub ──┤                                      ├─> hub ─ch─> client
//!                       │                  └─ch─> secondary responder ─ch─> reader┘
//! ```
//!
//! - **proxy**: [`Proxy`] with [`channel::port`] ports; the hub is the engine thread
//!   (parse, track, translate acks, compare, release).
//! - **direct**: the same reader threads, event queue and hub thread written here without
//!   the engine: the hub copies a client frame to both VMs (as the channel writer does),
//!   sends the primary's reply to the client and drops the secondary's.
//!
//! The bench thread sends one client frame, both responders answer it with their reply,
//! and the time until the primary's reply reaches the client end is one round trip.
//! Round trips run in blocks that alternate between the two paths, so both see the same
//! machine state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use colo_netcmp::io::channel::{self, VmEnd};
use colo_netcmp::proxy::{Ports, Proxy};
use colo_netcmp::testing::{CLIENT_IP, CLIENT_MAC, Seg, VM_IP, VM_MAC, udp_from_vm};
use colo_netcmp::{Config, Side};
use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use etherparse::PacketBuilder;

use super::workloads::{C_ISN, P_ISN, S_ISN};

/// Frames each port queues, as a NIC ring would.
const PORT_QUEUE: usize = 1024;
/// The proxy's event queue (`EVENT_QUEUE` in `proxy/mod.rs`).
const EVENT_QUEUE: usize = 8192;
/// How long the reader and hub threads wait per read (`READ_SLICE` in `proxy/mod.rs`).
const READ_SLICE: Duration = Duration::from_millis(100);
/// How long a round trip may take before the bench fails.
const RTT_LIMIT: Duration = Duration::from_secs(5);

/// A request/response conversation: the i-th client frame is answered by the i-th
/// primary and secondary replies; the client must receive the i-th primary reply.
pub struct Script {
    pub name: &'static str,
    requests: Vec<Vec<u8>>,
    primary: Arc<Vec<Vec<u8>>>,
    secondary: Arc<Vec<Vec<u8>>>,
}

impl Script {
    /// `n` UDP requests of `size` payload bytes, each answered by a `size`-byte datagram.
    pub fn udp(n: usize, size: usize) -> Self {
        let requests = (0..n)
            .map(|i| {
                let payload: Vec<u8> = (0..size).map(|j| (i + j) as u8).collect();
                let b = PacketBuilder::ethernet2(CLIENT_MAC, VM_MAC)
                    .ipv4(CLIENT_IP.octets(), VM_IP.octets(), 64)
                    .udp(5353, 53);
                let mut v = Vec::new();
                b.write(&mut v, &payload).expect("a Vec");
                v
            })
            .collect();
        let replies: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let payload: Vec<u8> = (0..size).map(|j| (i * 3 + j) as u8).collect();
                udp_from_vm(53, &payload)
            })
            .collect();
        Self {
            name: "udp",
            requests,
            primary: Arc::new(replies.clone()),
            secondary: Arc::new(replies),
        }
    }

    /// One TCP connection: a handshake (request 0), then `n - 1` requests of `size` bytes,
    /// each answered by `size` bytes. The VMs' ISNs differ, so the proxy translates every
    /// client acknowledgment for the secondary.
    pub fn tcp(n: usize, size: usize) -> Self {
        let len = size as u32;
        let data = |i: usize| -> Vec<u8> { (0..size).map(|j| (i * 5 + j) as u8).collect() };
        let mut requests = vec![Seg::client(C_ISN, None, b"").syn().frame()];
        let reply = |isn: u32, k: usize| {
            if k == 0 {
                return Seg::vm(isn, Some(C_ISN + 1), b"").syn().frame();
            }
            let at = (k as u32 - 1).wrapping_mul(len);
            let ack = C_ISN + 1 + k as u32 * len;
            Seg::vm(isn.wrapping_add(1).wrapping_add(at), Some(ack), &data(k)).frame()
        };
        for k in 1..n {
            let at = (k as u32 - 1).wrapping_mul(len);
            let ack = P_ISN.wrapping_add(1).wrapping_add(at);
            requests.push(Seg::client(C_ISN + 1 + at, Some(ack), &data(k + 7)).frame());
        }
        Self {
            name: "tcp",
            requests,
            primary: Arc::new((0..n).map(|k| reply(P_ISN, k)).collect()),
            secondary: Arc::new((0..n).map(|k| reply(S_ISN, k)).collect()),
        }
    }
}

/// The VM-side or client-side end of a path.
trait End: Send + 'static {
    fn put(&self, frame: Vec<u8>);
    /// `None` on timeout; `Err` once the path is gone.
    fn get(&self, timeout: Duration) -> Result<Option<Vec<u8>>, ()>;
}

impl End for VmEnd {
    fn put(&self, frame: Vec<u8>) {
        let _ = self.send(frame);
    }

    fn get(&self, timeout: Duration) -> Result<Option<Vec<u8>>, ()> {
        self.recv_timeout(timeout).map_err(|_| ())
    }
}

/// An end of the direct path: plain crossbeam channels.
struct RawEnd {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
}

impl End for RawEnd {
    fn put(&self, frame: Vec<u8>) {
        let _ = self.tx.send(frame);
    }

    fn get(&self, timeout: Duration) -> Result<Option<Vec<u8>>, ()> {
        match self.rx.recv_timeout(timeout) {
            Ok(f) => Ok(Some(f)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(()),
        }
    }
}

/// A VM that answers its i-th frame with `replies[i]`, until its end closes or `stop`.
fn responder(end: impl End, replies: Arc<Vec<Vec<u8>>>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            match end.get(READ_SLICE) {
                Ok(Some(_)) => {
                    let Some(r) = replies.get(i) else { return };
                    end.put(r.clone());
                    i += 1;
                }
                Ok(None) => {}
                Err(()) => return,
            }
        }
    })
}

/// The direct path's threads: readers, event queue, hub.
struct Direct {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Direct {
    /// Starts the path; returns it with the client's, the primary's and the secondary's
    /// ends.
    fn start() -> (Self, RawEnd, RawEnd, RawEnd) {
        let stop = Arc::new(AtomicBool::new(false));
        let (ev_tx, ev_rx) = crossbeam_channel::bounded::<(Side, Vec<u8>)>(EVENT_QUEUE);
        let mut threads = Vec::new();
        let mut ends = Vec::new();
        let mut writers = Vec::new();
        for side in [Side::Client, Side::Primary, Side::Secondary] {
            let (to_proxy, from_vm) = crossbeam_channel::bounded::<Vec<u8>>(PORT_QUEUE);
            let (to_vm, from_proxy) = crossbeam_channel::bounded::<Vec<u8>>(PORT_QUEUE);
            ends.push(RawEnd {
                tx: to_proxy,
                rx: from_proxy,
            });
            writers.push(to_vm);
            let (ev_tx, stop) = (ev_tx.clone(), Arc::clone(&stop));
            threads.push(std::thread::spawn(move || {
                reader(side, &from_vm, &ev_tx, &stop);
            }));
        }
        drop(ev_tx);
        let hub_stop = Arc::clone(&stop);
        threads.push(std::thread::spawn(move || {
            hub(&ev_rx, &writers, &hub_stop);
        }));
        let mut ends = ends.into_iter();
        let mut next = || ends.next().expect("three ends");
        let (c, p, s) = (next(), next(), next());
        (Self { stop, threads }, c, p, s)
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// What the proxy's reader threads do: port to event queue, with back-pressure.
fn reader(side: Side, rx: &Receiver<Vec<u8>>, tx: &Sender<(Side, Vec<u8>)>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let f = match rx.recv_timeout(READ_SLICE) {
            Ok(f) => f,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut ev = Some((side, f));
        while let Some(e) = ev.take() {
            match tx.send_timeout(e, READ_SLICE) {
                Ok(()) => {}
                Err(SendTimeoutError::Timeout(e)) if !stop.load(Ordering::Relaxed) => ev = Some(e),
                Err(_) => return,
            }
        }
    }
}

/// The hub without an engine: mirrors client frames, passes the primary's output.
fn hub(rx: &Receiver<(Side, Vec<u8>)>, writers: &[Sender<Vec<u8>>], stop: &AtomicBool) {
    let [client, primary, secondary] = writers else {
        return;
    };
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(READ_SLICE) {
            Ok((Side::Client, f)) => {
                // The channel writer copies each frame it sends.
                let _ = primary.try_send(f.to_vec());
                let _ = secondary.try_send(f.to_vec());
            }
            Ok((Side::Primary, f)) => {
                let _ = client.try_send(f.to_vec());
            }
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Round-trip times of both paths for one script.
pub struct Latencies {
    pub proxy: Vec<Duration>,
    pub direct: Vec<Duration>,
    /// Frames the proxy released and checkpoints it asked for, for the report.
    pub released: u64,
    pub checkpoints: u64,
}

/// Runs `warmup` untimed round trips on each path, then `measured` timed ones in
/// alternating blocks of `block`.
pub fn measure(script: &Script, warmup: usize, measured: usize, block: usize) -> Latencies {
    let total = warmup + measured;
    assert!(script.requests.len() >= total, "script too short");
    let stop = Arc::new(AtomicBool::new(false));

    let (cp, client) = channel::port("client", PORT_QUEUE);
    let (pp, pvm) = channel::port("primary", PORT_QUEUE);
    let (sp, svm) = channel::port("secondary", PORT_QUEUE);
    let proxy = Proxy::start(
        Config::default(),
        Ports {
            client: cp,
            primary: pp,
            secondary: sp,
        },
    )
    .expect("proxy starts");
    let (direct, d_client, d_pvm, d_svm) = Direct::start();
    let responders = [
        responder(pvm, Arc::clone(&script.primary), Arc::clone(&stop)),
        responder(svm, Arc::clone(&script.secondary), Arc::clone(&stop)),
        responder(d_pvm, Arc::clone(&script.primary), Arc::clone(&stop)),
        responder(d_svm, Arc::clone(&script.secondary), Arc::clone(&stop)),
    ];

    let mut lat = Latencies {
        proxy: Vec::with_capacity(measured),
        direct: Vec::with_capacity(measured),
        released: 0,
        checkpoints: 0,
    };
    let mut sink = Vec::new();
    round_trips(script, &client, 0..warmup, &mut sink);
    round_trips(script, &d_client, 0..warmup, &mut sink);
    let mut at = warmup;
    while at < total {
        let end = (at + block).min(total);
        round_trips(script, &client, at..end, &mut lat.proxy);
        round_trips(script, &d_client, at..end, &mut lat.direct);
        at = end;
    }

    let m = proxy.metrics();
    lat.released = m.released_frames;
    lat.checkpoints = m.checkpoint_requests;
    assert_eq!(m.released_frames as usize, total, "every reply released");
    assert_eq!(
        m.checkpoint_requests, 0,
        "identical replies ask for no checkpoint"
    );
    stop.store(true, Ordering::Relaxed);
    proxy.shutdown().expect("proxy stops cleanly");
    direct.stop();
    drop((client, d_client));
    for r in responders {
        let _ = r.join();
    }
    lat
}

/// Round trips `range` of `script` through `client`'s path.
fn round_trips(
    script: &Script,
    client: &dyn End,
    range: std::ops::Range<usize>,
    out: &mut Vec<Duration>,
) {
    for i in range {
        let req = script.requests[i].clone();
        let t = Instant::now();
        client.put(req);
        let got = client.get(RTT_LIMIT);
        let el = t.elapsed();
        let got = got.ok().flatten().expect("a reply within the limit");
        assert!(
            got == script.primary[i],
            "{}: reply {i} is the primary's",
            script.name
        );
        out.push(el);
    }
}
