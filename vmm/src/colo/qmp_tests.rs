//! Tests of the QMP socket (`qmp.rs`): the stream reading, the commands, the events, the
//! socket file.

use std::os::unix::fs::FileTypeExt;

use super::*;

fn send(w: &mut UnixStream, r: &mut BufReader<UnixStream>, cmd: Value) -> Value {
    w.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    serde_json::from_str(&l).unwrap()
}

#[test]
fn colo_exit_says_request_only_for_x_colo_lost_heartbeat() {
    use crate::colo::link::LostReason;
    let reason = |lost| ColoExitReason::from(&ExitReason::PeerLost { lost });
    assert_eq!(reason(LostReason::Forced), ColoExitReason::Request);
    assert_eq!(reason(LostReason::Closed), ColoExitReason::Error);
    assert_eq!(
        reason(LostReason::HeartbeatTimeout { silent_ms: 1000 }),
        ColoExitReason::Error
    );
    let failed = ExitReason::Failed {
        error: "x-colo-lost-heartbeat in a message decides nothing".into(),
    };
    assert_eq!(ColoExitReason::from(&failed), ColoExitReason::Error);
    assert_eq!(json!(ColoExitReason::Request), json!("request"));
    assert_eq!(json!(ColoMode::Secondary), json!("secondary"));
}

#[test]
fn a_qmp_session_as_qemu_colo_tooling_drives_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let st = QmpState::new(Side::Primary, 100, (100, 1000));
    let _socket = serve(&path, 0o600, Arc::clone(&st)).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let v = status(&path).unwrap();
    assert_eq!(
        v,
        json!({"mode": "primary", "last-mode": "none", "reason": "none",
               "x-colo-phase": "waiting", "status": "prelaunch"})
    );
    assert_eq!(
        status_lines(&v),
        "mode=primary\nlast_mode=none\nreason=none\nphase=waiting\nstatus=prelaunch\n"
    );
    set_phase(Some(&st), Phase::Colo);
    assert_eq!(status(&path).unwrap()["x-colo-phase"], "colo");
    set_phase(Some(&st), Phase::Serving);
    assert_eq!(status(&path).unwrap()["x-colo-phase"], "serving");

    let s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    assert!(l.contains("\"QMP\""));
    let e = send(&mut w, &mut r, json!({"execute": "query-colo-status"}));
    assert_eq!(e["error"]["class"], "CommandNotFound", "capabilities first");
    assert_eq!(
        send(
            &mut w,
            &mut r,
            json!({"execute": "qmp_capabilities", "id": 1})
        ),
        json!({"return": {}, "id": 1})
    );
    let r1 = send(
        &mut w,
        &mut r,
        json!({"execute": "migrate-set-capabilities",
        "arguments": {"capabilities": [{"capability": "x-colo", "state": true}]}}),
    );
    assert_eq!(r1, json!({"return": {}}));
    let r2 = send(
        &mut w,
        &mut r,
        json!({"execute": "migrate-set-parameters",
        "arguments": {"x-checkpoint-delay": 250}}),
    );
    assert_eq!(r2, json!({"return": {}}));
    assert_eq!(st.lock().unwrap().checkpoint_delay_ms, 250);
    let bad = send(
        &mut w,
        &mut r,
        json!({"execute": "migrate-set-parameters",
        "arguments": {"x-checkpoint-delay": 0}}),
    );
    assert!(bad.get("error").is_some());
    assert!(
        send(
            &mut w,
            &mut r,
            json!({"execute": "migrate", "arguments": {"uri": "rdma:x"}})
        )
        .get("error")
        .is_some()
    );
    assert_eq!(
        send(
            &mut w,
            &mut r,
            json!({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:7100"}})
        ),
        json!({"return": {}})
    );
    assert_eq!(
        st.lock().unwrap().migrate_uri.as_deref(),
        Some("127.0.0.1:7100")
    );
    assert_eq!(
        send(&mut w, &mut r, json!({"execute": "x-colo-lost-heartbeat"})),
        json!({"return": {}})
    );
    assert!(st.lock().unwrap().lost_heartbeat);
    assert!(
        send(&mut w, &mut r, json!({"execute": "no-such"}))["error"]["class"] == "CommandNotFound"
    );
    assert_eq!(
        send(
            &mut w,
            &mut r,
            json!({"execute": "query-status", "id": "s"})
        ),
        json!({"return": {"running": false, "singlestep": false, "status": "prelaunch"},
               "id": "s"})
    );
    let v = send(&mut w, &mut r, json!({"execute": "query-version"}));
    assert_eq!(
        v["return"]["qemu"],
        json!({"major": 9, "minor": 0, "micro": 0})
    );
    assert_eq!(
        v["return"]["package"],
        format!("colo {}", env!("CARGO_PKG_VERSION"))
    );
    let names = send(&mut w, &mut r, json!({"execute": "query-commands"}));
    let names: Vec<&str> = names["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, COMMANDS);
    st.lock().unwrap().run_state = RunState::Running;
    let refused = send(&mut w, &mut r, json!({"execute": "stop", "id": 7}));
    assert_eq!(refused["error"]["class"], "GenericError", "no stop in COLO");
    assert_eq!(refused["id"], 7);
    assert_eq!(st.lock().unwrap().run_request, None, "nothing was carried");
    // The controller leaves COLO: the event reaches the client, the status says so.
    colo_exit(&st, ColoExitReason::Request);
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    let ev: Value = serde_json::from_str(&l).unwrap();
    assert_eq!(ev["event"], "COLO_EXIT");
    assert_eq!(ev["data"], json!({"mode": "primary", "reason": "request"}));
    assert_eq!(
        status(&path).unwrap(),
        json!({"mode": "none", "last-mode": "primary", "reason": "request",
               "x-colo-phase": "serving", "status": "running"})
    );
}

/// Connects to `path`, reads the greeting and negotiates.
fn negotiated(path: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    assert!(
        serde_json::from_str::<Value>(&l)
            .unwrap()
            .get("QMP")
            .is_some()
    );
    assert_eq!(
        send(&mut w, &mut r, json!({"execute": "qmp_capabilities"})),
        json!({"return": {}})
    );
    (w, r)
}

fn read_value(r: &mut BufReader<UnixStream>) -> Value {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    serde_json::from_str(&l).unwrap()
}

/// Sends `cmd` and reads its reply and one event, in whichever order they come.
fn reply_and_event(
    w: &mut UnixStream,
    r: &mut BufReader<UnixStream>,
    cmd: Value,
) -> (Value, Value) {
    w.write_all(cmd.to_string().as_bytes()).unwrap();
    let (a, b) = (read_value(r), read_value(r));
    if a.get("event").is_some() {
        (b, a)
    } else {
        (a, b)
    }
}

/// Whether the server closed the connection (end of stream, or a reset) within 5 s,
/// with nothing more sent first.
fn closed(r: &mut BufReader<UnixStream>) -> bool {
    let mut rest = Vec::new();
    match r.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset && rest.is_empty(),
    }
}

#[test]
fn objects_are_answered_when_complete_not_when_a_line_ends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let _socket = serve(&path, 0o600, QmpState::new(Side::Primary, 100, (100, 1000))).unwrap();
    let mut mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (mut w, mut r) = {
        let s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        read_value(&mut r);
        (w, r)
    };
    // No newline at all: the reply comes anyway (qemu.qmp sends none).
    w.write_all(br#"{"execute": "qmp_capabilities", "id": 1}"#)
        .unwrap();
    assert_eq!(read_value(&mut r), json!({"return": {}, "id": 1}));
    // Two objects in one write, with nothing between them: two replies, in order.
    w.write_all(br#"{"execute":"query-status","id":2}{"execute":"query-colo-status","id":3}"#)
        .unwrap();
    let a = read_value(&mut r);
    let b = read_value(&mut r);
    assert_eq!(
        (&a["id"], &a["return"]["status"]),
        (&json!(2), &json!("prelaunch"))
    );
    assert_eq!(
        (&b["id"], &b["return"]["mode"]),
        (&json!(3), &json!("primary"))
    );
    // One object split over writes is answered once its last byte arrives.
    w.write_all(br#"  {"execute": "query-"#).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    w.write_all(br#"version", "id": 4}"#).unwrap();
    let v = read_value(&mut r);
    assert_eq!(v["id"], 4);
    assert_eq!(v["return"]["qemu"]["major"], 9);
    // A JSON value that is not an object is answered and the session goes on.
    w.write_all(b"[1, 2]").unwrap();
    assert_eq!(read_value(&mut r)["error"]["class"], "GenericError");
    w.write_all(br#"{"execute": "query-status", "id": 5}"#)
        .unwrap();
    assert_eq!(read_value(&mut r)["id"], 5);
    mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "still 0600");
}

#[test]
fn garbage_gets_a_parse_error_then_the_connection_closes_and_the_server_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let _socket = serve(
        &path,
        0o600,
        QmpState::new(Side::Secondary, 100, (100, 1000)),
    )
    .unwrap();
    for junk in [
        &b"{not json"[..],
        b"}",
        b"{\"execute\": \"x\" \"y\"}",
        b"\xff\xfe",
    ] {
        let (mut w, mut r) = negotiated(&path);
        w.write_all(junk).unwrap();
        let e = read_value(&mut r);
        assert_eq!(e["error"]["class"], "GenericError", "{junk:?}");
        assert!(
            e["error"]["desc"]
                .as_str()
                .unwrap()
                .starts_with("JSON parse error"),
            "{e}"
        );
        assert!(closed(&mut r), "the connection closes after {junk:?}");
    }
    // A client that leaves mid-object gets nothing and harms nobody.
    let (mut w, r) = negotiated(&path);
    w.write_all(br#"{"execute": "query-"#).unwrap();
    drop((w, r));
    assert_eq!(status(&path).unwrap()["mode"], "secondary", "still serving");
}

#[test]
fn an_object_over_the_size_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let _socket = serve(&path, 0o600, QmpState::new(Side::Primary, 100, (100, 1000))).unwrap();
    let (mut w, mut r) = negotiated(&path);
    // Just under the limit: answered.
    let pad = "x".repeat(usize::try_from(MAX_OBJECT).unwrap() - 100);
    let fits = json!({"execute": "query-status", "id": 1, "arguments": {"pad": pad}});
    w.write_all(fits.to_string().as_bytes()).unwrap();
    assert_eq!(read_value(&mut r)["id"], 1);
    // An object that never ends: refused once it passes the limit, connection closed.
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(br#"{"execute": "query-status", "arguments": {"pad": ""#);
        let chunk = vec![b'y'; 64 << 10];
        // Bounded: twice the limit, or until the server closes.
        for _ in 0..(2 * MAX_OBJECT / (64 << 10)) {
            if w.write_all(&chunk).is_err() {
                return true;
            }
        }
        false
    });
    let e = read_value(&mut r);
    assert_eq!(e["error"]["class"], "GenericError");
    assert!(
        e["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("larger than 1048576 bytes"),
        "{e}"
    );
    assert!(closed(&mut r));
    writer.join().unwrap();
    assert_eq!(status(&path).unwrap()["mode"], "primary", "still serving");
}

#[test]
fn stop_and_cont_out_of_colo_are_applied_by_the_side_with_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let st = QmpState::new(Side::Secondary, 100, (100, 1000));
    let _socket = serve(&path, 0o600, Arc::clone(&st)).unwrap();
    let (mut w, mut r) = negotiated(&path);
    // Before its first checkpoint a secondary is `inmigrate`; stop is refused (COLO).
    let q = send(&mut w, &mut r, json!({"execute": "query-status"}));
    assert_eq!(q["return"]["status"], "inmigrate");
    assert_eq!(q["return"]["running"], false);
    assert_eq!(
        send(&mut w, &mut r, json!({"execute": "cont"}))["error"]["class"],
        "GenericError"
    );
    // It took over: COLO_EXIT, and it runs alone.
    colo_exit(&st, ColoExitReason::Request);
    assert_eq!(read_value(&mut r)["event"], "COLO_EXIT");
    set_running(Some(&st), true);
    // The side's loop, as apply_run_request runs it, with a VM that always pauses.
    let side = {
        let st = Arc::clone(&st);
        std::thread::spawn(move || {
            let mut applied = 0;
            for _ in 0..500 {
                if let Some(req) = take_run_request(&st) {
                    run_request_done(&st, req, true);
                    applied += 1;
                    if applied == 2 {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            applied
        })
    };
    // The event may come before or after the reply (QEMU promises no order).
    let (reply, ev) = reply_and_event(&mut w, &mut r, json!({"execute": "stop", "id": 1}));
    assert_eq!(reply, json!({"return": {}, "id": 1}));
    assert_eq!(ev["event"], "STOP", "{ev}");
    let q = send(&mut w, &mut r, json!({"execute": "query-status"}));
    assert_eq!(
        q["return"],
        json!({"running": false, "singlestep": false, "status": "paused"})
    );
    // A stopped guest stops again without a new request (as QEMU).
    assert_eq!(
        send(&mut w, &mut r, json!({"execute": "stop"})),
        json!({"return": {}})
    );
    let (reply, ev) = reply_and_event(&mut w, &mut r, json!({"execute": "cont"}));
    assert_eq!(reply, json!({"return": {}}));
    assert_eq!(ev["event"], "RESUME", "{ev}");
    assert_eq!(side.join().unwrap(), 2);
    assert_eq!(st.lock().unwrap().run_state, RunState::Running);
    // Nobody applies a request now: the reply says so within the wait.
    let t = Instant::now();
    let e = send(&mut w, &mut r, json!({"execute": "stop"}));
    assert_eq!(e["error"]["class"], "GenericError");
    assert!(t.elapsed() >= RUN_REQUEST_WAIT);
    assert_eq!(
        st.lock().unwrap().run_request,
        None,
        "the stale request is withdrawn"
    );
    // The side ends its VM: SHUTDOWN, and query-status says so.
    shutdown(&st, ShutdownCause::HostQmpQuit);
    let ev = read_value(&mut r);
    assert_eq!(ev["event"], "SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(
        send(&mut w, &mut r, json!({"execute": "query-status"}))["return"]["status"],
        "shutdown"
    );
}

#[test]
fn quit_is_answered_before_the_side_is_told_to_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let st = QmpState::new(Side::Primary, 100, (100, 1000));
    let _socket = serve(&path, 0o600, Arc::clone(&st)).unwrap();
    let quit = QmpState::quit_flag(&st);
    let (mut w, mut r) = negotiated(&path);
    assert!(!quit.load(Ordering::SeqCst));
    assert_eq!(
        send(&mut w, &mut r, json!({"execute": "quit", "id": "q"})),
        json!({"return": {}, "id": "q"})
    );
    let t = Instant::now();
    while !quit.load(Ordering::SeqCst) {
        assert!(t.elapsed() < Duration::from_secs(5), "quit sets the flag");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A second negotiation on the same connection is refused, as QEMU does.
    assert_eq!(
        send(&mut w, &mut r, json!({"execute": "qmp_capabilities"}))["error"]["class"],
        "CommandNotFound"
    );
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn the_socket_has_the_mode_asked_for_and_goes_when_its_side_drops_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    for mode in [0o600, 0o660, 0o640, 0o666] {
        let socket = serve(
            &path,
            mode,
            QmpState::new(Side::Secondary, 100, (100, 1000)),
        )
        .unwrap();
        assert!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_socket()
        );
        assert_eq!(mode_of(&path), mode, "mode {mode:o}");
        assert_eq!(status(&path).unwrap()["mode"], "secondary");
        drop(socket);
        assert!(
            std::fs::symlink_metadata(&path).is_err(),
            "the socket file is removed with its side (mode {mode:o})"
        );
    }
}

#[test]
fn anything_but_a_socket_at_the_path_is_refused_and_left_intact() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"keep me").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let subdir = dir.path().join("a-dir");
    std::fs::create_dir(&subdir).unwrap();
    let link = dir.path().join("a-link");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    for (path, expected) in [
        (&file, PathKind::RegularFile),
        (&subdir, PathKind::Directory),
        (&link, PathKind::Symlink),
    ] {
        let st = QmpState::new(Side::Primary, 100, (100, 1000));
        match serve(path, 0o600, st) {
            Err(ColoError::QmpPathTaken { path: p, kind }) => {
                assert_eq!(&p, path);
                assert_eq!(kind, expected);
            }
            other => panic!("{} was not refused: {other:?}", path.display()),
        }
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert_eq!(mode_of(&file), 0o644);
    assert!(subdir.is_dir());
    assert_eq!(std::fs::read_link(&link).unwrap(), file);
    let e = serve(&file, 0o600, QmpState::new(Side::Primary, 1, (1, 2))).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "--qmp {}: a regular file is there; only a stale socket is replaced (remove \
             it or choose another path)",
            file.display()
        )
    );
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    // A side that died without cleaning up leaves a socket nobody listens on.
    drop(UnixListener::bind(&path).unwrap());
    assert!(
        std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_socket()
    );
    let live = serve(&path, 0o600, QmpState::new(Side::Primary, 100, (100, 1000))).unwrap();
    assert_eq!(status(&path).unwrap()["mode"], "primary");
    let second = serve(
        &path,
        0o600,
        QmpState::new(Side::Secondary, 100, (100, 1000)),
    );
    assert!(
        matches!(&second, Err(ColoError::QmpSocketInUse { path: p }) if p == &path),
        "{second:?}"
    );
    assert_eq!(
        status(&path).unwrap()["mode"],
        "primary",
        "the live side keeps its socket"
    );
    drop(live);
    assert!(std::fs::symlink_metadata(&path).is_err());
}
