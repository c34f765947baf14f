//! A QMP-compatible control socket (a Unix socket with mode 0600), so that tooling written
//! for QEMU's COLO needs only the socket path changed.
//!
//! Supported: `qmp_capabilities`, `query-colo-status`, `migrate-set-capabilities` (the
//! `x-colo` capability), `migrate-set-parameters` (`x-checkpoint-delay`,
//! `x-heartbeat-interval`, `x-heartbeat-timeout`, in ms), `migrate` (records the
//! secondary's `tcp:host:port` URI for a primary started without `--peer`),
//! `x-colo-lost-heartbeat`, and the `COLO_EXIT` event (`mode`, `reason`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
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

/// Listens on `path` (replacing a stale socket) with mode 0600 and serves clients on a
/// thread.
///
/// # Errors
/// [`ColoError::File`] if the socket cannot be created, [`ColoError::Spawn`] if its
/// thread cannot start.
pub fn serve(path: &Path, state: Shared) -> Result<PathBuf> {
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).map_err(ColoError::file("remove the stale socket", path))?;
    }
    let l = UnixListener::bind(path).map_err(ColoError::file("bind the QMP socket", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(ColoError::file("set the mode of", path))?;
    std::thread::Builder::new()
        .name("qmp".into())
        .spawn(move || {
            for c in l.incoming().map_while(std::result::Result::ok) {
                let s = Arc::clone(&state);
                std::thread::spawn(move || client(c, &s));
            }
        })
        .map_err(ColoError::spawn("QMP"))?;
    Ok(path.to_path_buf())
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
        let dir = std::env::temp_dir().join(format!("colo-qmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let st = QmpState::new(Side::Primary, 100, (100, 1000));
        serve(&path, Arc::clone(&st)).unwrap();
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
        let _ = std::fs::remove_dir_all(&dir);
    }
}
