//! `colo pair --tap --disk` as a user runs it: the user's own client (a real kernel TCP
//! connection, in a network namespace this test creates and removes) talks to the
//! protected guest through the proxy on a tap device, the primary is killed, the same
//! connection goes on with the secondary, and what the client wrote is on the
//! secondary's copy of the disk afterwards (`colo run` on that copy reads it back). And a
//! guest that powers itself off ends the pair.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Netns, Reaper, in_netns, wait_timeout};

/// Sends each request on one connection and returns the replies.
fn ask(conn: &mut (impl Write, BufReader<TcpStream>), reqs: &[&str]) -> Vec<String> {
    reqs.iter()
        .map(|q| {
            conn.0.write_all(format!("{q}\n").as_bytes()).unwrap();
            let mut l = String::new();
            conn.1.read_line(&mut l).unwrap();
            l.trim().to_string()
        })
        .collect()
}

fn connect() -> (TcpStream, BufReader<TcpStream>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        match TcpStream::connect_timeout(
            &"10.0.2.15:7000".parse().unwrap(),
            Duration::from_millis(500),
        ) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("the guest did not answer: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (s.try_clone().unwrap(), BufReader::new(s))
}

#[test]
fn the_users_client_on_a_tap_is_served_across_a_failover_and_its_data_is_on_disk() {
    if !common::root_and_kvm() {
        return;
    }
    let Some(ns) = Netns::with_loopback(format!("colo-ptap-{}", std::process::id())) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vm.img");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, common::COLO])
        .args([
            "pair",
            "--json",
            "--tap=tap0",
            "--duration=20s",
            "--kill-primary-after=10s",
        ])
        .arg(format!("--disk={}", disk.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Reaper(child);
    let started = Instant::now();
    let replies = in_netns(&ns.0, move || {
        let mut conn = connect();
        let before = ask(&mut conn, &["PING", "SET color blue", "GET color"]);
        // Past the kill (10 s) and the takeover.
        std::thread::sleep(Duration::from_secs(13).saturating_sub(started.elapsed()));
        let after = ask(&mut conn, &["GET color", "SET color green", "GET color"]);
        (before, after)
    });
    assert_eq!(replies.0, ["PONG", "OK", "VALUE blue"]);
    assert_eq!(
        replies.1,
        ["VALUE blue", "OK", "VALUE green"],
        "the same connection, served by the secondary"
    );
    let status = wait_timeout(&mut child.0, Duration::from_secs(60)).expect("colo pair ends");
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "colo pair: {status}\n{stdout}\n{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(summary["failover"], true, "{summary}");
    let current = dir.path().join("vm.img.secondary");
    assert!(
        stderr.contains(&format!(
            "its disk {} is the current one",
            current.display()
        )),
        "{stderr}"
    );
    // The secondary's disk holds what the client wrote, before and after the failover.
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, common::COLO])
        .args(["run", "--tap=tap0", "--duration=10"])
        .arg(format!("--disk={}", current.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _run = Reaper(child);
    let read_back = in_netns(&ns.0, move || ask(&mut connect(), &["GET color"]));
    assert_eq!(read_back, ["VALUE green"]);
}

/// The user's client tells the built-in guest (2 vCPUs) to power off (ACPI S5, as Linux's
/// `poweroff`): the primary's guest ends, the secondary's guest (which ran the same request)
/// is held and let go, and `colo pair` ends on its own, long before its --duration, saying
/// why.
#[test]
fn a_guest_that_powers_off_ends_the_pair() {
    if !common::root_and_kvm() {
        return;
    }
    let Some(ns) = Netns::with_loopback(format!("colo-poff-{}", std::process::id())) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vm.img");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, common::COLO])
        .args([
            "pair",
            "--json",
            "--tap=tap0",
            "--vcpus=2",
            "--duration=120s",
        ])
        .arg(format!("--disk={}", disk.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Reaper(child);
    let started = Instant::now();
    let replies = in_netns(&ns.0, move || {
        let mut conn = connect();
        let r = ask(&mut conn, &["SET color blue", "GET color"]);
        // A few checkpoints first.
        std::thread::sleep(Duration::from_secs(3));
        conn.0.write_all(b"POWEROFF\n").unwrap();
        r
    });
    assert_eq!(replies, ["OK", "VALUE blue"]);
    let status = wait_timeout(&mut child.0, Duration::from_secs(60)).expect("colo pair ends");
    let took = started.elapsed();
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "colo pair: {status}\n{stdout}\n{stderr}");
    assert!(
        took < Duration::from_secs(100),
        "the pair ran on to its --duration ({took:?})\n{stderr}"
    );
    let all = format!("{stdout}\n{stderr}");
    assert!(
        all.contains("primary: the guest powered off; the pair ends"),
        "{all}"
    );
    assert!(all.contains("the primary left in order"), "{all}");
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(summary["failover"], false, "{summary}");
}
