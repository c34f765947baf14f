//! A QMP-compatible control socket (a Unix socket, mode 0600 unless `--qmp-mode` says
//! otherwise), so that tooling written for QEMU's COLO needs only the socket path changed.
//! The socket replaces only a stale socket at its path, and is removed when the side ends.
//!
//! Supported: `qmp_capabilities`, `query-colo-status`, `migrate-set-capabilities` (the
//! `x-colo` capability), `migrate-set-parameters` (`x-checkpoint-delay`,
//! `x-heartbeat-interval`, `x-heartbeat-timeout`, in ms), `migrate` (records the
//! secondary's `tcp:host:port` URI for a primary started without `--peer`),
//! `x-colo-lost-heartbeat`, and the `COLO_EXIT` event (`mode`, `reason`).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Value, json};

use super::event::{ExitReason, Side};
use super::{ColoError, Result};

/// QEMU's `COLOMode`: what this side is in COLO, as `query-colo-status` and `COLO_EXIT`
/// name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ColoMode {
    /// Not in COLO (never was, or left it).
    None,
    /// The primary.
    Primary,
    /// The secondary.
    Secondary,
}

impl From<Side> for ColoMode {
    fn from(s: Side) -> Self {
        match s {
            Side::Primary => Self::Primary,
            Side::Secondary => Self::Secondary,
        }
    }
}

/// QEMU's `COLOExitReason`: why COLO ended, as `query-colo-status` and `COLO_EXIT` say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ColoExitReason {
    /// COLO has not ended.
    None,
    /// Ended by hand (`x-colo-lost-heartbeat`).
    Request,
    /// Ended by a failure (the peer was lost).
    Error,
}

impl From<&ExitReason> for ColoExitReason {
    fn from(r: &ExitReason) -> Self {
        if r.by_hand() {
            Self::Request
        } else {
            Self::Error
        }
    }
}

/// The state the socket reports and the requests it carries to the controller.
#[derive(Debug)]
pub struct QmpState {
    /// What this side is in COLO now.
    pub mode: ColoMode,
    /// The mode before the last COLO exit.
    pub last_mode: ColoMode,
    /// Why COLO last ended.
    pub reason: ColoExitReason,
    /// `x-checkpoint-delay` in ms.
    pub checkpoint_delay_ms: u64,
    /// Heartbeat interval and timeout in ms.
    pub heartbeat_ms: (u64, u64),
    /// Whether `x-colo` was enabled.
    pub x_colo: bool,
    /// The `migrate` URI, if one was given.
    pub migrate_uri: Option<String>,
    /// `x-colo-lost-heartbeat` was issued and not yet acted on.
    pub lost_heartbeat: bool,
    events: Vec<UnixStream>,
}

/// A shared handle on the socket's state.
pub type Shared = Arc<Mutex<QmpState>>;

impl QmpState {
    /// State for one side.
    pub fn new(side: Side, delay_ms: u64, heartbeat_ms: (u64, u64)) -> Shared {
        Arc::new(Mutex::new(Self {
            mode: side.into(),
            last_mode: ColoMode::None,
            reason: ColoExitReason::None,
            checkpoint_delay_ms: delay_ms,
            heartbeat_ms,
            x_colo: true,
            migrate_uri: None,
            lost_heartbeat: false,
            events: Vec::new(),
        }))
    }
}

/// Records that this side left COLO and sends `COLO_EXIT` to every client.
pub fn colo_exit(s: &Shared, reason: ColoExitReason) {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    st.last_mode = st.mode;
    st.reason = reason;
    let ev = json!({
        "event": "COLO_EXIT",
        "data": {"mode": st.mode, "reason": reason},
        "timestamp": timestamp(),
    });
    st.mode = ColoMode::None;
    let line = format!("{ev}\r\n");
    st.events
        .retain_mut(|c| c.write_all(line.as_bytes()).is_ok());
}

fn timestamp() -> Value {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": d.as_secs(), "microseconds": d.subsec_micros()})
}

/// What is at a path where the QMP socket was to be created (other than a socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathKind {
    /// A regular file.
    RegularFile,
    /// A directory.
    Directory,
    /// A symbolic link (not followed).
    Symlink,
    /// A named pipe.
    Fifo,
    /// A block device.
    BlockDevice,
    /// A character device.
    CharDevice,
}

impl PathKind {
    /// What `t` is, or `None` for a socket.
    fn of(t: std::fs::FileType) -> Option<Self> {
        use std::os::unix::fs::FileTypeExt;
        if t.is_socket() {
            None
        } else if t.is_dir() {
            Some(Self::Directory)
        } else if t.is_symlink() {
            Some(Self::Symlink)
        } else if t.is_fifo() {
            Some(Self::Fifo)
        } else if t.is_block_device() {
            Some(Self::BlockDevice)
        } else if t.is_char_device() {
            Some(Self::CharDevice)
        } else {
            Some(Self::RegularFile)
        }
    }
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::RegularFile => "a regular file",
            Self::Directory => "a directory",
            Self::Symlink => "a symbolic link",
            Self::Fifo => "a named pipe",
            Self::BlockDevice => "a block device",
            Self::CharDevice => "a character device",
        })
    }
}

/// A served QMP socket. Dropping it stops accepting clients and removes the socket file
/// (if the file at the path is still this socket), so the file goes with the side however
/// it ends: a normal end, an error returned, or a panic that unwinds.
#[derive(Debug)]
pub struct QmpSocket {
    path: PathBuf,
    /// Device and inode of the socket file this side created.
    id: (u64, u64),
    /// A handle on the listening socket, to wake the accept thread.
    listener: socket2::Socket,
    state: Shared,
}

impl QmpSocket {
    /// The state the socket serves.
    pub fn state(&self) -> Shared {
        Arc::clone(&self.state)
    }
}

impl Drop for QmpSocket {
    fn drop(&mut self) {
        // Linux wakes a thread blocked in accept(2) on a shut-down listener with EINVAL,
        // which ends the accept loop.
        let _ = self.listener.shutdown(std::net::Shutdown::Both);
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the QMP socket");
                }
            }
            Ok(_) => tracing::warn!(
                path = %self.path.display(),
                "the QMP socket was replaced by another file; leaving that"
            ),
            Err(_) => {}
        }
    }
}

/// Clears the way for a new socket at `path`: nothing there, or a stale socket (which is
/// removed). Anything else is refused and left as it is.
fn clear_stale(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ColoError::file("look at the QMP socket path", path)(e)),
    };
    if let Some(kind) = PathKind::of(meta.file_type()) {
        return Err(ColoError::QmpPathTaken {
            path: path.to_path_buf(),
            kind,
        });
    }
    // A socket that still accepts belongs to a live process; a stale one refuses.
    if UnixStream::connect(path).is_ok() {
        return Err(ColoError::QmpSocketInUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(ColoError::file("remove the stale socket", path))
}

/// Creates a listening Unix socket at `path` with exactly `mode`, never wider meanwhile.
fn listen(path: &Path, mode: u32) -> Result<(UnixListener, socket2::Socket)> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None)
        .map_err(ColoError::file("create the QMP socket", path))?;
    // Linux gives the socket file the socket inode's mode less the umask, so setting the
    // inode's mode first means the file never allows more than `mode`; the chmod after
    // bind then adds back what the umask took.
    // SAFETY: fchmod(2) on a descriptor this function owns; it touches no memory.
    if unsafe { libc::fchmod(sock.as_raw_fd(), mode as libc::mode_t) } != 0 {
        return Err(ColoError::file("set the mode of", path)(
            std::io::Error::last_os_error(),
        ));
    }
    let addr = SockAddr::unix(path).map_err(ColoError::file("bind the QMP socket", path))?;
    sock.bind(&addr)
        .map_err(ColoError::file("bind the QMP socket", path))?;
    let listen = sock
        .listen(16)
        .map_err(ColoError::file("listen on the QMP socket", path))
        .and_then(|()| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(ColoError::file("set the mode of", path))
        })
        .and_then(|()| {
            sock.try_clone()
                .map_err(ColoError::file("duplicate the QMP socket", path))
        });
    match listen {
        Ok(handle) => Ok((UnixListener::from(OwnedFd::from(sock)), handle)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// Listens on `path` with `mode` (replacing a stale socket, refusing anything else) and
/// serves clients on a thread until the returned [`QmpSocket`] is dropped, which removes
/// the socket file.
///
/// # Errors
/// [`ColoError::QmpPathTaken`] if something other than a socket is at `path`,
/// [`ColoError::QmpSocketInUse`] if a live socket is, [`ColoError::File`] if the socket
/// cannot be created, [`ColoError::Spawn`] if its thread cannot start.
pub fn serve(path: &Path, mode: u32, state: Shared) -> Result<QmpSocket> {
    clear_stale(path)?;
    let (l, listener) = listen(path, mode)?;
    let meta = std::fs::symlink_metadata(path).map_err(ColoError::file("stat", path))?;
    let socket = QmpSocket {
        path: path.to_path_buf(),
        id: (meta.dev(), meta.ino()),
        listener,
        state: Arc::clone(&state),
    };
    std::thread::Builder::new()
        .name("qmp".into())
        .spawn(move || {
            for c in l.incoming().map_while(std::result::Result::ok) {
                let s = Arc::clone(&state);
                std::thread::spawn(move || client(c, &s));
            }
        })
        .map_err(ColoError::spawn("QMP"))?;
    Ok(socket)
}

fn client(c: UnixStream, s: &Shared) {
    let Ok(mut w) = c.try_clone() else { return };
    let _ = c.set_read_timeout(Some(Duration::from_secs(3600)));
    let greeting = json!({"QMP": {"version": {"qemu": {"major": 9, "minor": 0, "micro": 0}, "package": "colo"}, "capabilities": []}});
    if w.write_all(format!("{greeting}\r\n").as_bytes()).is_err() {
        return;
    }
    let mut negotiated = false;
    for line in BufReader::new(c).lines().map_while(std::result::Result::ok) {
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(cmd) => handle(&cmd, s, &mut negotiated, &w),
            Err(e) => error("GenericError", &format!("JSON parse error: {e}"), None),
        };
        if w.write_all(format!("{reply}\r\n").as_bytes()).is_err() {
            return;
        }
    }
}

fn error(class: &str, desc: &str, id: Option<&Value>) -> Value {
    let mut v = json!({"error": {"class": class, "desc": desc}});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

fn ok(ret: Value, id: Option<&Value>) -> Value {
    let mut v = json!({"return": ret});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// One command. Public for tests.
pub fn handle(cmd: &Value, s: &Shared, negotiated: &mut bool, events: &UnixStream) -> Value {
    let id = cmd.get("id");
    let Some(name) = cmd.get("execute").and_then(Value::as_str) else {
        return error("GenericError", "expected an object with 'execute'", id);
    };
    let args = cmd.get("arguments").cloned().unwrap_or(json!({}));
    if !*negotiated && name != "qmp_capabilities" {
        return error(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'",
            id,
        );
    }
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    match name {
        "qmp_capabilities" => {
            *negotiated = true;
            if let Ok(c) = events.try_clone() {
                st.events.push(c);
            }
            ok(json!({}), id)
        }
        "query-colo-status" => ok(
            json!({"mode": st.mode, "last-mode": st.last_mode, "reason": st.reason}),
            id,
        ),
        "migrate-set-capabilities" => {
            let Some(caps) = args.get("capabilities").and_then(Value::as_array) else {
                return error("GenericError", "'capabilities' must be a list", id);
            };
            for c in caps {
                match (
                    c.get("capability").and_then(Value::as_str),
                    c.get("state").and_then(Value::as_bool),
                ) {
                    (Some("x-colo"), Some(on)) => st.x_colo = on,
                    (Some(other), Some(_)) => {
                        tracing::debug!(capability = other, "migration capability ignored");
                    }
                    _ => {
                        return error(
                            "GenericError",
                            "each capability needs 'capability' and 'state'",
                            id,
                        );
                    }
                }
            }
            ok(json!({}), id)
        }
        "migrate-set-parameters" => {
            let get = |k: &str| args.get(k).and_then(Value::as_u64);
            if let Some(v) = get("x-checkpoint-delay") {
                if v == 0 || v > 3_600_000 {
                    return error(
                        "GenericError",
                        "x-checkpoint-delay must be 1 to 3600000 ms",
                        id,
                    );
                }
                st.checkpoint_delay_ms = v;
            }
            if let Some(v) = get("x-heartbeat-interval") {
                st.heartbeat_ms.0 = v.max(1);
            }
            if let Some(v) = get("x-heartbeat-timeout") {
                st.heartbeat_ms.1 = v.max(1);
            }
            ok(json!({}), id)
        }
        "migrate" => match args.get("uri").and_then(Value::as_str) {
            Some(u) if u.starts_with("tcp:") => {
                st.migrate_uri = Some(u.trim_start_matches("tcp:").to_string());
                ok(json!({}), id)
            }
            _ => error(
                "GenericError",
                "migrate needs a 'uri' of the form tcp:host:port",
                id,
            ),
        },
        "x-colo-lost-heartbeat" => {
            if st.mode == ColoMode::None {
                return error("GenericError", "VM is not in COLO mode", id);
            }
            st.lost_heartbeat = true;
            ok(json!({}), id)
        }
        other => error(
            "CommandNotFound",
            &format!("The command {other} has not been found"),
            id,
        ),
    }
}

/// `colo status`: asks a running side for `query-colo-status` over its QMP socket.
///
/// # Errors
/// [`ColoError::QmpIo`] if the socket cannot be reached, [`ColoError::QmpJson`] or
/// [`ColoError::QmpAnswer`] if it answers something else.
pub fn status(path: &Path) -> Result<Value> {
    let io = |source| ColoError::QmpIo {
        path: path.to_path_buf(),
        source,
    };
    let answer = |expected, got| ColoError::QmpAnswer {
        path: path.to_path_buf(),
        expected,
        got,
    };
    let s = UnixStream::connect(path).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let mut w = s.try_clone().map_err(io)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut next = |r: &mut BufReader<UnixStream>| -> Result<Value> {
        line.clear();
        r.read_line(&mut line).map_err(io)?;
        serde_json::from_str(&line).map_err(|source| ColoError::QmpJson {
            path: path.to_path_buf(),
            line: line.clone(),
            source,
        })
    };
    let greeting = next(&mut r)?;
    if greeting.get("QMP").is_none() {
        return Err(answer("a QMP greeting", greeting));
    }
    for cmd in ["qmp_capabilities", "query-colo-status"] {
        w.write_all(format!("{}\r\n", json!({"execute": cmd})).as_bytes())
            .map_err(io)?;
        let reply = loop {
            let v = next(&mut r)?;
            if v.get("event").is_none() {
                break v;
            }
        };
        if let Some(e) = reply.get("error") {
            return Err(answer(cmd, e.clone()));
        }
        if cmd == "query-colo-status" {
            return Ok(reply["return"].clone());
        }
    }
    unreachable!("the loop returns on its last command")
}

#[cfg(test)]
mod tests {
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
        assert_eq!(
            status(&path).unwrap(),
            json!({"mode": "primary", "last-mode": "none", "reason": "none"})
        );

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
            send(&mut w, &mut r, json!({"execute": "no-such"}))["error"]["class"]
                == "CommandNotFound"
        );
        let junk = {
            w.write_all(b"{not json\r\n").unwrap();
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            serde_json::from_str::<Value>(&l).unwrap()
        };
        assert_eq!(junk["error"]["class"], "GenericError");
        // The controller leaves COLO: the event reaches the client, the status says so.
        colo_exit(&st, ColoExitReason::Request);
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let ev: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(ev["event"], "COLO_EXIT");
        assert_eq!(ev["data"], json!({"mode": "primary", "reason": "request"}));
        assert_eq!(
            status(&path).unwrap(),
            json!({"mode": "none", "last-mode": "primary", "reason": "request"})
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
}
