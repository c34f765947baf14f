//! The built-in client load of `colo pair`: a user-space TCP stack (smoltcp) that talks to
//! the guest's key-value service through the proxy's client port, with no tap device and
//! no root.
//!
//! It runs one connection and keeps `window` requests in flight: `SET k<n> <value>` and, every
//! few requests, a `GET` of an earlier key whose expected value it knows. A `GET` that
//! does not return the acknowledged value is counted as a *lost acknowledged write*, and
//! any reply that does not fit its request as a *contradiction*. Both must stay 0, across
//! checkpoints and across failover.
//!
//! On a guest with several vCPUs it also asks `VCPUS` every [`VCPUS_EVERY`]: each worker
//! vCPU's turn counter must never go back from one reply to the next (a reply released to
//! the client is covered by a checkpoint, so a secondary that took over counts on from at
//! least there); a counter that goes back is a contradiction too.

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
/// How often the client asks for the worker vCPUs' counters (each answer differs between
/// the two VMs, so in COLO mode each one costs a checkpoint).
pub const VCPUS_EVERY: Duration = Duration::from_millis(250);

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
    /// Set by the supervisor when the primary dies (killed, or seen to end): from then on
    /// the client notes its longest silence and its longest wait, which the failover
    /// causes.
    pub watch_failover: AtomicBool,
    /// The silences (at least [`SILENCE_MIN`] between two replies) whose end came after
    /// `watch_failover` was set, in order: when the reply before came, and the one after
    /// (the first [`SILENCES_KEPT`]).
    pub failover_silences: std::sync::Mutex<Vec<(Instant, Instant)>>,
    /// The longest wait for one reply that came after `watch_failover` was set, in
    /// microseconds.
    pub failover_max_wait_us: AtomicU64,
    /// When the proxy switched the client to the secondary (set by the supervisor).
    pub switched: Arc<std::sync::OnceLock<Instant>>,
    /// The longest wait, in microseconds, of a request the failover caught: sent before
    /// `switched`, answered after `watch_failover` was set.
    pub caught_max_wait_us: AtomicU64,
    /// The first few anomalies (lost or contradicted), for the report.
    pub anomalies: std::sync::Mutex<Vec<String>>,
    /// The worker vCPUs' counters in the latest `VCPUS` reply (vCPUs 1 and up).
    pub vcpu_turns: std::sync::Mutex<Vec<u64>>,
    /// `VCPUS` replies checked.
    pub vcpu_checks: AtomicU64,
    /// `VCPUS` replies in which a counter went back (also counted as contradictions).
    pub vcpu_regressions: AtomicU64,
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
    /// The guest's vCPU count: above 1, the client checks the workers' counters.
    pub vcpus: u32,
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
    let mut last_vcpus = Instant::now();
    let mut last_reply: Option<Instant> = None;
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
                let req = if net.vcpus > 1 && last_vcpus.elapsed() >= VCPUS_EVERY {
                    last_vcpus = Instant::now();
                    "VCPUS".to_string()
                } else if next % 4 == 0 && !acked.is_empty() {
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
                let (got, wait) = (Instant::now(), at.elapsed().as_micros() as u64);
                stats.max_wait_us.fetch_max(wait, Ordering::Relaxed);
                if stats.watch_failover.load(Ordering::Relaxed) {
                    stats
                        .failover_max_wait_us
                        .fetch_max(wait, Ordering::Relaxed);
                    if stats.switched.get().is_none_or(|&w| at <= w) {
                        stats.caught_max_wait_us.fetch_max(wait, Ordering::Relaxed);
                    }
                    if let Some(prev) = last_reply {
                        note_silence(stats, prev, got);
                    }
                }
                last_reply = Some(got);
                check(&req, &line, &mut acked, stats, net.vcpus);
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

/// The shortest time between two replies kept as a silence after the primary's death.
pub const SILENCE_MIN: Duration = Duration::from_millis(1);
/// Silences kept after the primary's death.
pub const SILENCES_KEPT: usize = 4096;

/// Keeps `(prev, got)` as a silence after the primary's death, if it is one.
fn note_silence(stats: &ClientStats, prev: Instant, got: Instant) {
    if got - prev < SILENCE_MIN {
        return;
    }
    if let Ok(mut s) = stats.failover_silences.lock() {
        if s.len() < SILENCES_KEPT {
            s.push((prev, got));
        }
    }
}

fn check(req: &str, reply: &str, acked: &mut HashMap<u64, u64>, stats: &ClientStats, vcpus: u32) {
    let mut p = req.split(' ');
    match (p.next(), p.next(), p.next()) {
        (Some("VCPUS"), None, None) => check_vcpus(reply, stats, vcpus),
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

/// Checks a `VCPUS` reply (`VCPUS <n> <turns of vCPU 1> ... <turns of vCPU n-1>`, maybe
/// with a TSC stamp after): the vCPU count, and no worker's counter below its last value.
fn check_vcpus(reply: &str, stats: &ClientStats, vcpus: u32) {
    let mut f = reply.split(' ');
    let turns: Option<Vec<u64>> = match (f.next(), f.next().and_then(|n| n.parse::<u32>().ok())) {
        (Some("VCPUS"), Some(n)) if n == vcpus => f
            .take(vcpus.saturating_sub(1) as usize)
            .map(|t| t.parse().ok())
            .collect(),
        _ => None,
    };
    let Some(turns) = turns.filter(|t| t.len() + 1 == vcpus as usize) else {
        stats.contradictions.fetch_add(1, Ordering::Relaxed);
        stats.anomaly(format!(
            "contradicted: \"VCPUS\" -> {reply:?} on a guest of {vcpus} vCPUs"
        ));
        return;
    };
    stats.vcpu_checks.fetch_add(1, Ordering::Relaxed);
    let Ok(mut last) = stats.vcpu_turns.lock() else {
        return;
    };
    let back: Vec<String> = last
        .iter()
        .zip(&turns)
        .enumerate()
        .filter(|(_, (was, now))| now < was)
        .map(|(i, (was, now))| format!("vCPU {}: {was} -> {now}", i + 1))
        .collect();
    if !back.is_empty() {
        stats.vcpu_regressions.fetch_add(1, Ordering::Relaxed);
        stats.contradictions.fetch_add(1, Ordering::Relaxed);
        stats.anomaly(format!("a worker's counter went back: {}", back.join(", ")));
    }
    *last = turns;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_counters_may_stay_or_grow_but_never_go_back() {
        let s = ClientStats::default();
        check_vcpus("VCPUS 3 10 20", &s, 3);
        check_vcpus("VCPUS 3 10 25 t=123", &s, 3);
        assert_eq!(s.contradictions.load(Ordering::Relaxed), 0);
        assert_eq!(*s.vcpu_turns.lock().unwrap(), [10, 25]);
        check_vcpus("VCPUS 3 11 24", &s, 3);
        assert_eq!(s.vcpu_regressions.load(Ordering::Relaxed), 1);
        assert!(s.anomalies.lock().unwrap()[0].contains("vCPU 2: 25 -> 24"));
        for bad in ["VCPUS 2 10", "VCPUS 3 10", "PONG", "VCPUS 3 x 1"] {
            check_vcpus(bad, &s, 3);
        }
        assert_eq!(s.contradictions.load(Ordering::Relaxed), 5);
        assert_eq!(s.vcpu_checks.load(Ordering::Relaxed), 3);
    }
}
