//! `colo proxy --cluster` in front of sides that change roles, as a cluster manager runs
//! them: real `colo` processes, periodic checkpoints, and a kernel TCP client (in a network
//! namespace this test creates and removes, on the proxy's tap) doing acknowledged SETs and
//! GETs against the built-in guest's key-value service.
//!
//! Side A is `colo secondary --role-words --peer B`, the primary P (at place B) `colo
//! primary --role-words --reprotect`. P is killed with SIGKILL; A takes over and says
//! `Alone`, the proxy switches to A's port, and the client's connection carries on. Then a
//! new secondary starts at B (connecting to B's port of the proxy again) and A re-protects
//! it. Every GET must return the last acknowledged SET.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::sides::{Scratch, says, start};
use common::{COLO, Netns, in_netns, root_and_kvm, wait_timeout};

const REACH: Duration = Duration::from_secs(60);

/// A side's command: its disk, its network socket (the proxy's VM port) and the
/// checkpointing every side here shares.
fn side(kind: &str, dir: &Path, tag: &str, vm_port: &Path, key: &Path) -> Command {
    let mut c = Command::new(COLO);
    c.arg(kind)
        .arg(format!(
            "--disk={}",
            dir.join(format!("{tag}.img")).display()
        ))
        .arg(format!("--net-socket={}", vm_port.display()))
        .arg(format!("--pair-key={}", key.display()))
        .args([
            "--role-words",
            "--mode=periodic",
            "--heartbeat-timeout=800ms",
        ]);
    c
}

/// What the client saw.
#[derive(Default)]
struct Seen {
    /// Acknowledged SETs.
    acked: AtomicU64,
    /// GETs that did not return the last acknowledged SET, or replies that fit nothing.
    lost: AtomicU64,
    /// Requests answered.
    answered: AtomicU64,
}

/// SETs and GETs on one connection (a new one if it breaks) until `stop`: each GET must
/// return the value of the last acknowledged SET of its key.
fn client(seen: &Seen, stop: &AtomicBool, errors: &std::sync::Mutex<Vec<String>>) {
    let mut last: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut i = 0u64;
    let deadline = Instant::now() + Duration::from_secs(240);
    'conn: while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let s = match TcpStream::connect_timeout(
            &"10.0.2.15:7000".parse().unwrap(),
            Duration::from_millis(500),
        ) {
            Ok(s) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Past a failover the reply comes from the secondary, after the heartbeat timeout
        // and the client's retransmission back-off.
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut ask = |q: &str| -> Option<String> {
            w.write_all(format!("{q}\n").as_bytes()).ok()?;
            let mut l = String::new();
            match r.read_line(&mut l) {
                Ok(n) if n > 0 => Some(l.trim().to_string()),
                _ => None,
            }
        };
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            i += 1;
            let key = i % 7;
            let Some(ok) = ask(&format!("SET k{key} {i}")) else {
                errors
                    .lock()
                    .unwrap()
                    .push(format!("SET k{key} {i}: no reply; reconnecting"));
                continue 'conn;
            };
            seen.answered.fetch_add(1, Ordering::Relaxed);
            if ok == "OK" {
                last.insert(key, i);
                seen.acked.fetch_add(1, Ordering::Relaxed);
            } else {
                seen.lost.fetch_add(1, Ordering::Relaxed);
                errors
                    .lock()
                    .unwrap()
                    .push(format!("SET k{key} {i}: {ok:?}"));
            }
            let probe = (i * 3) % 7;
            let Some(got) = ask(&format!("GET k{probe}")) else {
                errors
                    .lock()
                    .unwrap()
                    .push(format!("GET k{probe}: no reply; reconnecting"));
                continue 'conn;
            };
            seen.answered.fetch_add(1, Ordering::Relaxed);
            if let Some(v) = last.get(&probe) {
                if got != format!("VALUE {v}") {
                    seen.lost.fetch_add(1, Ordering::Relaxed);
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("GET k{probe}: {got:?}, acknowledged {v}"));
                }
            }
        }
    }
}

/// Waits (at most `REACH`) until the client has `n` more answers than `from`.
fn answers_grow(seen: &Seen, from: u64, n: u64, what: &str) {
    let start = Instant::now();
    while seen.answered.load(Ordering::Relaxed) < from + n {
        assert!(
            start.elapsed() < REACH,
            "the client was not served {what}: {} answers",
            seen.answered.load(Ordering::Relaxed) - from
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_cluster_proxy_follows_a_takeover_and_a_reprotection_without_losing_an_acknowledged_write() {
    if !root_and_kvm() {
        return;
    }
    let Some(ns) = Netns::add(format!("colo-clu-{}", std::process::id())) else {
        return;
    };
    let a = Scratch::new("cluster-a");
    let b = Scratch::new("cluster-b");
    let key = a.keygen("pair.key");
    let (port_a, port_b) = (a.dir.join("vm-a.sock"), a.dir.join("vm-b.sock"));

    // The proxy: the client side on a tap in the namespace, two VM ports by place.
    let mut proxy = Command::new("ip");
    proxy
        .args([
            "netns",
            "exec",
            &ns.0,
            COLO,
            "proxy",
            "--cluster",
            "--client=tap:tap0",
        ])
        .arg(format!("--vm=unix-listen:{}", port_a.display()))
        .arg(format!("--vm=unix-listen:{}", port_b.display()))
        .arg("--duration-secs=300");
    let (mut proxy, proxy_rx) = start(proxy);
    says(&proxy_rx, "cluster mode", REACH);
    for cmd in [
        &["addr", "add", "10.0.2.1/24", "dev", "tap0"][..],
        &["link", "set", "tap0", "up"],
    ] {
        let ok = Command::new("ip")
            .args(["netns", "exec", &ns.0, "ip"])
            .args(cmd)
            .status()
            .unwrap();
        assert!(ok.success(), "ip {cmd:?}");
    }

    // A: a secondary that re-protects at B after a takeover; P: the primary, at B.
    let listen_a = format!("--listen=127.0.0.1:{}", a.port);
    let listen_b = format!("--listen=127.0.0.1:{}", b.port);
    let peer_a = format!("--peer=127.0.0.1:{}", a.port);
    let peer_b = format!("--peer=127.0.0.1:{}", b.port);
    let mut sa = side("secondary", &a.dir, "a", &port_a, &key);
    sa.args([&listen_a, &peer_b]);
    let (mut sa, arx) = start(sa);
    says(&arx, "waiting for the primary", REACH);
    says(&proxy_rx, "follower", REACH);
    let mut p = side("primary", &b.dir, "p", &port_b, &key);
    p.args([&peer_a, "--reprotect"]);
    let (mut p, prx) = start(p);
    says(&prx, "COLO running", REACH);
    says(&proxy_rx, "this VM serves", REACH);

    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = {
        let (seen, stop, errors, ns) = (
            Arc::clone(&seen),
            Arc::clone(&stop),
            Arc::clone(&errors),
            ns.0.clone(),
        );
        std::thread::spawn(move || in_netns(&ns, move || client(&seen, &stop, &errors)))
    };
    answers_grow(&seen, 0, 20, "by the protected primary");

    // The primary dies mid-epoch; A takes over and the proxy serves from A's port.
    p.0.kill().unwrap();
    let _ = p.0.wait();
    let at_kill = seen.answered.load(Ordering::Relaxed);
    says(&arx, "FAILOVER", REACH);
    // A's port serves now: as a takeover from B's, or (when the killed primary's socket
    // closed first) as the only VM that claims to serve.
    let seen_lines = says(&proxy_rx, "now=alone", Duration::from_secs(10));
    let last = seen_lines.last().unwrap();
    assert!(
        last.contains("vm=0") && (last.contains("takeover") || last.contains("this VM serves")),
        "{last}"
    );
    says(&arx, "serving as the primary", REACH);
    answers_grow(&seen, at_kill, 20, "after the takeover");

    // A new secondary at B: it connects to B's port again and says Follower; A brings it
    // in sync and protects its VM again (Protected: output waits for A's markers).
    let mut sb = side("secondary", &b.dir, "b", &port_b, &key);
    sb.args([&listen_b, &peer_a]);
    let (mut sb, brx) = start(sb);
    says(&brx, "disk in sync with the primary", REACH);
    says(&arx, "re-protected: COLO again", REACH);
    says(&proxy_rx, "now=protected", Duration::from_secs(10));
    let reprotected = seen.answered.load(Ordering::Relaxed);
    answers_grow(&seen, reprotected, 20, "after the re-protection");

    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let errors = errors.lock().unwrap().clone();
    let (acked, lost) = (
        seen.acked.load(Ordering::Relaxed),
        seen.lost.load(Ordering::Relaxed),
    );
    eprintln!(
        "cluster: {acked} acknowledged SETs, {} answers, {lost} lost; {errors:?}",
        seen.answered.load(Ordering::Relaxed)
    );
    assert_eq!(lost, 0, "lost acknowledged writes: {errors:?}");
    assert!(acked >= 30, "only {acked} acknowledged SETs");
    assert!(matches!(proxy.0.try_wait(), Ok(None)), "the proxy stopped");
    for (child, name) in [(&mut sb, "B"), (&mut sa, "A")] {
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
        let st = wait_timeout(&mut child.0, Duration::from_secs(15)).expect("the side stops");
        assert!(st.success(), "{name}: {st}");
    }
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(proxy.0.id() as i32, libc::SIGTERM) };
    let _ = wait_timeout(&mut proxy.0, Duration::from_secs(10));
}
