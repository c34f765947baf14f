//! `colo run` end to end: the built-in guest serves a real kernel TCP client through a tap
//! device inside a network namespace this test creates (and removes), and bad images are
//! refused before the VM starts.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Netns, Reaper, colo, in_netns};

#[test]
fn colo_run_serves_a_real_tcp_client_and_keeps_its_data_on_disk() {
    if !common::root_and_kvm() {
        return;
    }
    let Some(ns) = Netns::add(format!("colo-run-{}", std::process::id())) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("colo-run-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    for boot in 0..2 {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(common::COLO)
            .args(["run", "--tap", "tap0", "--disk"])
            .arg(&disk)
            .args(["--duration", "20"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = Reaper(child);
        let replies = in_netns(&ns.0, move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let s = loop {
                match TcpStream::connect_timeout(
                    &"10.0.2.15:7000".parse().unwrap(),
                    Duration::from_millis(300),
                ) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => panic!("guest did not answer: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut out = vec![];
            let reqs: &[&str] = if boot == 0 {
                &["PING", "SET color blue", "GET color", "COUNT"]
            } else {
                &["GET color", "COUNT"]
            };
            for q in reqs {
                w.write_all(format!("{q}\n").as_bytes()).unwrap();
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                out.push(l.trim().to_string());
            }
            out
        });
        if boot == 0 {
            assert_eq!(replies, ["PONG", "OK", "VALUE blue", "COUNT 1"]);
        } else {
            // A new boot replays the disk log: the data survived, and nothing new was set.
            assert_eq!(replies, ["VALUE blue", "COUNT 0"]);
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
        let status = child.0.wait().unwrap();
        assert!(status.success(), "colo run exits 0 on SIGTERM: {status}");
        let mut console = String::new();
        std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut console).unwrap();
        assert!(console.contains("serving on 10.0.2.15:7000"), "{console}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_images_and_disks_are_refused_before_the_vm_starts() {
    let dir = std::env::temp_dir().join(format!("colo-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.elf");
    std::fs::write(&junk, [b'x'; 200]).unwrap();
    let odd = dir.join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let sized = dir.join("sized.img");
    std::fs::write(&sized, vec![0u8; 4096]).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--image".into(), "/nonexistent/guest.elf".into()],
            "bad guest image",
        ),
        (
            vec!["--image".into(), junk.display().to_string()],
            "no ELF magic",
        ),
        (
            vec!["--disk".into(), odd.display().to_string()],
            "not a non-zero multiple of 512",
        ),
        (
            vec![
                "--disk".into(),
                sized.display().to_string(),
                "--disk-size".into(),
                "8192".into(),
            ],
            "--disk-size says 8192",
        ),
        (vec!["--ram".into(), "16MiB".into()], "too little"),
        (
            vec!["--guest-ip".into(), "10.0.2.300/24".into()],
            "not an IPv4 address",
        ),
    ];
    for (args, want) in cases {
        // A socket path nobody listens on: every case must fail before it is used.
        let mut all = vec![
            "run".to_string(),
            "--net-socket".into(),
            "/nonexistent/net.sock".into(),
        ];
        if !args.contains(&"--disk".to_string()) {
            all.push("--disk".into());
            all.push(dir.join("d.img").display().to_string());
        }
        all.extend(args);
        let out = colo().args(&all).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {err}");
        assert!(err.contains(want), "{all:?} should say {want:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_kernels_are_refused_before_the_vm_starts() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, [b'x'; 600]).unwrap();
    // The built-in guest with its PVH note renamed (type 18 made 19): an x86-64 ELF, but
    // without the PVH entry.
    let nopvh = dir.path().join("guest.elf");
    let mut elf = colo_machine::guest_image::GUEST_ELF.to_vec();
    let note = [4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
    let at = elf
        .windows(note.len())
        .position(|w| w == note)
        .expect("the built-in guest carries the PVH note");
    elf[at + 8] = 19;
    std::fs::write(&nopvh, elf).unwrap();
    let disk = dir.path().join("d.img");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--kernel".into(), "/nonexistent/vmlinux".into()],
            "cannot read the kernel",
        ),
        (
            vec!["--kernel".into(), junk.display().to_string()],
            "neither an ELF vmlinux nor a bzImage",
        ),
        (
            vec!["--kernel".into(), nopvh.display().to_string()],
            "without the Xen PVH entry note",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec![
            "run".to_string(),
            "--disk".into(),
            disk.display().to_string(),
        ];
        all.extend(args);
        let out = colo().args(&all).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {err}");
        assert!(err.contains(want), "{all:?} should say {want:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // An initrd needs a kernel.
    let out = colo().args(["run", "--initrd", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn colo_run_shows_a_linux_kernels_console_on_stdout_and_sigterm_ends_it_cleanly() {
    if !common::kvm() {
        return;
    }
    let kdir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-kernel");
    if !kdir.join("vmlinux").exists() || !kdir.join("initrd.img").exists() {
        eprintln!(
            "skipped: no test kernel in {} (run `bash scripts/test-kernel.sh`, which the test \
             command does first)",
            kdir.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let child = colo()
        .arg("run")
        .arg("--kernel")
        .arg(kdir.join("vmlinux"))
        .arg("--initrd")
        .arg(kdir.join("initrd.img"))
        .arg("--disk")
        .arg(dir.path().join("d.img"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Reaper(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The e820 map comes about 7 s after the start here.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| {
        l.starts_with("[linux] ") && l.contains("BIOS-e820: [mem 0x0000000000100000")
    }) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("no e820 line on stdout within 120 s:\n{}", seen.join("\n")),
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.starts_with("[linux] ") && l.contains("Linux version")),
        "{seen:?}"
    );
    // SAFETY: kill(2) on our own child, still running (it is printing).
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = common::wait_timeout(&mut child.0, Duration::from_secs(20))
        .expect("colo run did not stop within 20 s of SIGTERM");
    assert!(status.success(), "{status:?}");
}
