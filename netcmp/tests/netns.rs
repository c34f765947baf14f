//! Real kernel TCP stacks behind the proxy.
//!
//! Three network namespaces: a client and two "VMs" (the primary and the secondary), each
//! with one tap device whose other end the proxy holds. The VMs have the same MAC and IP
//! address, like a COLO pair. Kernel TCP servers in the VM namespaces answer a client in
//! the client namespace; the proxy mirrors, compares and releases. Traffic stays inside
//! the namespaces (198.18.0.0/24, no routes out), every wait has a timeout, and the
//! namespaces are deleted by a guard even when a test fails.
//!
//! Needs root and `ip netns`; elsewhere each test prints why it skipped.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use colo_netcmp::io::tap::Tap;
use colo_netcmp::proxy::{Ports, Proxy};
use colo_netcmp::{CheckpointReason, CheckpointRequest, Config};

const VM_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT_IP: &str = "198.18.0.1/24";
const VM_CIDR: &str = "198.18.0.2/24";
const VM_MAC: &str = "02:00:00:00:00:02";
const CLIENT_MAC: &str = "02:00:00:00:00:01";
const PORT: u16 = 7000;
const DEADLINE: Duration = Duration::from_secs(30);
/// Where the secondary's answer differs from the primary's.
const DIFF_AT: usize = 95_000;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with `args`; panics with its stderr if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`ip netns` fails: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("`ip` is not available: {e}")),
    }
}

macro_rules! require_netns {
    () => {
        if let Some(why) = skip_reason() {
            println!("SKIPPED: real-TCP namespace test needs root and `ip netns`: {why}");
            return;
        }
    };
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Self(name);
        for key in ["all", "default"] {
            let k = format!("net.ipv6.conf.{key}.disable_ipv6=1");
            let out = Command::new("ip")
                .args(["netns", "exec", &ns.0, "sysctl", "-q", "-w", &k])
                .output()
                .expect("run sysctl");
            assert!(out.status.success(), "sysctl {k} in {}", ns.0);
        }
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    /// Moves tap `dev` here and configures it.
    fn adopt(&self, dev: &str, mac: &str, cidr: &str) {
        ip(&["link", "set", dev, "netns", &self.0]);
        ip(&["-n", &self.0, "link", "set", dev, "address", mac]);
        ip(&["-n", &self.0, "addr", "add", cidr, "dev", dev]);
        ip(&["-n", &self.0, "link", "set", dev, "up"]);
    }

    /// Runs `f` on a thread inside this namespace.
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("open netns");
            // SAFETY: `ns` is an open namespace file; setns moves only this thread into
            // that network namespace, which is what the closure expects.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A client, a primary and a secondary namespace with the proxy between them.
struct Lab {
    // Field order = drop order: the proxy (and its taps) first, then the namespaces.
    proxy: Proxy,
    client: Netns,
    primary: Netns,
    secondary: Netns,
}

impl Lab {
    fn new(config: Config) -> Self {
        // The proxy's debug logs go to the test's captured output: shown if a test fails.
        let _ = tracing_subscriber::fmt()
            .with_env_filter("colo_netcmp=debug")
            .with_test_writer()
            .try_init();
        let id = format!(
            "nc{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let client = Netns::new(format!("{id}c"));
        let primary = Netns::new(format!("{id}p"));
        let secondary = Netns::new(format!("{id}s"));
        let (tc, tp, ts) = (format!("{id}c"), format!("{id}p"), format!("{id}s"));
        let ports = Ports {
            client: Tap::open(&tc).unwrap().into_port().unwrap(),
            primary: Tap::open(&tp).unwrap().into_port().unwrap(),
            secondary: Tap::open(&ts).unwrap().into_port().unwrap(),
        };
        client.adopt(&tc, CLIENT_MAC, CLIENT_IP);
        primary.adopt(&tp, VM_MAC, VM_CIDR);
        secondary.adopt(&ts, VM_MAC, VM_CIDR);
        let proxy = Proxy::start(config, ports).unwrap();
        Self {
            proxy,
            client,
            primary,
            secondary,
        }
    }
}

/// A kernel TCP server: accepts one connection (within the deadline), reads one request
/// line, writes `body` in `chunk`-byte writes with Nagle off, closes. `mss` sets the
/// segment size it announces and uses. Says on `ready` when it listens.
fn serve(
    body: Vec<u8>,
    chunk: usize,
    mss: u32,
    ready: std::sync::mpsc::Sender<()>,
) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_tcp_mss(mss)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(VM_IP, PORT)).into())?;
    s.listen(1)?;
    s.set_nonblocking(true)?;
    let _ = ready.send(());
    let start = Instant::now();
    let (conn, _) = loop {
        match s.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < DEADLINE => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(DEADLINE))?;
    conn.set_write_timeout(Some(DEADLINE))?;
    conn.set_tcp_nodelay(true)?;
    let mut conn: TcpStream = conn.into();
    let mut req = Vec::new();
    let mut b = [0u8; 64];
    while !req.ends_with(b"\n") {
        let n = conn.read(&mut b)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&b[..n]);
    }
    for c in body.chunks(chunk) {
        conn.write_all(c)?;
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    // Wait for the client to finish (bounded by the read timeout).
    let _ = conn.read(&mut b);
    Ok(())
}

/// The client: connects, asks, reads everything until the server closes.
fn fetch() -> std::io::Result<Vec<u8>> {
    let addr = SocketAddr::V4(SocketAddrV4::new(VM_IP, PORT));
    let start = Instant::now();
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            // The servers may not listen yet: they answer with RST.
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    };
    s.set_read_timeout(Some(DEADLINE))?;
    s.write_all(b"GET\n")?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    Ok(body)
}

fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect()
}

/// Waits until both servers listen: a COLO pair's VMs are in the same state, so both
/// must be listening before the client's SYN reaches them.
fn wait_ready(ready: &std::sync::mpsc::Receiver<()>) {
    for _ in 0..2 {
        ready
            .recv_timeout(DEADLINE)
            .expect("a server did not start listening");
    }
}

/// Commits every checkpoint request until told to stop; returns the requests.
fn controller(proxy: &Proxy, stop: Arc<AtomicBool>) -> JoinHandle<Vec<CheckpointRequest>> {
    let rx = proxy.checkpoint_requests().clone();
    let control = proxy.control();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) && start.elapsed() < DEADLINE * 2 {
            if let Ok(r) = rx.recv_timeout(Duration::from_millis(20)) {
                seen.push(r);
                control.checkpoint_committed().expect("commit");
            }
        }
        seen
    })
}

/// Joins a thread, failing the test if it takes longer than the deadline.
fn join<T: Send + 'static>(h: JoinHandle<T>, what: &str) -> T {
    let start = Instant::now();
    while !h.is_finished() {
        assert!(
            start.elapsed() < DEADLINE * 2,
            "{what} did not finish in time"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    h.join().unwrap_or_else(|_| panic!("{what} panicked"))
}

#[test]
fn identical_servers_cut_differently_reach_the_client_without_checkpoints() {
    require_netns!();
    let lab = Lab::new(Config {
        expired_scan_cycle: Duration::from_millis(200),
        ..Config::default()
    });
    let data = body(300_000);
    // Different MSS and write sizes: the same bytes in different segments.
    let (d1, d2) = (data.clone(), data.clone());
    let (tx, ready) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    let pvm = lab.primary.spawn(move || serve(d1, 65536, 1400, tx));
    let svm = lab.secondary.spawn(move || serve(d2, 999, 900, tx2));
    wait_ready(&ready);
    let client = lab.client.spawn(fetch);
    let got = join(client, "client").expect("client fetch");
    join(pvm, "primary server").expect("primary server");
    join(svm, "secondary server").expect("secondary server");
    let m = lab.proxy.metrics();
    assert_eq!(got.len(), data.len());
    assert!(
        got == data,
        "the client got other bytes than the primary sent"
    );
    assert_eq!(m.mismatches, 0, "{m}");
    assert_eq!(m.checkpoint_requests, 0, "{m}");
    assert!(m.matched_tcp_bytes >= data.len() as u64, "{m}");
    assert!(m.ack_translations > 0, "{m}");
    println!("metrics: {m}");
}

#[test]
fn a_differing_secondary_triggers_a_checkpoint_and_the_client_gets_the_primarys_bytes() {
    require_netns!();
    // The default compare_timeout (3 s): the secondary would have to lag that long for
    // the first request to be a timeout instead of the mismatch. The difference sits near
    // the end because after the (simulated) checkpoint the secondary is not really a copy
    // of the primary: the rest of the transfer goes by further requests and timeouts.
    let lab = Lab::new(Config {
        expired_scan_cycle: Duration::from_millis(100),
        ..Config::default()
    });
    let data = body(100_000);
    let mut other = data.clone();
    other[DIFF_AT] ^= 0x5A;
    let stop = Arc::new(AtomicBool::new(false));
    let ctl = controller(&lab.proxy, Arc::clone(&stop));
    let (tx, ready) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    let pvm = lab.primary.spawn(move || serve(data, 4096, 1400, tx));
    let svm = lab.secondary.spawn(move || serve(other, 4096, 1400, tx2));
    wait_ready(&ready);
    let client = lab.client.spawn(fetch);
    let got = join(client, "client").expect("client fetch");
    stop.store(true, Ordering::Relaxed);
    let requests = join(ctl, "controller");
    let _ = join(pvm, "primary server");
    let _ = join(svm, "secondary server");
    let m = lab.proxy.metrics();
    for r in &requests {
        println!("checkpoint request: {r}");
    }
    assert!(
        got == body(100_000),
        "the client must get exactly the primary's bytes ({m})"
    );
    assert!(m.mismatches >= 1, "{m}");
    assert_eq!(
        requests.first().map(|r| &r.reason),
        Some(&CheckpointReason::PayloadDiffers {
            offset: DIFF_AT as u64
        }),
        "the first request must name the differing byte: {requests:?}"
    );
    println!("requests: {}; metrics: {m}", requests.len());
}
