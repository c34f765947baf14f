//! A secondary that took over protects its VM again: with `--peer` it serves as a primary
//! and brings the next secondary that listens there in sync (disk and RAM), and that one
//! in turn takes over when it is lost. Real `colo` processes on loopback, with a pair key:
//! P → A (A takes over when P is killed) → B (B takes over when A is killed).

mod common;

use std::time::Duration;

use common::sides::{Scratch, says, start};
use common::{kvm, wait_timeout};

const REACH: Duration = Duration::from_secs(60);

fn with(mut c: std::process::Command, args: &[&str]) -> std::process::Command {
    c.args(args);
    c
}

#[test]
fn a_secondary_that_took_over_is_protected_again_and_so_on() {
    if !kvm() {
        return;
    }
    let a = Scratch::new("chain-a");
    let b = Scratch::new("chain-b");
    let key = a.keygen("pair.key");
    let peer_a = format!("--peer=127.0.0.1:{}", a.port);
    let peer_b = format!("--peer=127.0.0.1:{}", b.port);

    let (mut sa, arx) = start(with(a.side("secondary", "a", Some(&key)), &[&peer_b]));
    says(&arx, "waiting for the primary", REACH);
    let (mut p, prx) = start(a.side("primary", "p", Some(&key)));
    says(&prx, "COLO running", REACH);
    std::thread::sleep(Duration::from_millis(500));
    p.0.kill().unwrap();
    let _ = p.0.wait();
    says(&arx, "FAILOVER", REACH);
    says(&arx, "serving as the primary", REACH);

    // The next secondary listens where A pushes; A brings it in sync while serving.
    let (mut sb, brx) = start(with(b.side("secondary", "b", Some(&key)), &[&peer_a]));
    says(&brx, "disk in sync with the primary", REACH);
    says(&arx, "re-protected: COLO again", REACH);
    // B follows A's checkpoints...
    std::thread::sleep(Duration::from_millis(800));
    // ...and takes over when A dies, then serves as a primary for A's address.
    sa.0.kill().unwrap();
    let _ = sa.0.wait();
    let seen = says(&brx, "FAILOVER after", REACH);
    let line = seen.last().unwrap();
    let n: u64 = line
        .split("FAILOVER after ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no checkpoint count in {line:?}"));
    assert!(n >= 2, "B took over after only {n} checkpoints: {line}");
    says(&brx, "serving as the primary", REACH);
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(sb.0.id() as i32, libc::SIGTERM) };
    let st = wait_timeout(&mut sb.0, Duration::from_secs(10)).expect("B stops");
    assert!(st.success(), "B: {st}");
}
