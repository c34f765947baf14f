//! A QMP-compatible control socket (a Unix socket, mode 0600 unless `--qmp-mode` says
//! otherwise), so that tooling written for QEMU's COLO (and QEMU's own Python `qemu.qmp`
//! client) needs only the socket path changed. The socket replaces only a stale socket at
//! its path, and is removed when the side ends.
//!
//! Like QEMU's, the socket reads a JSON stream, not lines: each complete object is
//! answered as soon as its last byte arrives, whatever whitespace (or none) separates it
//! from the next. One object may be at most [`MAX_OBJECT`] bytes (counted from the end of
//! the previous one). Input that is not JSON, or an object over the limit, gets a
//! `GenericError` reply and then the connection is closed: a JSON stream cannot be
//! resynchronized reliably after a syntax error, so the client reconnects.
//!
//! Commands (also listed by `query-commands`):
//! - `qmp_capabilities`; `query-commands`; `query-version` (QEMU 9.0.0's dialect, with
//!   `package` naming colo's version);
//! - `query-status` (QEMU's `StatusInfo`: `prelaunch` before the primary's VM first runs,
//!   `inmigrate` on a secondary before its first checkpoint, then `running`, `paused` or
//!   `shutdown`);
//! - `query-colo-status`, `migrate-set-capabilities` (the `x-colo` capability),
//!   `migrate-set-parameters` (`x-checkpoint-delay`, `x-heartbeat-interval`,
//!   `x-heartbeat-timeout`, in ms), `migrate` (records the secondary's `tcp:host:port`
//!   URI for a primary started without `--peer`), `x-colo-lost-heartbeat`;
//! - `stop` and `cont`, only once this side serves alone (COLO ended): while COLO runs,
//!   the checkpoints pause and resume the guest themselves, and a guest held paused by
//!   hand would stall them, so both are refused with a `GenericError` then. The side
//!   applies them in its loop; the reply comes once it has (within 3 s);
//! - `quit`: answers, then the side ends as on SIGTERM (a primary in COLO says goodbye to
//!   its secondary first) and logs "stopped by QMP quit".
//!
//! Events: `COLO_EXIT` (`mode`, `reason`), `STOP` and `RESUME` (for `stop`/`cont`), and
//! `SHUTDOWN` (`guest`, `reason`) when the side ends its VM.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use colo_machine::runner::VmHandle;

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
    /// What the VM is doing, as `query-status` reports it. The side sets it where it
    /// starts or stops the VM.
    pub run_state: RunState,
    /// A `stop` or `cont` not yet applied by the side ([`apply_run_request`]).
    run_request: Option<RunRequest>,
    /// How many `stop`/`cont` requests the side has taken up.
    run_requests_taken: u64,
    /// Set once a `quit` was answered; the side's stop condition reads it.
    quit: Arc<AtomicBool>,
    events: Vec<UnixStream>,
}

/// QEMU's `RunState`, the values colo's sides can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum RunState {
    /// The VM has not run yet (a primary waiting for its secondary).
    Prelaunch,
    /// A secondary waiting for its first checkpoint.
    InMigrate,
    /// The guest runs.
    Running,
    /// The guest is paused (by `stop`, or a fenced secondary).
    Paused,
    /// The VM has ended.
    Shutdown,
}

/// A `stop` or `cont` carried from the socket to the side's loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunRequest {
    Stop,
    Cont,
}

/// QEMU's `ShutdownCause`, as the `SHUTDOWN` event says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ShutdownCause {
    /// The side ended for another reason (its `--duration`, its primary leaving).
    None,
    /// A QMP `quit`.
    HostQmpQuit,
    /// SIGINT or SIGTERM.
    HostSignal,
    /// The guest powered off or exited.
    GuestShutdown,
    /// The guest reset the machine.
    GuestReset,
}

impl ShutdownCause {
    fn by_guest(self) -> bool {
        matches!(self, Self::GuestShutdown | Self::GuestReset)
    }
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
            run_state: match side {
                Side::Primary => RunState::Prelaunch,
                Side::Secondary => RunState::InMigrate,
            },
            run_request: None,
            run_requests_taken: 0,
            quit: Arc::new(AtomicBool::new(false)),
            events: Vec::new(),
        }))
    }

    /// The flag a `quit` sets (after its reply is written), for the side's stop condition.
    pub fn quit_flag(s: &Shared) -> Arc<AtomicBool> {
        Arc::clone(&lock(s).quit)
    }

    /// Sends `event` with `data` to every client that negotiated, dropping those that are
    /// gone.
    fn emit(&mut self, event: &str, data: Value) {
        let ev = json!({"event": event, "data": data, "timestamp": timestamp()});
        let line = format!("{ev}\r\n");
        self.events
            .retain_mut(|c| c.write_all(line.as_bytes()).is_ok());
    }
}

fn lock(s: &Shared) -> MutexGuard<'_, QmpState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records what the VM does now (for `query-status`), without an event.
pub fn set_run_state(s: &Shared, state: RunState) {
    lock(s).run_state = state;
}

/// Records whether the guest runs (for `query-status`), if a socket is served. A
/// secondary calls it after each checkpoint: its SVM runs in COLO mode and waits paused in
/// periodic mode.
pub fn set_running(s: Option<&Shared>, running: bool) {
    if let Some(s) = s {
        set_run_state(
            s,
            if running {
                RunState::Running
            } else {
                RunState::Paused
            },
        );
    }
}

/// Records that this side is in COLO again (a primary that re-protected), if a socket is
/// served. Its checkpoints resume the guest, so it runs.
pub fn colo_entered(s: Option<&Shared>, side: Side) {
    if let Some(s) = s {
        let mut st = lock(s);
        st.mode = side.into();
        st.run_state = RunState::Running;
    }
}

/// Records that the side ended its VM and sends `SHUTDOWN` to every client.
pub fn shutdown(s: &Shared, cause: ShutdownCause) {
    let mut st = lock(s);
    st.run_state = RunState::Shutdown;
    st.emit(
        "SHUTDOWN",
        json!({"guest": cause.by_guest(), "reason": cause}),
    );
}

/// Applies a pending `stop` or `cont` to `vm`, with its `STOP` or `RESUME` event, if a
/// socket is served. A side calls it from its loop only while it serves alone (out of
/// COLO); `stop` and `cont` are refused at the socket otherwise.
pub fn apply_run_request(s: Option<&Shared>, vm: &VmHandle) {
    let Some(s) = s else { return };
    let Some(req) = take_run_request(s) else {
        return;
    };
    // Pausing waits for the vCPUs to park: not under the lock.
    let done = match req {
        RunRequest::Stop => match vm.pause() {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "QMP stop: the guest did not pause");
                false
            }
        },
        RunRequest::Cont => {
            vm.resume();
            true
        }
    };
    run_request_done(s, req, done);
}

/// Takes the pending `stop` or `cont`, if any.
fn take_run_request(s: &Shared) -> Option<RunRequest> {
    lock(s).run_request.take()
}

/// Records that `req` was taken up, and whether it was applied (then with its event).
fn run_request_done(s: &Shared, req: RunRequest, applied: bool) {
    let mut st = lock(s);
    st.run_requests_taken += 1;
    if !applied {
        return;
    }
    tracing::info!(request = ?req, "QMP run request applied");
    let (state, event) = match req {
        RunRequest::Stop => (RunState::Paused, "STOP"),
        RunRequest::Cont => (RunState::Running, "RESUME"),
    };
    if st.run_state != state {
        st.run_state = state;
        st.emit(event, json!({}));
    }
}

/// Records that this side left COLO and sends `COLO_EXIT` to every client.
pub fn colo_exit(s: &Shared, reason: ColoExitReason) {
    let mut st = lock(s);
    st.last_mode = st.mode;
    st.reason = reason;
    let data = json!({"mode": st.mode, "reason": reason});
    st.mode = ColoMode::None;
    st.emit("COLO_EXIT", data);
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

/// The most bytes one QMP object may take, counted from the end of the previous object
/// (so whitespace before it counts too).
pub const MAX_OBJECT: u64 = 1 << 20;

/// How long `stop` and `cont` wait for the side to apply them.
const RUN_REQUEST_WAIT: Duration = Duration::from_secs(3);

/// The commands this socket serves, as `query-commands` lists them.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-status",
    "query-colo-status",
    "migrate-set-capabilities",
    "migrate-set-parameters",
    "migrate",
    "x-colo-lost-heartbeat",
    "stop",
    "cont",
    "quit",
];

/// A reader that fails once more than [`MAX_OBJECT`] bytes were read since the count was
/// last reset (after each complete object), and says so in `over`.
struct Bounded<R> {
    inner: R,
    /// Bytes read since the last reset; shared with the loop that resets it.
    count: Rc<Cell<u64>>,
    over: Rc<Cell<bool>>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let room = MAX_OBJECT.saturating_sub(self.count.get());
        if room == 0 {
            self.over.set(true);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "QMP object over the size limit",
            ));
        }
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// One client's session state.
struct Session {
    negotiated: bool,
    /// A clone of the client's stream, registered for events at negotiation.
    events: UnixStream,
    /// A `quit` was answered: the side is to stop once the reply is written.
    quit: bool,
}

fn client(c: UnixStream, s: &Shared) {
    let Ok(mut w) = c.try_clone() else { return };
    let Ok(events) = c.try_clone() else { return };
    let _ = c.set_read_timeout(Some(Duration::from_secs(3600)));
    let greeting = json!({"QMP": {"version": version(), "capabilities": []}});
    if w.write_all(format!("{greeting}\r\n").as_bytes()).is_err() {
        return;
    }
    let mut session = Session {
        negotiated: false,
        events,
        quit: false,
    };
    let count = Rc::new(Cell::new(0));
    let over = Rc::new(Cell::new(false));
    let reader = Bounded {
        inner: BufReader::new(c),
        count: Rc::clone(&count),
        over: Rc::clone(&over),
    };
    // serde_json reads the stream a byte at a time (buffered below the bound), and
    // returns each value as soon as its closing byte is read.
    let stream = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    for item in stream {
        let (reply, last) = match item {
            Ok(cmd) => {
                count.set(0);
                (handle(&cmd, s, &mut session), false)
            }
            Err(_) if over.get() => (
                error(
                    "GenericError",
                    &format!("JSON parse error, object larger than {MAX_OBJECT} bytes"),
                    None,
                ),
                true,
            ),
            // The client went away (mid-object or not): nobody to answer.
            Err(e) if e.is_eof() || e.is_io() => return,
            Err(e) => (
                error("GenericError", &format!("JSON parse error, {e}"), None),
                true,
            ),
        };
        if w.write_all(format!("{reply}\r\n").as_bytes()).is_err() {
            return;
        }
        if std::mem::take(&mut session.quit) {
            lock(s).quit.store(true, Ordering::SeqCst);
        }
        if last {
            // After a syntax error the stream cannot be resynchronized: the client
            // reconnects.
            let _ = w.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

/// The version this socket reports: QEMU 9.0.0's dialect, served by this colo.
fn version() -> Value {
    json!({
        "qemu": {"major": 9, "minor": 0, "micro": 0},
        "package": format!("colo {}", env!("CARGO_PKG_VERSION")),
    })
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

/// `stop` or `cont`: refused in COLO or before the VM runs; otherwise handed to the
/// side's loop, answered once it has been applied.
fn run_request(s: &Shared, req: RunRequest, id: Option<&Value>) -> Value {
    let name = match req {
        RunRequest::Stop => "stop",
        RunRequest::Cont => "cont",
    };
    let (want, taken) = {
        let mut st = lock(s);
        if st.mode != ColoMode::None {
            return error(
                "GenericError",
                &format!(
                    "{name} is refused while COLO protects the guest: the checkpoints pause \
                     and resume it themselves (leave COLO first, e.g. x-colo-lost-heartbeat)"
                ),
                id,
            );
        }
        let want = match req {
            RunRequest::Stop => RunState::Paused,
            RunRequest::Cont => RunState::Running,
        };
        match st.run_state {
            RunState::Running | RunState::Paused => {}
            other => {
                return error(
                    "GenericError",
                    &format!(
                        "{name} needs a guest that runs or is paused; it is {}",
                        json!(other).as_str().unwrap_or("neither")
                    ),
                    id,
                );
            }
        }
        if st.run_state == want {
            // As QEMU: stopping a stopped guest (or continuing a running one) is no error.
            return ok(json!({}), id);
        }
        st.run_request = Some(req);
        (want, st.run_requests_taken)
    };
    let deadline = Instant::now() + RUN_REQUEST_WAIT;
    loop {
        {
            let st = lock(s);
            if st.run_requests_taken != taken {
                return if st.run_state == want {
                    ok(json!({}), id)
                } else {
                    error(
                        "GenericError",
                        &format!("{name} failed (see the side's log)"),
                        id,
                    )
                };
            }
        }
        if Instant::now() >= deadline {
            let mut st = lock(s);
            if st.run_request == Some(req) {
                st.run_request = None;
            }
            return error(
                "GenericError",
                &format!(
                    "{name}: the side did not apply it within {} s",
                    RUN_REQUEST_WAIT.as_secs()
                ),
                id,
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One command.
fn handle(cmd: &Value, s: &Shared, session: &mut Session) -> Value {
    let id = cmd.get("id");
    if !cmd.is_object() {
        return error("GenericError", "QMP input must be a JSON object", None);
    }
    let Some(name) = cmd.get("execute").and_then(Value::as_str) else {
        return error("GenericError", "expected an object with 'execute'", id);
    };
    let args = cmd.get("arguments").cloned().unwrap_or(json!({}));
    if !session.negotiated && name != "qmp_capabilities" {
        return error(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'",
            id,
        );
    }
    match name {
        "stop" => return run_request(s, RunRequest::Stop, id),
        "cont" => return run_request(s, RunRequest::Cont, id),
        "quit" => {
            session.quit = true;
            return ok(json!({}), id);
        }
        "query-commands" => {
            let list: Vec<Value> = COMMANDS.iter().map(|c| json!({"name": c})).collect();
            return ok(Value::Array(list), id);
        }
        "query-version" => return ok(version(), id),
        _ => {}
    }
    let mut st = lock(s);
    match name {
        "qmp_capabilities" => {
            if session.negotiated {
                return error(
                    "CommandNotFound",
                    "Capabilities negotiation is already complete, command ignored",
                    id,
                );
            }
            session.negotiated = true;
            if let Ok(c) = session.events.try_clone() {
                st.events.push(c);
            }
            ok(json!({}), id)
        }
        "query-status" => ok(
            json!({
                "running": st.run_state == RunState::Running,
                "singlestep": false,
                "status": st.run_state,
            }),
            id,
        ),
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
            json!({"mode": "none", "last-mode": "primary", "reason": "request"})
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
}
