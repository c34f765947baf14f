//! Bad input through the real I/O path: malformed frames are counted and never crash the
//! proxy; a stream that announces an absurd frame length is dropped and the listening port
//! takes the next peer.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use colo_netcmp::framing::encode;
use colo_netcmp::io::{Port, PortSpec, channel};
use colo_netcmp::proxy::{Ports, Proxy};
use colo_netcmp::{Config, MalformedPolicy};

const WAIT: Duration = Duration::from_secs(5);

fn framed(frames: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for f in frames {
        encode(f, &mut v).unwrap();
    }
    v
}

fn connect(path: &std::path::Path) -> UnixStream {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => {
                assert!(start.elapsed() < WAIT, "connect: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Waits until `f` holds, or fails after `WAIT`.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn malformed_frames_are_counted_forwarded_and_survived() {
    let dir = tempfile::tempdir().unwrap();
    let ppath = dir.path().join("primary.sock");
    let (client_port, client) = channel::port("client", 1024);
    let (s_port, _svm) = channel::port("secondary", 1024);
    let proxy = Proxy::start(
        Config::default(),
        Ports {
            client: client_port,
            primary: Port::open(&PortSpec::UnixListen(ppath.clone())).unwrap(),
            secondary: s_port,
        },
    )
    .unwrap();
    let mut pvm = connect(&ppath);
    let junk: [&[u8]; 5] = [
        b"",
        b"\x01",
        &[0xFF; 13],
        // IPv4 with a header length of 0 words.
        &[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0, 0x40, 0, 0, 20],
        // TCP with a data offset past the end.
        &[
            2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0, 0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0,
            198, 18, 0, 2, 198, 18, 0, 1, 0, 80, 0x9c, 0x40, 0, 0, 0, 1, 0, 0, 0, 0, 0xF0, 0x10, 0,
            0, 0, 0, 0, 0,
        ],
    ];
    pvm.write_all(&framed(&junk)).unwrap();
    // Forward policy: each comes out to the client unchanged.
    for j in junk {
        assert_eq!(client.recv_timeout(WAIT).unwrap().as_deref(), Some(j));
    }
    wait_for("malformed count", || proxy.metrics().malformed_frames == 5);

    // An absurd length prefix: the stream is out of step, the proxy drops the peer...
    pvm.write_all(&[0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3]).unwrap();
    pvm.set_read_timeout(Some(WAIT)).unwrap();
    let mut b = [0u8; 8];
    assert!(
        matches!(pvm.read(&mut b), Ok(0) | Err(_)),
        "the proxy closes it"
    );
    // ... and takes the next one, which works.
    let mut pvm = connect(&ppath);
    pvm.write_all(&framed(&[junk[1]])).unwrap();
    assert_eq!(client.recv_timeout(WAIT).unwrap().as_deref(), Some(junk[1]));
    assert!(!proxy.is_finished());
    proxy.shutdown().unwrap();
}

#[test]
fn drop_policy_drops_malformed_frames() {
    let (client_port, client) = channel::port("client", 64);
    let (p_port, pvm) = channel::port("primary", 64);
    let (s_port, svm) = channel::port("secondary", 64);
    let proxy = Proxy::start(
        Config {
            malformed: MalformedPolicy::Drop,
            ..Config::default()
        },
        Ports {
            client: client_port,
            primary: p_port,
            secondary: s_port,
        },
    )
    .unwrap();
    for n in 0..64u8 {
        // IPv4 with a header length under five words: never a valid frame.
        let mut f = vec![n; 14 + usize::from(n)];
        f[12] = 0x08;
        f[13] = 0x00;
        if let Some(b) = f.get_mut(14) {
            *b = 0x40 | (n & 3);
        }
        pvm.send(f).unwrap();
        client.send(vec![n; 3]).unwrap();
    }
    wait_for("all frames", || {
        let m = proxy.metrics();
        m.primary_frames == 64 && m.client_frames == 64
    });
    let m = proxy.metrics();
    assert_eq!(m.malformed_dropped, 128, "{m}");
    assert_eq!(client.try_recv().unwrap(), None);
    assert_eq!(svm.try_recv().unwrap(), None);
    proxy.shutdown().unwrap();
}
