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

#[test]
fn colo_proxy_releases_matching_output_and_exits_after_its_duration() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let mut child = common::colo()
        .arg("proxy")
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
