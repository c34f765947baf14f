//! A real Linux kernel (Debian's cloud kernel, from `scripts/test-kernel.sh`) protected by
//! `colo pair`: checkpoints run while it boots, the primary is killed, and the secondary
//! carries the same kernel on from the last checkpoint: it prints further boot lines and
//! never starts over (no second banner, kernel time goes on).
//!
//! On this host guest kernel code is emulated, so the kernel gets only through its early
//! boot in the test's 40 s; on a KVM host with hardware virtualisation the same command
//! runs the whole boot.

mod common;

use std::time::Duration;

use common::{Reaper, kvm, wait_timeout};

/// The kernel's time stamp of a console line (`[   12.345678] ...`).
fn kernel_secs(line: &str) -> Option<f64> {
    let rest = &line[line.find("] [")? + 3..];
    rest[..rest.find(']')?].trim().parse().ok()
}

#[test]
fn a_booting_linux_guest_fails_over_and_boots_on_in_the_secondary() {
    if !kvm() {
        return;
    }
    let Some(dir) = colo_machine::testing::test_kernel_dir(&["vmlinux", "initrd.img"]) else {
        return;
    };
    let child = common::colo()
        .args([
            "pair",
            "--json",
            "--verbose",
            // The kernel reads colo's ACPI tables from about 15 s on here (its clock
            // reads 0.0 until then): the kill comes once its time runs.
            "--duration=40s",
            "--kill-primary-after=25s",
        ])
        .arg(format!("--kernel={}", dir.join("vmlinux").display()))
        .arg(format!("--initrd={}", dir.join("initrd.img").display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start colo pair");
    let mut child = Reaper(child);
    // Drain stderr on a thread: the consoles of both VMs go there and would fill a pipe.
    let mut err = child.0.stderr.take().expect("piped");
    let drain = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let status = wait_timeout(&mut child.0, Duration::from_secs(120)).expect("colo pair ends");
    let mut stdout = String::new();
    let _ = std::io::Read::read_to_string(&mut child.0.stdout.take().expect("piped"), &mut stdout);
    let stderr = drain.join().expect("stderr");
    let tail = || stderr.lines().rev().take(30).collect::<Vec<_>>().join("\n");
    assert!(
        status.success(),
        "colo pair failed: {status:?}\n{stdout}\n{}",
        tail()
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("a JSON summary");
    assert_eq!(
        summary["failover"], true,
        "the secondary took over: {summary}"
    );
    assert!(
        summary["epochs"].as_u64().unwrap_or(0) >= 20,
        "checkpoints ran while the kernel booted: {summary}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    let banner = "Linux version";
    assert!(
        lines
            .iter()
            .any(|l| l.contains("[pvm]") && l.contains(banner)),
        "the primary's kernel started:\n{}",
        tail()
    );
    let takeover = lines
        .iter()
        .position(|l| l.contains("FAILOVER"))
        .expect("the secondary says it takes over");
    // The primary's kernel time when it was killed: its last line before the takeover.
    let pvm_last = lines[..takeover]
        .iter()
        .filter(|l| l.contains("[pvm]"))
        .filter_map(|l| kernel_secs(l))
        .fold(0.0, f64::max);
    let after: Vec<&str> = lines[takeover..]
        .iter()
        .copied()
        .filter(|l| l.contains("[svm]"))
        .collect();
    assert!(
        !after.is_empty(),
        "the secondary's kernel printed on after the takeover:\n{}",
        tail()
    );
    assert!(
        after.iter().all(|l| !l.contains(banner)),
        "the secondary's kernel did not start over:\n{}",
        after.join("\n")
    );
    let svm_last = after
        .iter()
        .filter_map(|l| kernel_secs(l))
        .fold(0.0, f64::max);
    // Kernel time goes on from the checkpoint: at least as far as the primary had got,
    // less a checkpoint interval (the SVM resumes from the last checkpoint).
    assert!(
        pvm_last > 1.0 && svm_last >= pvm_last - 0.2,
        "kernel time on the primary {pvm_last} s at the kill, on the secondary {svm_last} s after"
    );
}
