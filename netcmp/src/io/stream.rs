//! Length-prefixed frames over a Unix or TCP stream socket (see [`crate::framing`]).
//!
//! A connecting port connects once (retrying for a few seconds while the peer starts) and
//! closes for good when the peer leaves. A listening port serves one peer at a time and
//! accepts the next one when it leaves (its reader says [`Recv::Disconnected`] in
//! between); frames for it while nobody is connected are dropped and counted.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{FrameReader, FrameWriter, Port, Recv, Sent};
use crate::error::{Error, Result};
use crate::framing::{self, Decoder, MAX_FRAME};

/// How long a connecting port keeps trying.
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);
/// How long a write may block before the peer is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A connected stream socket of either family.
#[derive(Debug)]
enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    fn setup(&self, read_timeout: Duration) -> io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(read_timeout))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
            Self::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(read_timeout))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
        }
    }

    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        let t = Some(t.max(Duration::from_millis(1)));
        match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket of either family.
#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Accepts a peer if one is waiting (the listener is non-blocking).
    fn try_accept(&self) -> io::Result<Option<Sock>> {
        let r = match self {
            Self::Tcp(l) => l.accept().map(|(s, _)| Sock::Tcp(s)),
            Self::Unix(l, _) => l.accept().map(|(s, _)| Sock::Unix(s)),
        };
        match r {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The connection both halves of a port use: the reader installs it, the writer writes
/// to it.
type Slot = Arc<Mutex<Option<Sock>>>;

struct StreamReader {
    label: String,
    listener: Option<Listener>,
    conn: Option<Sock>,
    slot: Slot,
    dec: Decoder,
    buf: Vec<u8>,
}

impl StreamReader {
    fn drop_conn(&mut self, why: &str) {
        if let Some(c) = self.conn.take() {
            c.shutdown();
            warn!(port = %self.label, why, "peer connection closed");
        }
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.dec.reset();
    }

    fn install(&mut self, sock: Sock, timeout: Duration) -> Result<()> {
        let err = |source| Error::Read {
            port: "stream",
            source,
        };
        sock.setup(timeout).map_err(err)?;
        let writer = sock.try_clone().map_err(err)?;
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(writer);
        self.conn = Some(sock);
        self.dec.reset();
        Ok(())
    }
}

impl FrameReader for StreamReader {
    fn recv(&mut self, timeout: Duration) -> Result<Recv> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) => return Ok(Recv::Frame(f)),
                Ok(None) => {}
                Err(e) => {
                    warn!(port = %self.label, error = %e, "stream out of step");
                    self.drop_conn("bad frame length");
                    if self.listener.is_none() {
                        return Err(e);
                    }
                    return Ok(Recv::Disconnected);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Recv::Idle);
            }
            let Some(conn) = self.conn.as_mut() else {
                let Some(l) = &self.listener else {
                    return Ok(Recv::Closed);
                };
                match l.try_accept() {
                    Ok(Some(s)) => {
                        info!(port = %self.label, "peer connected");
                        self.install(s, timeout)?;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5).min(deadline - now)),
                    Err(source) => {
                        return Err(Error::Read {
                            port: "stream",
                            source,
                        });
                    }
                }
                continue;
            };
            let _ = conn.set_read_timeout(deadline - now);
            match conn.read(&mut self.buf) {
                Ok(0) => {
                    self.drop_conn("end of stream");
                    if self.listener.is_none() {
                        return Ok(Recv::Closed);
                    }
                    return Ok(Recv::Disconnected);
                }
                Ok(n) => self.dec.feed(&self.buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    warn!(port = %self.label, error = %e, "read failed");
                    self.drop_conn("read error");
                    if self.listener.is_none() {
                        return Ok(Recv::Closed);
                    }
                    return Ok(Recv::Disconnected);
                }
            }
        }
    }
}

struct StreamWriter {
    slot: Slot,
    buf: Vec<u8>,
}

impl FrameWriter for StreamWriter {
    fn send(&mut self, frame: &[u8]) -> Result<Sent> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(sock) = slot.as_mut() else {
            return Ok(Sent::Dropped);
        };
        self.buf.clear();
        framing::encode(frame, &mut self.buf)?;
        if let Err(source) = sock.write_all(&self.buf) {
            // The reader notices the dead connection too; stop writing to it now.
            sock.shutdown();
            *slot = None;
            return Err(Error::Write {
                port: "stream",
                source,
            });
        }
        Ok(Sent::Written)
    }
}

fn make_port(label: String, listener: Option<Listener>, conn: Option<Sock>) -> Result<Port> {
    let slot: Slot = Arc::new(Mutex::new(None));
    let mut reader = StreamReader {
        label: label.clone(),
        listener,
        conn: None,
        slot: Arc::clone(&slot),
        dec: Decoder::new(MAX_FRAME),
        buf: vec![0; 256 * 1024],
    };
    if let Some(c) = conn {
        reader.install(c, Duration::from_millis(100))?;
    }
    Ok(Port::new(
        label,
        Box::new(reader),
        Box::new(StreamWriter {
            slot,
            buf: Vec::new(),
        }),
    ))
}

/// Retries `f` until it succeeds or [`CONNECT_PATIENCE`] runs out.
fn with_patience<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let until = Instant::now() + CONNECT_PATIENCE;
    loop {
        match f() {
            Ok(t) => return Ok(t),
            Err(e) if Instant::now() >= until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A port that connects to the Unix socket at `path`.
///
/// # Errors
/// [`Error::Connect`] when nobody listens there within a few seconds.
pub fn connect_unix(path: &Path) -> Result<Port> {
    let s = with_patience(|| UnixStream::connect(path)).map_err(|source| Error::Connect {
        addr: path.display().to_string(),
        source,
    })?;
    make_port(
        format!("unix:{}", path.display()),
        None,
        Some(Sock::Unix(s)),
    )
}

/// A port that listens on the Unix socket at `path` (a stale socket file there is
/// replaced; the file is removed when the port closes).
///
/// # Errors
/// [`Error::Bind`] when the path cannot be bound.
pub fn listen_unix(path: &Path) -> Result<Port> {
    let err = |source| Error::Bind {
        addr: path.display().to_string(),
        source,
    };
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path).map_err(err)?;
    }
    let l = UnixListener::bind(path).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    make_port(
        format!("unix-listen:{}", path.display()),
        Some(Listener::Unix(l, path.to_path_buf())),
        None,
    )
}

/// A port that connects to the TCP address `addr` (`host:port`).
///
/// # Errors
/// [`Error::Connect`] when nobody listens there within a few seconds.
pub fn connect_tcp(addr: &str) -> Result<Port> {
    let s = with_patience(|| TcpStream::connect(addr)).map_err(|source| Error::Connect {
        addr: addr.into(),
        source,
    })?;
    make_port(format!("tcp:{addr}"), None, Some(Sock::Tcp(s)))
}

/// A port that listens on the TCP address `addr` (`host:port`).
///
/// # Errors
/// [`Error::Bind`] when the address cannot be bound.
pub fn listen_tcp(addr: &str) -> Result<Port> {
    let (l, _) = bind_tcp(addr)?;
    make_port(format!("tcp-listen:{addr}"), Some(Listener::Tcp(l)), None)
}

/// Binds a non-blocking TCP listener; returns it and its port.
fn bind_tcp(addr: &str) -> Result<(TcpListener, u16)> {
    let err = |source| Error::Bind {
        addr: addr.into(),
        source,
    };
    let l = TcpListener::bind(addr).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    let port = l.local_addr().map_err(err)?.port();
    Ok((l, port))
}

/// A port listening on a TCP address (`host:0` picks a free port), and the port number it
/// got: for tests and for callers that hand the address to a VM afterwards.
///
/// # Errors
/// [`Error::Bind`] when the address cannot be bound.
pub fn listen_tcp_any(addr: &str) -> Result<(Port, u16)> {
    let (l, port) = bind_tcp(addr)?;
    let p = make_port(format!("tcp-listen:{addr}"), Some(Listener::Tcp(l)), None)?;
    Ok((p, port))
}
