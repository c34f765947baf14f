//! The connection under a control channel: a TCP socket, or (`--encrypt`) the same socket
//! with every byte sealed by the pair's session keys ([`colo_auth::seal`]).
//!
//! A control channel has one reader thread and writers that share one handle behind a
//! lock (the heartbeat and the controller), on clones of the connection. A sealed
//! connection's two directions are one [`OpenReader`] and one [`SealWriter`], each held
//! once behind its own lock that every clone shares: the reader never waits for a writer,
//! and each direction's record counter exists once.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use colo_auth::Peer;
use colo_auth::seal::{OpenReader, SealWriter, Sealed, SessionKeys};

/// A control connection.
#[derive(Debug)]
pub enum Conn {
    /// In the clear (authenticated at the start).
    Plain(TcpStream),
    /// Sealed.
    Sealed {
        /// The socket, for its options and shutdown.
        raw: TcpStream,
        /// Opens what the peer sent.
        reader: Arc<Mutex<OpenReader<TcpStream>>>,
        /// Seals what this side sends.
        writer: Arc<Mutex<SealWriter<TcpStream>>>,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Conn {
    /// Seals `s` with the keys of the session that authenticated `peer`.
    ///
    /// # Errors
    /// The socket cannot be duplicated.
    pub fn sealed(s: TcpStream, peer: &Peer) -> io::Result<Self> {
        let raw = s.try_clone()?;
        let writer = s.try_clone()?;
        let (reader, writer) = Sealed::new(s, SessionKeys::from_peer(peer)).into_split(writer)?;
        Ok(Self::Sealed {
            raw,
            reader: Arc::new(Mutex::new(reader)),
            writer: Arc::new(Mutex::new(writer)),
        })
    }

    /// The socket.
    pub fn socket(&self) -> &TcpStream {
        match self {
            Self::Plain(s) | Self::Sealed { raw: s, .. } => s,
        }
    }

    /// A second handle on the same connection (see the module doc).
    ///
    /// # Errors
    /// The socket cannot be duplicated.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Plain(s) => Self::Plain(s.try_clone()?),
            Self::Sealed {
                raw,
                reader,
                writer,
            } => Self::Sealed {
                raw: raw.try_clone()?,
                reader: Arc::clone(reader),
                writer: Arc::clone(writer),
            },
        })
    }

    /// Bounds how long a read waits (the socket's option: every clone's reads).
    ///
    /// # Errors
    /// The OS error.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket().set_read_timeout(t)
    }

    /// Sets TCP_NODELAY.
    ///
    /// # Errors
    /// The OS error.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.socket().set_nodelay(on)
    }

    /// Closes both directions, waking any thread blocked in a read.
    ///
    /// # Errors
    /// The OS error.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.socket().shutdown(how)
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Sealed { reader, .. } => lock(reader).read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Sealed { writer, .. } => lock(writer).write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.write_all(buf),
            // One frame, one record: the whole frame goes out under one lock.
            Self::Sealed { writer, .. } => lock(writer).write_gather(&[buf]),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Sealed { writer, .. } => lock(writer).flush(),
        }
    }
}
