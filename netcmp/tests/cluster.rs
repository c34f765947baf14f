//! The proxy in cluster mode (`colo proxy --cluster`): two listening VM ports by place,
//! scripted VMMs that connect to them and write role words, commit markers and frames as
//! `colo primary|secondary --role-words` do, and an in-process client port.

mod common;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use colo_netcmp::framing::RoleWord;
use colo_netcmp::io::{Port, PortSpec, channel};
use colo_netcmp::proxy::{ClusterPorts, ClusterProxy, Roles};
use colo_netcmp::testing::{Seg, udp_from_vm};
use colo_netcmp::{Config, Error};
use common::{FrameSock, WAIT};

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

/// A scripted VMM on a VM port's socket.
struct Vmm(FrameSock<UnixStream>);

impl Vmm {
    /// Connects to the proxy's VM port at `path` (the proxy listens).
    fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        Self(FrameSock::new(s))
    }

    fn send(&mut self, frame: &[u8]) {
        self.0.send(frame);
    }

    fn say(&mut self, w: RoleWord) {
        self.send(&w.encode());
    }

    fn marker(&mut self) {
        self.send(&[]);
    }

    /// The next frame from the proxy within `limit`.
    fn recv_within(&mut self, limit: Duration) -> Option<Vec<u8>> {
        self.0.recv_within(limit)
    }
}

/// A cluster proxy with VM ports `a.sock` and `b.sock` in a fresh directory and an
/// in-process client.
fn cluster() -> (ClusterProxy, channel::VmEnd, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (client, client_end) = channel::port("client", 1024);
    let port = |n: &str| Port::open(&PortSpec::UnixListen(dir.path().join(n))).unwrap();
    let ports = ClusterPorts {
        client,
        vms: [port("a.sock"), port("b.sock")],
    };
    let proxy = ClusterProxy::start(Config::default(), ports).unwrap();
    (proxy, client_end, dir)
}

/// Waits (at most `WAIT`) until the proxy's roles satisfy `ok`.
fn wait_roles(proxy: &ClusterProxy, ok: impl Fn(&Roles) -> bool) -> Roles {
    let start = Instant::now();
    loop {
        let r = proxy.roles();
        if ok(&r) {
            return r;
        }
        assert!(
            start.elapsed() < WAIT,
            "roles never became as expected: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn serving(proxy: &ClusterProxy, i: usize, w: RoleWord) {
    wait_roles(proxy, |r| r.serving == Some(i) && r.words[i] == Some(w));
}

fn released(client: &channel::VmEnd, limit: Duration) -> Option<Vec<u8>> {
    client.recv_timeout(limit).unwrap()
}

#[test]
fn protected_output_is_held_until_the_commit_marker() {
    let (proxy, client, dir) = cluster();
    let mut a = Vmm::connect(&dir.path().join("a.sock"));
    a.say(RoleWord::Protected);
    serving(&proxy, 0, RoleWord::Protected);
    let (x, y) = (
        udp_from_vm(7000, b"epoch 1, x"),
        udp_from_vm(7000, b"epoch 1, y"),
    );
    a.send(&x);
    a.send(&y);
    assert_eq!(released(&client, QUIET), None, "released before the marker");
    a.marker();
    assert_eq!(released(&client, WAIT), Some(x));
    assert_eq!(released(&client, WAIT), Some(y));
    // The next epoch waits for the next marker.
    let z = udp_from_vm(7000, b"epoch 2");
    a.send(&z);
    assert_eq!(released(&client, QUIET), None);
    a.marker();
    assert_eq!(released(&client, WAIT), Some(z));
    assert_eq!(proxy.metrics().released_frames, 3);
    // The controller's calls are refused: the words decide.
    assert!(matches!(
        proxy.control().checkpoint_committed(),
        Err(Error::ClusterMode)
    ));
}

#[test]
fn alone_output_is_released_at_once_and_client_frames_reach_the_serving_vm() {
    let (proxy, client, dir) = cluster();
    let mut b = Vmm::connect(&dir.path().join("b.sock"));
    b.say(RoleWord::Alone);
    serving(&proxy, 1, RoleWord::Alone);
    let x = udp_from_vm(7000, b"unprotected");
    b.send(&x);
    assert_eq!(released(&client, WAIT), Some(x));
    let syn = Seg::client(100, None, b"").syn().frame();
    client.send(syn.clone()).unwrap();
    assert_eq!(b.recv_within(WAIT), Some(syn));
    // A served VM that re-protects: from its word on, output waits for a marker.
    b.say(RoleWord::Protected);
    serving(&proxy, 1, RoleWord::Protected);
    let y = udp_from_vm(7000, b"protected again");
    b.send(&y);
    assert_eq!(released(&client, QUIET), None);
    b.marker();
    assert_eq!(released(&client, WAIT), Some(y));
}

#[test]
fn a_takeover_switches_the_serving_port_and_drops_the_old_ones_unmarked_output() {
    let (proxy, client, dir) = cluster();
    let mut a = Vmm::connect(&dir.path().join("a.sock"));
    let mut b = Vmm::connect(&dir.path().join("b.sock"));
    b.say(RoleWord::Follower);
    a.say(RoleWord::Protected);
    let r = wait_roles(&proxy, |r| {
        r.serving == Some(0) && r.words == [Some(RoleWord::Protected), Some(RoleWord::Follower)]
    });
    assert_eq!(r.serving, Some(0));
    // The follower's output is dropped, and it gets no client traffic.
    b.send(&udp_from_vm(7000, b"follower"));
    let syn = Seg::client(100, None, b"").syn().frame();
    client.send(syn.clone()).unwrap();
    assert_eq!(a.recv_within(WAIT), Some(syn.clone()));
    assert_eq!(b.recv_within(QUIET), None, "a follower got client traffic");
    // Epoch 1 commits; epoch 2 is cut short by the primary's death.
    let covered = udp_from_vm(7000, b"covered");
    a.send(&covered);
    a.marker();
    assert_eq!(released(&client, WAIT), Some(covered));
    let uncovered = udp_from_vm(7000, b"uncovered");
    a.send(&uncovered);
    // The secondary takes over.
    b.say(RoleWord::Alone);
    let r = wait_roles(&proxy, |r| r.serving == Some(1));
    assert_eq!(r.words, [None, Some(RoleWord::Alone)]);
    // Whatever the old one still says, its uncovered output never goes out.
    a.marker();
    a.send(&udp_from_vm(7000, b"old primary after the takeover"));
    let after = udp_from_vm(7000, b"new primary");
    b.send(&after);
    assert_eq!(released(&client, WAIT), Some(after));
    assert_eq!(released(&client, QUIET), None);
    // Client traffic now goes to the new serving VM only.
    client.send(syn.clone()).unwrap();
    assert_eq!(b.recv_within(WAIT), Some(syn));
    assert_eq!(a.recv_within(QUIET), None);
    assert!(proxy.metrics().discarded_frames >= 1);
}

#[test]
fn a_restarted_side_reconnects_to_its_port_and_a_dead_sides_uncovered_output_is_dropped() {
    let (proxy, client, dir) = cluster();
    let path = dir.path().join("a.sock");
    let mut a = Vmm::connect(&path);
    a.say(RoleWord::Protected);
    serving(&proxy, 0, RoleWord::Protected);
    a.send(&udp_from_vm(7000, b"never covered"));
    // The side dies (SIGKILL closes its socket).
    drop(a);
    let r = wait_roles(&proxy, |r| r.serving.is_none());
    assert_eq!(r.words, [None, None]);
    let syn = Seg::client(100, None, b"").syn().frame();
    client.send(syn.clone()).unwrap();
    // Restarted, it connects to the same port; the proxy did not stop.
    let mut a = Vmm::connect(&path);
    a.say(RoleWord::Protected);
    serving(&proxy, 0, RoleWord::Protected);
    a.marker();
    assert_eq!(released(&client, QUIET), None, "a dead epoch was released");
    let x = udp_from_vm(7000, b"after the restart");
    a.send(&x);
    a.marker();
    assert_eq!(released(&client, WAIT), Some(x));
    client.send(syn.clone()).unwrap();
    assert_eq!(a.recv_within(WAIT), Some(syn));
    assert!(!proxy.is_finished());
}

#[test]
fn a_port_with_no_word_sends_nothing_to_the_client() {
    let (proxy, client, dir) = cluster();
    let mut a = Vmm::connect(&dir.path().join("a.sock"));
    a.send(&udp_from_vm(7000, b"who am I"));
    a.marker();
    a.send(&udp_from_vm(7000, b"still nobody"));
    assert_eq!(released(&client, QUIET), None);
    let syn = Seg::client(100, None, b"").syn().frame();
    client.send(syn).unwrap();
    assert_eq!(
        a.recv_within(QUIET),
        None,
        "a port with no role got client traffic"
    );
    assert_eq!(proxy.roles(), Roles::default());
    // An unknown word gives no role either.
    a.send(&[0x5A]);
    a.send(&udp_from_vm(7000, b"after an unknown word"));
    a.marker();
    assert_eq!(released(&client, QUIET), None);
    assert_eq!(proxy.roles(), Roles::default());
    assert!(proxy.metrics().port_drops >= 1);
}
