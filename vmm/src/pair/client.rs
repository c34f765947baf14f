//! The built-in client load of `colo pair`: a user-space TCP stack (smoltcp) that talks to
//! the guest's key-value service through the proxy's client port, with no tap device and
//! no root.
//!
//! It runs one connection and keeps `window` requests in flight: `SET k<n> <value>` and, every
//! few requests, a `GET` of an earlier key whose expected value it knows. A `GET` that
//! does not return the acknowledged value is counted as a *lost acknowledged write*, and
//! any reply that does not fit its request as a *contradiction*. Both must stay 0, across
//! checkpoints and across failover.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use colo_machine::peer::{FrameOut, PeerDevice};
use crossbeam_channel::Receiver;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};

/// Distinct keys the load writes (then overwrites).
const KEYS: u64 = 50_000;

/// What the client saw, shared with the status line.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Replies received.
    pub replies: AtomicU64,
    /// SETs acknowledged with OK.
    pub acked_sets: AtomicU64,
    /// GETs that did not return an acknowledged value.
    pub lost_acked: AtomicU64,
    /// Replies that do not fit their request.
    pub contradictions: AtomicU64,
    /// Longest wait for one reply, in microseconds.
    pub max_wait_us: AtomicU64,
    /// Connections made (1 while the first survives).
    pub connects: AtomicU64,
    /// Whether the connection is up.
    pub connected: AtomicBool,
    /// The first few anomalies (lost or contradicted), for the report.
    pub anomalies: std::sync::Mutex<Vec<String>>,
}

impl ClientStats {
    fn anomaly(&self, what: String) {
        tracing::error!("{what}");
        if let Ok(mut a) = self.anomalies.lock() {
            if a.len() < 8 {
                a.push(what);
            }
        }
    }
}

/// The client's addresses.
#[derive(Debug, Clone, Copy)]
pub struct ClientNet {
    /// The client's IPv4 address and prefix.
    pub ip: ([u8; 4], u8),
    /// The guest service.
    pub server: ([u8; 4], u16),
    /// Requests kept in flight (1: one at a time).
    pub window: usize,
}

/// Runs the load until `stop`: frames out on `tx`, in on `rx`. Returns every acknowledged
/// SET (key number → value).
pub fn run(
    net: ClientNet,
    tx: FrameOut,
    rx: Receiver<Vec<u8>>,
    stats: &Arc<ClientStats>,
    stop: &AtomicBool,
) -> HashMap<u64, u64> {
    let mut dev = PeerDevice::new(tx, rx);
    let start = Instant::now();
    let now = || SInstant::from_micros(start.elapsed().as_micros() as i64);
    let mac = EthernetAddress([0x52, 0x54, 0, 0xc1, 0x1e, 0x47]);
    let mut iface = Interface::new(Config::new(mac.into()), &mut dev, now());
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(
            IpAddress::Ipv4(Ipv4Address::from(net.ip.0)),
            net.ip.1,
        ));
    });
    let mut sockets = SocketSet::new(vec![]);
    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 65536]),
        tcp::SocketBuffer::new(vec![0; 65536]),
    );
    sock.set_ack_delay(None);
    sock.set_nagle_enabled(false);
    let h = sockets.add(sock);
    let server = (
        IpAddress::Ipv4(Ipv4Address::from(net.server.0)),
        net.server.1,
    );
    let mut port = 49152u16;
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut next = 0u64;
    let mut pending: std::collections::VecDeque<(String, Instant)> =
        std::collections::VecDeque::new();
    let window = net.window.max(1);
    let mut inbuf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        iface.poll(now(), &mut dev, &mut sockets);
        let s = sockets.get_mut::<tcp::Socket<'_>>(h);
        if !s.is_open() {
            stats.connected.store(false, Ordering::Relaxed);
            pending.clear();
            inbuf.clear();
            port = port.wrapping_add(1).max(49152);
            if s.connect(iface.context(), server, port).is_ok() {
                stats.connects.fetch_add(1, Ordering::Relaxed);
            }
        } else if s.may_send() && s.may_recv() {
            stats.connected.store(true, Ordering::Relaxed);
            while pending.len() < window
                && (window > 1 || s.send_queue() == 0)
                && s.send_capacity() - s.send_queue() >= 64
            {
                next += 1;
                // Keys cycle through KEYS, so the guest's memory stays bounded on long
                // runs; values grow with every request, so a stale or lost write shows.
                let key = next % KEYS + 1;
                let set = || format!("SET k{key} {}", next * 7);
                let req = if next % 4 == 0 && !acked.is_empty() {
                    let k = (next / 2) % KEYS + 1;
                    let in_flight = pending.iter().any(|(r, _)| {
                        r.strip_prefix("SET ")
                            .is_some_and(|x| x.starts_with(&format!("k{k} ")))
                    });
                    if acked.contains_key(&k) && !in_flight {
                        format!("GET k{k}")
                    } else {
                        set()
                    }
                } else {
                    set()
                };
                if s.send_slice(format!("{req}\n").as_bytes()).is_err() {
                    break;
                }
                pending.push_back((req, Instant::now()));
            }
            while s.can_recv() {
                let _ = s.recv(|b| {
                    inbuf.extend_from_slice(b);
                    (b.len(), ())
                });
            }
            while let Some(pos) = inbuf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = inbuf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line).trim().to_string();
                let Some((req, at)) = pending.pop_front() else {
                    stats.contradictions.fetch_add(1, Ordering::Relaxed);
                    stats.anomaly(format!("a reply {line:?} with no request outstanding"));
                    continue;
                };
                stats.replies.fetch_add(1, Ordering::Relaxed);
                stats
                    .max_wait_us
                    .fetch_max(at.elapsed().as_micros() as u64, Ordering::Relaxed);
                check(&req, &line, &mut acked, stats);
            }
        }
        let delay = iface
            .poll_delay(now(), &sockets)
            .map_or(Duration::from_millis(5), |d| {
                Duration::from_micros(d.total_micros())
            })
            .min(Duration::from_millis(5));
        let idle = pending.len() >= window || !stats.connected.load(Ordering::Relaxed);
        if idle && !delay.is_zero() {
            dev.wait(delay);
        }
    }
    acked
}

fn check(req: &str, reply: &str, acked: &mut HashMap<u64, u64>, stats: &ClientStats) {
    let mut p = req.split(' ');
    match (p.next(), p.next(), p.next()) {
        (Some("SET"), Some(k), Some(v)) if reply == "OK" || reply.starts_with("OK ") => {
            if let (Ok(k), Ok(v)) = (k[1..].parse(), v.parse()) {
                acked.insert(k, v);
                stats.acked_sets.fetch_add(1, Ordering::Relaxed);
            }
        }
        (Some("GET"), Some(k), None) => {
            let want = k[1..]
                .parse()
                .ok()
                .and_then(|k: u64| acked.get(&k).copied());
            let got = reply
                .strip_prefix("VALUE ")
                .and_then(|v| v.split(' ').next())
                .and_then(|v| v.parse::<u64>().ok());
            if want.is_some() && got != want {
                stats.lost_acked.fetch_add(1, Ordering::Relaxed);
                stats.anomaly(format!(
                    "lost: {req:?} -> {reply:?}, acknowledged value {want:?}"
                ));
            }
        }
        _ => {
            stats.contradictions.fetch_add(1, Ordering::Relaxed);
            stats.anomaly(format!("contradicted: {req:?} -> {reply:?}"));
        }
    }
}
