//! The threaded proxy over its I/O backends, with scripted VMs: length-prefixed frames on
//! Unix and TCP sockets (as a QEMU chardev would send them) and in-process channels.

mod common;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use colo_netcmp::io::{Port, PortSpec, channel, stream};
use colo_netcmp::proxy::{Ports, Proxy};
use colo_netcmp::testing::Seg;
use colo_netcmp::{CheckpointReason, Config, wire};
use common::{FrameSock, WAIT};

const P_ISN: u32 = 7_000_000;
const S_ISN: u32 = 9_000_000;

fn vm(isn: u32, at: u32, ack: u32, data: &[u8]) -> Seg {
    Seg::vm(isn.wrapping_add(1).wrapping_add(at), Some(ack), data)
}

type Sock = FrameSock<std::os::unix::net::UnixStream>;

/// A proxy on Unix sockets with scripted client, PVM and SVM, after a handshake and the
/// client's first data segment ("GET\n", so the VMs' data acknowledges 105).
fn connected(config: Config) -> (Sock, Sock, Sock, Proxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n);
    let (lc, lp, ls) = (
        UnixListener::bind(path("c")).unwrap(),
        UnixListener::bind(path("p")).unwrap(),
        UnixListener::bind(path("s")).unwrap(),
    );
    // The proxy connects (QEMU's chardev server=on side is the VM here).
    let ports = Ports {
        client: Port::open(&PortSpec::UnixConnect(path("c"))).unwrap(),
        primary: Port::open(&PortSpec::UnixConnect(path("p"))).unwrap(),
        secondary: Port::open(&PortSpec::UnixConnect(path("s"))).unwrap(),
    };
    let accept = |l: &UnixListener| {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        FrameSock::new(s)
    };
    let (mut client, mut pvm, mut svm) = (accept(&lc), accept(&lp), accept(&ls));
    let proxy = Proxy::start(config, ports).unwrap();

    // Handshake: the client's SYN reaches both VMs.
    let syn = Seg::client(100, None, b"").syn().frame();
    client.send(&syn);
    assert_eq!(pvm.recv().unwrap(), syn);
    assert_eq!(svm.recv().unwrap(), syn);
    let p_synack = Seg::vm(P_ISN, Some(101), b"").syn().frame();
    pvm.send(&p_synack);
    svm.send(&Seg::vm(S_ISN, Some(101), b"").syn().frame());
    assert_eq!(client.recv().unwrap(), p_synack);
    // The client's ACK: the secondary's copy is in its own sequence space.
    client.send(&Seg::client(101, Some(P_ISN + 1), b"GET\n").frame());
    pvm.recv().unwrap();
    let to_s = svm.recv().unwrap();
    assert_eq!(wire::parse(&to_s).unwrap().tcp().unwrap().ack, S_ISN + 1);
    (client, pvm, svm, proxy, dir)
}

/// Whether the client gets nothing within 200 ms.
fn nothing_for(client: &mut Sock) -> bool {
    client.recv_within(Duration::from_millis(200)).is_none()
}

#[test]
fn unix_sockets_mirror_compare_and_release() {
    let (mut client, mut pvm, mut svm, proxy, _dir) = connected(Config::default());

    // The answer, cut differently: the client gets exactly the primary's frames.
    let body: Vec<u8> = (0..4000u32).map(|i| (i % 253) as u8).collect();
    let p_frames: Vec<_> = body
        .chunks(1400)
        .enumerate()
        .map(|(i, c)| vm(P_ISN, i as u32 * 1400, 105, c).frame())
        .collect();
    for (i, c) in body.chunks(1000).enumerate() {
        svm.send(&vm(S_ISN, i as u32 * 1000, 105, c).frame());
    }
    for f in &p_frames {
        pvm.send(f);
    }
    for f in &p_frames {
        assert_eq!(&client.recv().unwrap(), f);
    }

    // A differing byte: a checkpoint request, and the frame waits for the commit.
    let p_last = vm(P_ISN, 4000, 105, b"primary").frame();
    pvm.send(&p_last);
    svm.send(&vm(S_ISN, 4000, 105, b"PRIMARY").frame());
    let req = proxy.checkpoint_requests().recv_timeout(WAIT).unwrap();
    assert_eq!(
        req.reason,
        CheckpointReason::PayloadDiffers { offset: 4000 }
    );
    assert!(
        nothing_for(&mut client),
        "nothing is released before the commit"
    );
    proxy.control().checkpoint_committed().unwrap();
    assert_eq!(client.recv().unwrap(), p_last);
    let m = proxy.metrics();
    assert_eq!((m.mismatches, m.checkpoints_committed), (1, 1));
    assert_eq!(m.matched_tcp_bytes, 4000);
    proxy.shutdown().unwrap();
}

#[test]
fn the_primarys_empty_frame_commits_in_order_with_its_frames() {
    let config = Config {
        commit_marker: true,
        ..Config::default()
    };
    let (mut client, mut pvm, mut svm, proxy, _dir) = connected(config);
    // A mismatch: the primary's frame waits for a commit.
    let held = vm(P_ISN, 0, 105, b"primary").frame();
    pvm.send(&held);
    svm.send(&vm(S_ISN, 0, 105, b"PRIMARY").frame());
    proxy.checkpoint_requests().recv_timeout(WAIT).unwrap();
    assert!(
        nothing_for(&mut client),
        "nothing is released before the commit"
    );
    // The marker, then a frame of the next epoch (no secondary counterpart yet): the
    // marker releases only what came before it.
    pvm.send(&[]);
    let next = vm(P_ISN, 7, 105, b"next").frame();
    pvm.send(&next);
    assert_eq!(client.recv().unwrap(), held);
    assert!(
        nothing_for(&mut client),
        "the next epoch's frame waits for its compare"
    );
    let m = proxy.metrics();
    assert_eq!(m.checkpoints_committed, 1);
    proxy.shutdown().unwrap();
}

#[test]
fn without_commit_markers_an_empty_frame_commits_nothing() {
    let (mut client, mut pvm, mut svm, proxy, _dir) = connected(Config::default());
    let held = vm(P_ISN, 0, 105, b"primary").frame();
    pvm.send(&held);
    svm.send(&vm(S_ISN, 0, 105, b"PRIMARY").frame());
    proxy.checkpoint_requests().recv_timeout(WAIT).unwrap();
    // A malformed frame (forwarded as the default policy says), not a commit.
    pvm.send(&[]);
    while let Some(f) = client.recv_within(Duration::from_millis(200)) {
        assert_ne!(f, held, "an empty frame is no commit here");
    }
    assert_eq!(proxy.metrics().checkpoints_committed, 0);
    proxy.shutdown().unwrap();
}

#[test]
fn in_process_channels_and_a_late_secondary() {
    let (client_port, client) = channel::port("client", 64);
    let (p_port, pvm) = channel::port("primary", 64);
    let (s_port, svm) = channel::port("secondary", 64);
    let proxy = Proxy::start(
        Config {
            compare_timeout: Duration::from_millis(200),
            expired_scan_cycle: Duration::from_millis(20),
            ..Config::default()
        },
        Ports {
            client: client_port,
            primary: p_port,
            secondary: s_port,
        },
    )
    .unwrap();
    let reply = colo_netcmp::testing::udp_from_vm(53, b"answer");
    pvm.send(reply.clone()).unwrap();
    svm.send(reply.clone()).unwrap();
    assert_eq!(client.recv_timeout(WAIT).unwrap(), Some(reply));
    // No secondary counterpart: released after the timeout, with a checkpoint request.
    let lonely = colo_netcmp::testing::udp_from_vm(53, b"only the primary");
    pvm.send(lonely.clone()).unwrap();
    let req = proxy.checkpoint_requests().recv_timeout(WAIT).unwrap();
    assert_eq!(req.reason, CheckpointReason::CompareTimeout);
    assert_eq!(client.recv_timeout(WAIT).unwrap(), Some(lonely));
    assert_eq!(proxy.metrics().compare_timeouts, 1);
    proxy.shutdown().unwrap();
}

#[test]
fn tcp_sockets_listening_and_connecting() {
    // The primary's port connects to us; the client's and secondary's listen.
    let lp = TcpListener::bind("127.0.0.1:0").unwrap();
    let paddr = lp.local_addr().unwrap().to_string();
    let primary = Port::open(&PortSpec::TcpConnect(paddr)).unwrap();
    let (client_port, cport) = stream::listen_tcp_any("127.0.0.1:0").unwrap();
    let (s_port, sport) = stream::listen_tcp_any("127.0.0.1:0").unwrap();
    let proxy = Proxy::start(
        Config::default(),
        Ports {
            client: client_port,
            primary,
            secondary: s_port,
        },
    )
    .unwrap();
    let connect = |port: u16| {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        FrameSock::new(s)
    };
    let (s, _) = lp.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut pvm = FrameSock::new(s);
    let mut client = connect(cport);
    let mut svm = connect(sport);
    // Until the proxy has accepted both, frames to them are dropped: wait for an echo.
    let arp = colo_netcmp::testing::arp_reply();
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < WAIT, "the proxy did not accept in time");
        pvm.send(&arp);
        svm.send(&arp);
        if client.recv_within(Duration::from_millis(100)).is_some() {
            break;
        }
    }
    let syn = Seg::client(1, None, b"").syn().frame();
    client.send(&syn);
    assert_eq!(pvm.recv().unwrap(), syn);
    assert_eq!(svm.recv().unwrap(), syn);
    drop(proxy);
}
