//! The QMP socket of `colo primary` and `colo secondary` (`--qmp`, `--qmp-mode`) with the
//! built binary: its mode, what it refuses to replace, and that it goes with its side.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Reaper, kvm, wait_timeout};

/// A scratch directory for one side: its disk, a network socket it can connect to, and
/// the QMP path. Removed on drop.
struct Side {
    dir: tempfile::TempDir,
}

impl Side {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // The VMM connects to its --net-socket: accept that and drain it.
        let l = UnixListener::bind(dir.path().join("net.sock")).unwrap();
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = l.accept() {
                let _ = std::io::copy(&mut c, &mut std::io::sink());
            }
        });
        Self { dir }
    }

    fn qmp(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// `colo <side>` with this directory's disk and network socket, and `--qmp`.
    fn command(&self, side: &str) -> Command {
        let mut c = common::colo();
        c.arg(side)
            .arg(format!(
                "--disk={}",
                self.dir.path().join("disk.img").display()
            ))
            .arg(format!(
                "--net-socket={}",
                self.dir.path().join("net.sock").display()
            ))
            .arg(format!("--qmp={}", self.qmp().display()))
            // Loopback only; the pair key is tested in pair_auth.rs.
            .arg("--insecure")
            .stdin(Stdio::null());
        c
    }
}

/// Runs `c` to its end (at most 60 s), with its output in files (no pipe can fill up).
fn run(mut c: Command) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Reaper(
        c.stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    );
    let status =
        wait_timeout(&mut child.0, Duration::from_secs(60)).expect("colo ends within 60 s");
    Output {
        status,
        stdout: std::fs::read(out).unwrap(),
        stderr: std::fs::read(err).unwrap(),
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

fn gone(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_err()
}

/// A primary started without --peer waits for a QMP `migrate`: it serves its socket with
/// the mode asked for; SIGTERM ends it normally, and the socket goes with it.
fn primary_serves_then_ends(mode_args: &[&str], mode: u32) {
    let side = Side::new();
    let qmp = side.qmp();
    let mut c = side.command("primary");
    c.args(mode_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut p = Reaper(c.spawn().unwrap());
    let start = Instant::now();
    while !std::fs::symlink_metadata(&qmp).is_ok_and(|m| m.file_type().is_socket()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no QMP socket within 30 s (primary: {:?})",
            p.0.try_wait()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(mode_of(&qmp), mode, "the socket's mode");
    let status = common::colo()
        .args(["status", "--qmp"])
        .arg(&qmp)
        .output()
        .unwrap();
    assert!(status.status.success(), "colo status: {status:?}");
    assert!(String::from_utf8_lossy(&status.stdout).contains("\"mode\":\"primary\""));
    // SAFETY: kill(2) on our own child, which is still running (it answered above).
    assert_eq!(unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) }, 0);
    let end = wait_timeout(&mut p.0, Duration::from_secs(30)).expect("the primary ends");
    assert!(end.success(), "a primary ended by SIGTERM exits 0: {end:?}");
    assert!(
        gone(&qmp),
        "the QMP socket is removed when the primary ends"
    );
}

#[test]
fn the_qmp_socket_is_0600_by_default_and_goes_when_the_side_ends() {
    if !kvm() {
        return;
    }
    primary_serves_then_ends(&[], 0o600);
}

#[test]
fn qmp_mode_sets_the_socket_mode() {
    if !kvm() {
        return;
    }
    primary_serves_then_ends(&["--qmp-mode=660"], 0o660);
}

/// A pair that runs its course: the primary stops after --duration, the secondary ends
/// when its primary leaves; both exit 0 and both sockets are gone.
#[test]
fn both_sides_of_a_pair_remove_their_sockets_when_the_pair_ends() {
    if !kvm() {
        return;
    }
    let port = common::two_free_ports();
    let (sec, pri) = (Side::new(), Side::new());
    let mut s = sec.command("secondary");
    s.arg(format!("--listen=127.0.0.1:{port}"));
    let mut s = Reaper(
        s.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut p = pri.command("primary");
    p.args([&format!("--peer=127.0.0.1:{port}"), "--duration=2s"]);
    let out = run(p);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the primary runs its course:\n{log}");
    assert!(
        log.contains("COLO running"),
        "the pair was protected:\n{log}"
    );
    let end = wait_timeout(&mut s.0, Duration::from_secs(30)).expect("the secondary ends");
    assert!(end.success(), "the secondary ends normally: {end:?}");
    assert!(gone(&pri.qmp()), "the primary's QMP socket is removed");
    assert!(gone(&sec.qmp()), "the secondary's QMP socket is removed");
}

/// A side that fails after its socket was served (here: its guest image is missing)
/// removes the socket on its way out. Needs no KVM: the socket comes before the VM.
#[test]
fn the_qmp_socket_goes_when_a_side_fails() {
    for side_name in ["primary", "secondary"] {
        let side = Side::new();
        let mut c = side.command(side_name);
        c.arg(format!(
            "--image={}",
            side.dir.path().join("no-such-guest.elf").display()
        ));
        if side_name == "primary" {
            c.arg("--peer=127.0.0.1:9");
        }
        let out = run(c);
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{side_name} fails:\n{log}");
        assert!(
            log.contains("QMP socket ready"),
            "{side_name} served it:\n{log}"
        );
        assert!(
            gone(&side.qmp()),
            "the {side_name}'s QMP socket is removed when it fails:\n{log}"
        );
    }
}

/// A regular file where the socket should go is refused with a message naming it, and
/// left as it was.
#[test]
fn a_regular_file_at_the_qmp_path_is_refused_and_left_intact() {
    for side_name in ["primary", "secondary"] {
        let side = Side::new();
        let qmp = side.qmp();
        std::fs::write(&qmp, b"not a socket\n").unwrap();
        std::fs::set_permissions(&qmp, std::fs::Permissions::from_mode(0o640)).unwrap();
        let mut c = side.command(side_name);
        if side_name == "primary" {
            c.arg("--peer=127.0.0.1:9");
        }
        let out = run(c);
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{side_name} refuses:\n{log}");
        assert!(
            log.contains(&format!("--qmp {}: a regular file is there", qmp.display())),
            "{side_name} names the path and what is there:\n{log}"
        );
        assert_eq!(std::fs::read(&qmp).unwrap(), b"not a socket\n");
        assert_eq!(mode_of(&qmp), 0o640);
    }
}

/// `--qmp-mode` takes octal permission bits only, and only with `--qmp`.
#[test]
fn a_qmp_mode_that_is_not_octal_permission_bits_is_refused() {
    let side = Side::new();
    for (mode, says) in [
        ("668", "is not an octal mode"),
        ("rw-rw----", "is not an octal mode"),
        ("1777", "has bits beyond 777"),
    ] {
        let mut c = side.command("secondary");
        c.arg(format!("--qmp-mode={mode}"));
        let out = run(c);
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--qmp-mode={mode}:\n{log}");
        assert!(log.contains(says), "--qmp-mode={mode} says why:\n{log}");
        assert!(
            gone(&side.qmp()),
            "nothing was created for --qmp-mode={mode}"
        );
    }
    let out = run({
        let mut c = common::colo();
        c.args(["secondary", "--qmp-mode=660"]).stdin(Stdio::null());
        c
    });
    assert_eq!(out.status.code(), Some(2), "--qmp-mode needs --qmp");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--qmp <QMP>"));
}

/// Whether QEMU's Python QMP library can be imported; says why the test is skipped if not.
fn qemu_qmp() -> bool {
    let out = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr);
            let why = why.lines().last().unwrap_or("import failed");
            eprintln!(
                "skipped: python3 cannot import qemu.qmp ({why}); scripts/test.sh installs it"
            );
            false
        }
        Err(e) => {
            eprintln!("skipped: no python3 to run qemu.qmp ({e})");
            false
        }
    }
}

/// Starts `c` with its stdout and stderr in files in `dir` named after `name`.
fn start_logged(mut c: Command, dir: &Path, name: &str) -> (Reaper, PathBuf) {
    let err = dir.join(format!("{name}.stderr"));
    let child = c
        .stdout(std::fs::File::create(dir.join(format!("{name}.stdout"))).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    (Reaper(child), err)
}

/// Waits (at most 30 s) for a socket at `path`.
fn wait_socket(path: &Path, p: &mut Reaper) {
    let start = Instant::now();
    while !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no QMP socket at {} within 30 s ({:?})",
            path.display(),
            p.0.try_wait()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// QEMU's own QMP client (`qemu.qmp`, as QEMU's Python tooling uses it) drives a real
/// pair: negotiation, the queries, a failover by `x-colo-lost-heartbeat` with its
/// `COLO_EXIT`, `stop`/`cont` on the secondary serving alone, and `quit`, after which both
/// sides end normally, say so, and remove their sockets.
#[test]
fn qemu_python_qmp_client_drives_a_pair_through_a_failover_and_quits_it() {
    if !kvm() || !qemu_qmp() {
        return;
    }
    let port = common::two_free_ports();
    let (sec, pri) = (Side::new(), Side::new());
    let logs = tempfile::tempdir().unwrap();
    let mut s = sec.command("secondary");
    s.arg(format!("--listen=127.0.0.1:{port}"));
    let (mut s, s_err) = start_logged(s, logs.path(), "secondary");
    wait_socket(&sec.qmp(), &mut s);
    let mut p = pri.command("primary");
    p.arg(format!("--peer=127.0.0.1:{port}"));
    let (mut p, p_err) = start_logged(p, logs.path(), "primary");
    wait_socket(&pri.qmp(), &mut p);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp/colo_pair.py");
    let out = run({
        let mut c = Command::new("python3");
        c.arg(&script).arg(pri.qmp()).arg(sec.qmp());
        c
    });
    let log = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim_end() == "ok",
        "the qemu.qmp script: {:?}\n{}{}\nprimary:\n{}\nsecondary:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log(&p_err),
        log(&s_err)
    );
    for (name, child, err, qmp) in [
        ("secondary", &mut s, &s_err, sec.qmp()),
        ("primary", &mut p, &p_err, pri.qmp()),
    ] {
        let end = wait_timeout(&mut child.0, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the {name} ends after quit:\n{}", log(err)));
        let text = log(err);
        assert!(end.success(), "the {name} ends normally: {end:?}\n{text}");
        assert!(
            text.contains("stopped by QMP quit"),
            "the {name} says why:\n{text}"
        );
        assert!(gone(&qmp), "the {name}'s QMP socket is removed");
    }
    assert!(
        log(&s_err).contains("FAILOVER")
            || log(&logs.path().join("secondary.stdout")).contains("FAILOVER"),
        "the secondary took over"
    );
}

/// `colo pair --qmp PATH`: the primary serves PATH and the secondary PATH.secondary, each
/// answering as its side; both go when the pair ends.
#[test]
fn colo_pair_qmp_serves_a_socket_for_each_side() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("pair.qmp");
    let secondary = dir.path().join("pair.qmp.secondary");
    let mut c = common::colo();
    c.args(["pair", "--duration=6s"])
        .arg(format!("--qmp={}", qmp.display()))
        .stdin(Stdio::null());
    let (mut pair, err) = start_logged(c, dir.path(), "pair");
    for (path, mode) in [(&qmp, "primary"), (&secondary, "secondary")] {
        wait_socket(path, &mut pair);
        assert_eq!(mode_of(path), 0o600);
        let status = common::colo()
            .args(["status", "--qmp"])
            .arg(path)
            .output()
            .unwrap();
        assert!(status.status.success(), "colo status {mode}: {status:?}");
        assert!(
            String::from_utf8_lossy(&status.stdout).contains(&format!("\"mode\":\"{mode}\"")),
            "{}: {status:?}",
            path.display()
        );
    }
    let end = wait_timeout(&mut pair.0, Duration::from_secs(60)).expect("the pair ends");
    assert!(
        end.success(),
        "colo pair: {end:?}\n{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    assert!(
        gone(&qmp) && gone(&secondary),
        "both sockets go with the pair"
    );
}
