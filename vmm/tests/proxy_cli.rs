//! `colo proxy` end to end: the built binary with Unix socket ports, fed by this test.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

fn connect(path: &std::path::Path) -> UnixStream {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    start.elapsed() < WAIT,
                    "cannot connect to {}: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// An ARP reply frame (42 bytes), length-prefixed.
fn framed_arp() -> Vec<u8> {
    let mut f = vec![
        2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 6, 0, 1, 8, 0, 6, 4, 0, 2,
    ];
    f.extend_from_slice(&[
        2, 0, 0, 0, 0, 2, 198, 18, 0, 2, 2, 0, 0, 0, 0, 1, 198, 18, 0, 1,
    ]);
    let mut v = (f.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&f);
    v
}

/// The body of a `GET /metrics` on loopback `port` (which is bound before the proxy runs).
fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[test]
fn colo_proxy_releases_matching_output_and_exits_after_its_duration() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = common::colo()
        .arg("proxy")
        .arg(format!("--metrics-listen=127.0.0.1:{metrics_port}"))
        .arg(format!("--client=unix-listen:{}", p("c").display()))
        .arg(format!("--primary=unix-listen:{}", p("p").display()))
        .arg(format!("--secondary=unix-listen:{}", p("s").display()))
        .args(["--duration-secs", "3", "--stats-interval", "1"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("colo runs");
    let mut client = connect(&p("c"));
    let mut pvm = connect(&p("p"));
    let mut svm = connect(&p("s"));
    client
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // Until the proxy has accepted the client, released frames to it are dropped: repeat
    // the matching pair until one comes out (bounded).
    let want = framed_arp();
    let start = Instant::now();
    let mut got = Vec::new();
    while got.len() < want.len() {
        assert!(start.elapsed() < WAIT, "nothing was released");
        pvm.write_all(&want).unwrap();
        svm.write_all(&want).unwrap();
        let mut b = [0u8; 256];
        if let Ok(n) = client.read(&mut b) {
            got.extend_from_slice(&b[..n]);
        }
    }
    assert_eq!(&got[..want.len()], &want[..]);
    // Its metrics endpoint counts what it released.
    let text = scrape(metrics_port);
    assert!(text.contains("colo_role{role=\"proxy\"} 1\n"), "{text}");
    let released = text
        .lines()
        .find_map(|l| l.strip_prefix("colo_proxy_released_frames_total "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(released.is_some_and(|n| n >= 1), "{text}");
    assert!(text.contains("colo_proxy_mismatches_total "), "{text}");
    let Some(status) = common::wait_timeout(&mut child, WAIT) else {
        let _ = child.kill();
        panic!("colo proxy did not stop after --duration-secs");
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "colo proxy failed: {err}");
    assert!(
        err.contains("matched_packets="),
        "counters logged at exit: {err}"
    );
}

#[test]
fn colo_proxy_refuses_bad_ports_with_exit_code_2() {
    let out = common::colo()
        .args([
            "proxy",
            "--client",
            "udp:1",
            "--primary",
            "tap:x",
            "--secondary",
            "tap:y",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = common::colo()
        .args([
            "proxy",
            "--client",
            "tap:a",
            "--primary",
            "tap:b",
            "--secondary",
            "tap:c",
        ])
        .args(["--max-queue-size", "0"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Pacing needs a socket towards the secondary.
    let out = common::colo()
        .args([
            "proxy",
            "--client",
            "tap:a",
            "--primary",
            "tap:b",
            "--secondary",
            "tap:c",
        ])
        .args(["--secondary-lead-ms", "10"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("socket port for the secondary"), "{err}");
}
