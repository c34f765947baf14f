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

/// Where a side is in its life, beyond QEMU's COLO mode: what a cluster agent needs to
/// decide promotions (`query-colo-status` reports it as `x-colo-phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No peer yet: a secondary waiting for its primary (its disk image untouched by
    /// this run), or a primary waiting for its secondary.
    Waiting,
    /// The peer is connected and the initial sync (or a resync) runs: a secondary's disk
    /// is a partial copy until it ends.
    Syncing,
    /// In COLO: checkpoints run.
    Colo,
    /// Serving without a peer: a primary that lost (or never had) its secondary, or a
    /// secondary that took over.
    Serving,
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
    /// Where the side is (`x-colo-phase`).
    pub phase: Phase,
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
            phase: Phase::Waiting,
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
        st.phase = Phase::Colo;
        st.run_state = RunState::Running;
    }
}

/// Records where the side is (`x-colo-phase`), if a socket is served.
pub fn set_phase(s: Option<&Shared>, phase: Phase) {
    if let Some(s) = s {
        lock(s).phase = phase;
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
    st.phase = Phase::Serving;
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
            json!({"mode": st.mode, "last-mode": st.last_mode, "reason": st.reason,
                   "x-colo-phase": st.phase}),
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

/// Runs QMP commands on the side whose socket is at `path` (after `qmp_capabilities`)
/// and returns each one's `return` value, in order; events that arrive meanwhile are
/// skipped.
///
/// # Errors
/// [`ColoError::QmpIo`] if the socket cannot be reached or read (5 s per answer),
/// [`ColoError::QmpJson`] for an answer that is not JSON, [`ColoError::QmpAnswer`] for
/// a missing greeting or an error answer.
pub fn execute(path: &Path, commands: &[Value]) -> Result<Vec<Value>> {
    let io = |source| ColoError::QmpIo {
        path: path.to_path_buf(),
        source,
    };
    let answer = |expected: &'static str, got| ColoError::QmpAnswer {
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
    let negotiate = json!({"execute": "qmp_capabilities"});
    let mut out = Vec::with_capacity(commands.len());
    for (i, cmd) in std::iter::once(&negotiate).chain(commands).enumerate() {
        w.write_all(format!("{cmd}\r\n").as_bytes()).map_err(io)?;
        let reply = loop {
            let v = next(&mut r)?;
            if v.get("event").is_none() {
                break v;
            }
        };
        if let Some(e) = reply.get("error") {
            return Err(answer("a successful answer", e.clone()));
        }
        if i > 0 {
            out.push(reply["return"].clone());
        }
    }
    Ok(out)
}

/// Asks the side whose socket is at `path` for its COLO status: `query-colo-status`'s
/// answer with `query-status`'s run state added as `status`.
///
/// # Errors
/// As for [`execute`].
pub fn status(path: &Path) -> Result<Value> {
    let mut v = execute(
        path,
        &[
            json!({"execute": "query-status"}),
            json!({"execute": "query-colo-status"}),
        ],
    )?;
    let colo = v.pop().unwrap_or(Value::Null);
    let run = v.pop().unwrap_or(Value::Null);
    let mut colo = colo;
    if let Some(o) = colo.as_object_mut() {
        o.insert("status".into(), run["status"].clone());
    }
    Ok(colo)
}

/// `status` as `KEY=value` lines for shell scripts (the cluster agent): `mode`,
/// `last_mode`, `reason`, `phase` and `status` (QEMU's run state), each a single word.
pub fn status_lines(v: &Value) -> String {
    [
        ("mode", "mode"),
        ("last_mode", "last-mode"),
        ("reason", "reason"),
        ("phase", "x-colo-phase"),
        ("status", "status"),
    ]
    .iter()
    .map(|(k, field)| format!("{k}={}\n", v[*field].as_str().unwrap_or("unknown")))
    .collect()
}

#[cfg(test)]
#[path = "qmp_tests.rs"]
mod tests;
