//! Only the paired peer gets in, with the real `colo primary` and `colo secondary`
//! processes on loopback: a side refuses to start without a key (or --insecure), a key file
//! others can read is refused, a primary of another pair is refused by a waiting secondary
//! (which logs it and goes on waiting for its own primary, which then gets in), and a
//! stranger sending heartbeat frames to the secondary's port after its primary died does
//! not delay the failover, nor does a stranger's disk copy on the disk replication port
//! reach the secondary's disk.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use colo_blk::SyncMode;
use colo_blk::wire::Frame;
use colo_transport::control::{ControlChannel, Message};
use common::sides::{Scratch, run, says, start};

/// What the stranger writes onto the secondary's disk, if it could.
const STRANGER: &[u8] = b"STRANGER";

#[test]
fn a_side_needs_a_private_key_or_says_it_runs_insecure() {
    if !common::kvm() {
        return;
    }
    let s = Scratch::new("auth-keys");
    let (ok, err) = run(s.side("secondary", "s", None));
    assert!(
        !ok && err.contains("no pair key") && err.contains("colo keygen"),
        "{err}"
    );

    let key = s.keygen("pair.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let again = common::colo()
        .args(["keygen", &format!("--out={}", key.display())])
        .output()
        .unwrap();
    assert!(!again.status.success(), "keygen never replaces a key");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, err) = run(s.side("secondary", "s", Some(&key)));
    assert!(
        !ok && err.contains("0644") && err.contains("pair.key"),
        "{err}"
    );

    // --insecure starts, and says so loudly (stopped by --duration while it waits).
    let mut c = s.side("secondary", "s", None);
    c.args(["--insecure", "--duration=2s"]);
    let (ok, err) = run(c);
    assert!(ok && err.contains("INSECURE"), "{err}");
}

/// Pair B's secondary waits; pair A's primary (another key) comes to its port and is
/// refused, naming the other pair, and the secondary logs it and keeps waiting. B's own
/// primary then gets in and checkpoints run. Then B's primary dies while a stranger sends
/// heartbeat frames to the secondary's port: the failover comes anyway.
#[test]
fn two_pairs_do_not_cross_and_a_forged_heartbeat_does_not_delay_the_failover() {
    if !common::kvm() {
        return;
    }
    let s = Scratch::new("auth-cross");
    let key_a = s.keygen("a.key");
    let key_b = s.keygen("b.key");
    let (mut secondary, sec) = start(s.side("secondary", "b-sec", Some(&key_b)));
    says(&sec, "waiting for the primary", Duration::from_secs(30));

    let mut stray = s.side("primary", "a-pri", Some(&key_a));
    stray.arg("--duration=20s");
    let (ok, err) = run(stray);
    assert!(!ok && err.contains("another pair"), "{err}");
    says(
        &sec,
        "refused a connection that did not authenticate",
        Duration::from_secs(10),
    );

    // A stranger on the disk replication port, speaking colo-blk as a primary would: a
    // Hello, then a whole disk copy whose first sector says STRANGER. It waits in the
    // listener's queue ahead of the real primary's disk link.
    let mut stranger = std::net::TcpStream::connect(("127.0.0.1", s.port + 1)).unwrap();
    let mut forged = Vec::new();
    forged.extend_from_slice(
        &Frame::Hello {
            disk_len: 16 << 20,
            mode: SyncMode::Resync,
        }
        .to_bytes(),
    );
    forged.extend_from_slice(
        &Frame::SyncData {
            seq: 1,
            offset: 0,
            len: 512,
        }
        .to_bytes(),
    );
    forged.extend_from_slice(&STRANGER.repeat(512 / STRANGER.len()));
    forged.extend_from_slice(&Frame::SyncDone { seq: 2, epoch: 1 }.to_bytes());
    stranger.write_all(&forged).unwrap();

    let mut real = s.side("primary", "b-pri", Some(&key_b));
    real.arg("--duration=60s");
    let (mut primary, _pri) = start(real);
    says(&sec, "the primary authenticated", Duration::from_secs(30));
    let refused = says(
        &sec,
        "refused a connection that did not authenticate",
        Duration::from_secs(30),
    );
    let line = refused.last().unwrap();
    assert!(line.contains("disk") && line.contains("not colo"), "{line}");
    // The SVM runs once the first checkpoint is loaded.
    says(&sec, "[svm] serving on", Duration::from_secs(30));

    // Kill the primary; a stranger keeps sending heartbeats to the secondary's port.
    let port = s.port;
    let forging = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = std::sync::Arc::clone(&forging);
    let forger = std::thread::spawn(move || {
        let mut sent = 0u32;
        let deadline = Instant::now() + Duration::from_secs(20);
        while f.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let mut c = ControlChannel::from_tcp(s).unwrap();
                for _ in 0..10 {
                    if c.send(&Message::Heartbeat {
                        seq: u64::from(sent),
                    })
                    .is_err()
                    {
                        break;
                    }
                    sent += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        sent
    });
    let killed = Instant::now();
    primary.0.kill().unwrap();
    let _ = primary.0.wait();
    says(&sec, "FAILOVER", Duration::from_secs(10));
    let took = killed.elapsed();
    forging.store(false, std::sync::atomic::Ordering::SeqCst);
    let sent = forger.join().unwrap();
    assert!(sent > 0, "the forger sent heartbeats");
    eprintln!("failover {took:?} after the kill, {sent} forged heartbeats sent meanwhile");
    // The secondary serves on; its disk (the buffer flushed into it at the takeover) holds
    // nothing of the stranger's.
    std::thread::sleep(Duration::from_millis(500));
    let _ = secondary.0.kill();
    let _ = secondary.0.wait();
    drop(stranger);
    let disk = std::fs::read(s.dir.join("b-sec.img")).unwrap();
    assert!(
        !disk.windows(STRANGER.len()).any(|w| w == STRANGER),
        "the stranger's sector reached the secondary's disk"
    );
    let _ = std::io::stdout().flush();
}

/// `colo pair --encrypt`: control, push streams and the disk link sealed; the primary is
/// killed and the secondary takes over with every acknowledged write on its disk.
#[test]
fn an_encrypted_pair_fails_over_and_loses_nothing() {
    if !common::kvm() {
        return;
    }
    let out = common::colo()
        .args([
            "pair",
            "--json",
            "--verbose",
            "--encrypt",
            "--duration=12s",
            "--kill-primary-after=6s",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(v["failover"], true, "{v}");
    assert_eq!(v["lost_acked"], 0, "{v}");
    assert_eq!(
        v["disk_missing"], 0,
        "every acknowledged write is on the disk: {v}"
    );
    assert_eq!(v["contradictions"], 0, "{v}");
    assert!(
        v["epochs"].as_u64().unwrap_or(0) > 10,
        "checkpoints ran: {v}"
    );
    assert!(
        stderr.contains("traffic encrypted (--encrypt)"),
        "both sides said so:\n{stderr}"
    );
}
