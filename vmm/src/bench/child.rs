//! The benchmark's handle on its receiver process: starting it, the control channel to it,
//! its request and reply lines, and making sure it is gone when the benchmark ends.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use colo_transport::control::{Conn, ControlChannel, Hello, Message};
use colo_transport::push::RegionDesc;

use super::error::{Error, Result};
use super::protocol::{Reply, Request};
use super::sock;

/// How long the receiver may take to start, map its region and connect.
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest wait for one reply (a checksum of a whole region in a debug build included).
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// How long the receiver has to exit once told to, before it is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A running receiver process.
#[derive(Debug)]
pub struct ReceiverProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<std::io::Result<String>>,
    listener: Option<TcpListener>,
    ctrl: Option<ControlChannel<Conn>>,
    reaped: bool,
}

impl ReceiverProcess {
    /// Starts this executable as the receiver of a `size`-byte region. Its control
    /// connection is accepted later, by [`connect`](Self::connect), so that both processes
    /// pre-fault their memory at the same time.
    ///
    /// `corrupt` makes it damage every epoch before checking it (a test of the mismatch
    /// path); `ofi` is the libfabric provider of its `push-ofi` sessions.
    ///
    /// # Errors
    /// [`Error::Io`] if no control listener can be bound, [`Error::Spawn`] if the process
    /// cannot start.
    pub fn spawn(size: u64, pair_id: u64, corrupt: bool, ofi: Option<&str>) -> Result<Self> {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(Error::io("binding the control listener"))?;
        let addr = listener
            .local_addr()
            .map_err(Error::io("binding the control listener"))?;
        let exe = std::env::current_exe().map_err(|source| Error::Spawn {
            exe: "(current executable)".into(),
            source,
        })?;
        let mut child = Command::new(&exe)
            .args(["bench", "transport-receiver", "--control"])
            .arg(addr.to_string())
            .arg("--size")
            .arg(size.to_string())
            .arg("--pair-id")
            .arg(pair_id.to_string())
            .args(corrupt.then_some("--corrupt-for-test"))
            .args(ofi.map(|p| format!("--ofi-provider={p}")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| Error::Spawn {
                exe: exe.display().to_string(),
                source,
            })?;
        tracing::debug!(pid = child.id(), %addr, "receiver process started");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("receiver-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            })
            .map_err(Error::io("starting the reply reader"))?;
        Ok(Self {
            child,
            stdin,
            lines,
            listener: Some(listener),
            ctrl: None,
            reaped: false,
        })
    }

    /// Accepts the receiver's control connection and runs the handshake as `local`.
    ///
    /// # Errors
    /// [`Error::Child`] if the receiver exits or does not connect in time, or the
    /// handshake's error.
    pub fn connect(&mut self, local: &Hello) -> Result<Hello> {
        let listener = self
            .listener
            .take()
            .ok_or_else(|| Error::Control("already connected".into()))?;
        let child = &mut self.child;
        let s = sock::accept_within(&listener, START_TIMEOUT, || match child.try_wait() {
            Ok(Some(status)) => Err(std::io::Error::other(format!(
                "the receiver exited ({status}) before connecting"
            ))),
            _ => Ok(()),
        })
        .map_err(Error::io("accepting the receiver's control connection"))?;
        let mut ctrl =
            ControlChannel::from_tcp(s).map_err(Error::transport("opening the control channel"))?;
        let peer = ctrl
            .handshake(local)
            .map_err(Error::transport("the control handshake"))?;
        ctrl.set_recv_timeout(Some(START_TIMEOUT))
            .map_err(Error::transport("setting the control timeout"))?;
        self.ctrl = Some(ctrl);
        Ok(peer)
    }

    /// Sends a request line.
    ///
    /// # Errors
    /// [`Error::Child`] if the receiver no longer reads its stdin.
    pub fn request(&mut self, r: Request) -> Result<()> {
        let line = r.to_line();
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Error::Child("stdin already closed".into()))?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|e| self.gone(&format!("cannot send {line:?}: {e}")))
    }

    /// Waits for the next reply line.
    ///
    /// # Errors
    /// [`Error::Child`] if the receiver exits, stays silent, or says something that is not
    /// a reply.
    pub fn reply(&mut self) -> Result<Reply> {
        match self.lines.recv_timeout(REPLY_TIMEOUT) {
            Ok(Ok(line)) => {
                Reply::parse(&line).ok_or_else(|| Error::Child(format!("unexpected line {line:?}")))
            }
            Ok(Err(e)) => Err(self.gone(&format!("cannot read its stdout: {e}"))),
            Err(RecvTimeoutError::Timeout) => {
                Err(Error::Child(format!("no reply within {REPLY_TIMEOUT:?}")))
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.gone("its stdout closed")),
        }
    }

    /// Waits for the receiver to announce a push region over the control channel.
    ///
    /// # Errors
    /// [`Error::Control`] for another message, or the channel's error.
    pub fn region(&mut self) -> Result<RegionDesc> {
        let ctrl = self
            .ctrl
            .as_mut()
            .ok_or_else(|| Error::Control("not connected".into()))?;
        match ctrl
            .recv()
            .map_err(Error::transport("waiting for the push region"))?
        {
            Message::Region(desc) => Ok(desc),
            other => Err(Error::Control(format!(
                "expected Region, got {:?}",
                other.kind()
            ))),
        }
    }

    /// Says goodbye on the control channel, asks the receiver to quit, and waits for it.
    ///
    /// # Errors
    /// [`Error::Child`] if it does not exit cleanly.
    pub fn finish(mut self) -> Result<()> {
        if let Some(mut ctrl) = self.ctrl.take() {
            // The receiver may already be leaving; its exit status tells.
            let _ = ctrl.send(&Message::Goodbye);
        }
        let _ = self.request(Request::Quit);
        self.stdin = None;
        match self.wait()? {
            s if s.success() => Ok(()),
            s => Err(Error::Child(format!("exited with {s}"))),
        }
    }

    /// An error saying the receiver is gone, with its exit status if it has one.
    fn gone(&mut self, what: &str) -> Error {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => {
                self.reaped = true;
                format!(" (it exited with {s})")
            }
            _ => String::new(),
        };
        Error::Child(format!("{what}{status}"))
    }

    /// Waits for the exit, killing the process if it does not exit in time.
    fn wait(&mut self) -> Result<ExitStatus> {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    self.reaped = true;
                    return Ok(s);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(None) => {
                    tracing::warn!(pid = self.child.id(), "receiver did not exit; killing it");
                    let _ = self.child.kill();
                    let s = self
                        .child
                        .wait()
                        .map_err(Error::io("reaping the receiver"))?;
                    self.reaped = true;
                    return Ok(s);
                }
                Err(e) => return Err(Error::io("waiting for the receiver")(e)),
            }
        }
    }
}

impl Drop for ReceiverProcess {
    /// On an early exit of the benchmark: closing the control channel and stdin makes the
    /// receiver exit; it is killed if it does not.
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        self.ctrl = None;
        self.stdin = None;
        let _ = self.wait();
    }
}
