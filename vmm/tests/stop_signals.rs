//! Stop means stop, in every state: `colo primary` and `colo secondary` end cleanly (exit
//! 0, saying why) soon after SIGTERM or SIGINT, whatever they are doing: a secondary
//! waiting for its primary, a primary waiting for its secondary, either side in the disk
//! resync, both in COLO, a primary serving alone after its secondary stopped, and a
//! secondary serving after a takeover. Each test sends both signals, each to a fresh pair,
//! and prints how long each side took to stop.

mod common;

use std::time::{Duration, Instant};

use common::sides::{Scratch, says, says_any, start};
use common::{Reaper, kvm, wait_timeout};

/// How long a side may take to stop before the test fails (the aim is well under a
/// second; the figure is printed: a loaded CI machine must not fail the test).
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// How long a state may take to reach.
const REACH: Duration = Duration::from_secs(60);

const SIGNALS: [(libc::c_int, &str); 2] = [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")];

/// `c` with `args` added.
fn with(mut c: std::process::Command, args: &[&str]) -> std::process::Command {
    c.args(args);
    c
}

/// Sends `sig` to `child` and waits for it to exit 0; returns how long that took.
fn stop(child: &mut Reaper, sig: libc::c_int, what: &str) -> Duration {
    let t = Instant::now();
    // SAFETY: kill(2) on our own child, not reaped yet (it is waited for below only).
    let r = unsafe { libc::kill(child.0.id() as i32, sig) };
    assert_eq!(r, 0, "signal {what}");
    let status = wait_timeout(&mut child.0, STOP_LIMIT)
        .unwrap_or_else(|| panic!("{what} still runs {STOP_LIMIT:?} after the signal"));
    let took = t.elapsed();
    assert!(status.success(), "{what} ended with {status}");
    eprintln!("{what}: stopped {} ms after the signal", took.as_millis());
    took
}

#[test]
fn a_secondary_waiting_for_its_primary_stops() {
    if !kvm() {
        return;
    }
    for (sig, name) in SIGNALS {
        let s = Scratch::new(&format!("stop-wait-{name}"));
        let (mut sec, rx) = start(with(s.side("secondary", "s", None), &["--insecure"]));
        says(&rx, "waiting for the primary", REACH);
        stop(&mut sec, sig, &format!("waiting secondary ({name})"));
        says(&rx, "stopped before the primary connected", REACH);
    }
}

#[test]
fn a_primary_waiting_for_its_secondary_stops() {
    if !kvm() {
        return;
    }
    for (sig, name) in SIGNALS {
        // Nothing listens at the scratch port.
        let s = Scratch::new(&format!("stop-pwait-{name}"));
        let (mut pri, rx) = start(with(s.side("primary", "p", None), &["--insecure"]));
        says(&rx, "VM built", REACH);
        std::thread::sleep(Duration::from_millis(300));
        stop(
            &mut pri,
            sig,
            &format!("primary waiting for its secondary ({name})"),
        );
        says(&rx, "stopped before the secondary was in sync", REACH);
    }
}

#[test]
fn sides_in_the_disk_resync_stop() {
    if !kvm() {
        return;
    }
    for (i, (sig, name)) in SIGNALS.into_iter().enumerate() {
        let s = Scratch::new(&format!("stop-resync-{name}"));
        // A 2 GiB disk: its copy takes seconds, long enough to be stopped in.
        let (mut sec, srx) = start(with(
            s.side("secondary", "s", None),
            &["--insecure", "--disk-size=2GiB"],
        ));
        says(&srx, "waiting for the primary", REACH);
        let (mut pri, prx) = start(with(
            s.side("primary", "p", None),
            &["--insecure", "--disk-size=2GiB"],
        ));
        says(&prx, "secondary attached", REACH);
        if i == 0 {
            // The secondary is stopped mid-copy: it says its copy is partial; the primary
            // loses it and serves alone, and stops on the signal there too.
            stop(
                &mut sec,
                sig,
                &format!("secondary in the disk resync ({name})"),
            );
            // On a fast machine the copy may just have ended: then it stopped following.
            let said = says_any(
                &srx,
                &["stopped during the disk resync", "stopped while following"],
                REACH,
            );
            eprintln!("secondary: {}", said.last().unwrap());
            says_any(&prx, &["starts unprotected", "leaving COLO"], REACH);
            stop(&mut pri, sig, &format!("primary serving alone ({name})"));
        } else {
            stop(
                &mut pri,
                sig,
                &format!("primary in the disk resync ({name})"),
            );
            says_any(
                &prx,
                &[
                    "stopped before the secondary was in sync",
                    "the secondary was told goodbye",
                ],
                REACH,
            );
            // The secondary's copy lost its source: it ends (with an error: the copy is
            // partial) rather than waiting on.
            let st = wait_timeout(&mut sec.0, STOP_LIMIT).expect("the secondary ends");
            eprintln!("secondary after its primary stopped mid-resync: {st}");
        }
    }
}

#[test]
fn sides_in_colo_stop_and_the_other_goes_on() {
    if !kvm() {
        return;
    }
    for (sig, name) in SIGNALS {
        let s = Scratch::new(&format!("stop-colo-{name}"));
        let (mut sec, srx) = start(with(s.side("secondary", "s", None), &["--insecure"]));
        says(&srx, "waiting for the primary", REACH);
        let (mut pri, prx) = start(with(s.side("primary", "p", None), &["--insecure"]));
        says(&prx, "COLO running", REACH);
        std::thread::sleep(Duration::from_millis(500));
        // The secondary stops; the primary serves on alone.
        stop(&mut sec, sig, &format!("secondary in COLO ({name})"));
        says(&srx, "stopped while following the primary", REACH);
        says(&prx, "leaving COLO", REACH);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            matches!(pri.0.try_wait(), Ok(None)),
            "the primary ended when its secondary stopped"
        );
        stop(&mut pri, sig, &format!("primary serving alone ({name})"));
    }
}

#[test]
fn a_primary_in_colo_stops_and_its_secondary_follows() {
    if !kvm() {
        return;
    }
    for (sig, name) in SIGNALS {
        let s = Scratch::new(&format!("stop-pcolo-{name}"));
        let (mut sec, srx) = start(with(s.side("secondary", "s", None), &["--insecure"]));
        says(&srx, "waiting for the primary", REACH);
        let (mut pri, prx) = start(with(s.side("primary", "p", None), &["--insecure"]));
        says(&prx, "COLO running", REACH);
        std::thread::sleep(Duration::from_millis(500));
        stop(&mut pri, sig, &format!("primary in COLO ({name})"));
        says(&prx, "the secondary was told goodbye", REACH);
        // Told goodbye, the secondary does not take over: it stops too.
        let st = wait_timeout(&mut sec.0, STOP_LIMIT).expect("the secondary ends");
        assert!(st.success(), "secondary: {st}");
        says(&srx, "the primary left in order", REACH);
    }
}

#[test]
fn a_secondary_serving_after_a_takeover_stops() {
    if !kvm() {
        return;
    }
    for (sig, name) in SIGNALS {
        let s = Scratch::new(&format!("stop-fo-{name}"));
        // --peer: after the takeover it serves as a primary waiting for a new secondary
        // (none comes).
        let nobody = format!("--peer=127.0.0.1:{}", common::two_free_ports());
        let (mut sec, srx) = start(with(
            s.side("secondary", "s", None),
            &["--insecure", nobody.as_str()],
        ));
        says(&srx, "waiting for the primary", REACH);
        let (mut pri, prx) = start(with(s.side("primary", "p", None), &["--insecure"]));
        says(&prx, "COLO running", REACH);
        std::thread::sleep(Duration::from_millis(500));
        pri.0.kill().unwrap();
        let _ = pri.0.wait();
        says(&srx, "FAILOVER", REACH);
        says(&srx, "serving as the primary", REACH);
        std::thread::sleep(Duration::from_millis(300));
        stop(
            &mut sec,
            sig,
            &format!("secondary serving after a takeover ({name})"),
        );
    }
}
