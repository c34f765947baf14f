//! A framed control channel over any byte stream (TCP in production).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use colo_auth::{Channel, Credentials, HANDSHAKE_TIMEOUT, Role as AuthRole};

use super::conn::Conn;
use super::frame::{FrameHeader, HEADER_LEN};
use super::handshake::Hello;
use super::message::{DEFAULT_MAX_STATE, Message};
use crate::error::{Error, Result};
use crate::framing::{self, read_full};

/// A control channel: sends and receives [`Message`]s, checks every frame, and runs the
/// handshake.
///
/// After any decoding error the channel is poisoned: further calls return
/// [`Error::Closed`] and the caller drops the connection.
#[derive(Debug)]
pub struct ControlChannel<S> {
    stream: S,
    max_state: u32,
    poisoned: bool,
}

impl ControlChannel<Conn> {
    /// Connects to a listening peer, retrying until `timeout` passes (the peer may still be
    /// starting), and turns Nagle off.
    ///
    /// # Errors
    /// [`Error::Connect`] when the deadline passes without a connection.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self> {
        connect_tcp(addr, timeout).and_then(Self::from_tcp)
    }

    /// Connects like [`connect`](Self::connect) and proves to the listener that this side
    /// (`me`) holds the pair key, checking the listener holds it too, before anything
    /// else crosses the channel.
    ///
    /// # Errors
    /// [`Error::Connect`], or [`Error::Auth`] when the listener is not the pair's peer or
    /// refused this side.
    pub fn connect_authenticated(
        addr: &str,
        timeout: Duration,
        creds: &Credentials,
        me: AuthRole,
    ) -> Result<Self> {
        let mut s = connect_tcp(addr, timeout)?;
        let peer = colo_auth::connect(&mut s, creds, me, Channel::Control, HANDSHAKE_TIMEOUT)?;
        Self::after_handshake(s, creds, &peer)
    }

    /// Waits on `listener` for the peer of `me` to connect and authenticate (at most
    /// `wait`, None: no limit; `stop` ends the wait too). A connection that does not
    /// authenticate within its handshake time is logged with its address and dropped,
    /// and the wait goes on: nothing it sent is acted on.
    ///
    /// # Errors
    /// [`Error::AuthAccept`] when the wait ends without the peer, [`Error::SocketOption`].
    pub fn accept_authenticated(
        listener: &TcpListener,
        creds: &Credentials,
        me: AuthRole,
        wait: Option<Duration>,
        stop: &dyn Fn() -> bool,
    ) -> Result<(Self, SocketAddr)> {
        let (s, addr, peer) = colo_auth::accept_peer(
            listener,
            creds,
            me,
            Channel::Control,
            wait,
            HANDSHAKE_TIMEOUT,
            stop,
        )?;
        tracing::debug!(peer = %addr, "control connection authenticated");
        Ok((Self::after_handshake(s, creds, &peer)?, addr))
    }

    /// The channel over `s` once `peer` authenticated: sealed if `creds` encrypt.
    fn after_handshake(s: TcpStream, creds: &Credentials, peer: &colo_auth::Peer) -> Result<Self> {
        if !creds.encrypts() {
            return Self::from_tcp(s);
        }
        s.set_nodelay(true).map_err(|source| Error::SocketOption {
            option: "TCP_NODELAY",
            source,
        })?;
        let sealed = Conn::sealed(s, peer).map_err(|source| Error::SocketOption {
            option: "dup",
            source,
        })?;
        Ok(Self::new(sealed))
    }

    /// Accepts one peer on `listener`.
    ///
    /// # Errors
    /// [`Error::Accept`] if accept fails.
    pub fn accept(listener: &TcpListener) -> Result<Self> {
        let (s, peer) = listener.accept().map_err(Error::Accept)?;
        tracing::debug!(%peer, "control connection accepted");
        Self::from_tcp(s)
    }

    /// Wraps a connected socket, turning Nagle off (control messages are small and
    /// latency-bound).
    ///
    /// # Errors
    /// [`Error::SocketOption`] if TCP_NODELAY cannot be set.
    pub fn from_tcp(s: TcpStream) -> Result<Self> {
        s.set_nodelay(true).map_err(|source| Error::SocketOption {
            option: "TCP_NODELAY",
            source,
        })?;
        Ok(Self::new(Conn::Plain(s)))
    }

    /// Bounds how long [`recv`](Self::recv) waits for a frame to start (None: forever).
    /// A heartbeat monitor uses it to notice a silent peer.
    ///
    /// # Errors
    /// [`Error::SocketOption`] if the timeout cannot be set.
    pub fn set_recv_timeout(&mut self, t: Option<Duration>) -> Result<()> {
        self.stream
            .set_read_timeout(t)
            .map_err(|source| Error::SocketOption {
                option: "SO_RCVTIMEO",
                source,
            })
    }

    /// A second handle on the same connection, for a thread that only sends (heartbeats).
    ///
    /// # Errors
    /// [`Error::SocketOption`] if the socket cannot be duplicated.
    pub fn try_clone(&self) -> Result<Self> {
        let s = self
            .stream
            .try_clone()
            .map_err(|source| Error::SocketOption {
                option: "dup",
                source,
            })?;
        Ok(Self {
            stream: s,
            max_state: self.max_state,
            poisoned: false,
        })
    }

    /// Closes both directions, waking any thread blocked in `recv`.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Connects to `addr`, retrying until `timeout` passes (the peer may still be starting).
fn connect_tcp(addr: &str, timeout: Duration) -> Result<TcpStream> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match addr.to_socket_addrs().and_then(|mut a| {
            let sa = a
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
            TcpStream::connect_timeout(&sa, Duration::from_secs(1))
        }) {
            Ok(s) => return Ok(s),
            Err(source) if std::time::Instant::now() >= deadline => {
                return Err(Error::Connect {
                    addr: addr.to_string(),
                    source,
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl<S: Read + Write> ControlChannel<S> {
    /// Wraps a stream.
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            max_state: DEFAULT_MAX_STATE,
            poisoned: false,
        }
    }

    /// Sets the largest device state this side accepts in a vmstate-size frame.
    pub fn with_max_state(mut self, max: u32) -> Self {
        self.max_state = max;
        self
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Sends one message.
    ///
    /// # Errors
    /// [`Error::Send`] on a socket error, [`Error::Closed`] after an earlier failure.
    pub fn send(&mut self, msg: &Message) -> Result<()> {
        if self.poisoned {
            return Err(Error::Closed);
        }
        let frame = msg.encode()?;
        self.stream
            .write_all(&frame)
            .and_then(|()| self.stream.flush())
            .map_err(|e| {
                self.poisoned = true;
                Error::Send(e)
            })
    }

    /// Receives and validates one message.
    ///
    /// # Errors
    /// [`framing::Error::PeerClosed`] on a clean end of stream between frames,
    /// [`framing::Error::Truncated`] inside a frame, [`framing::Error::Timeout`] if a
    /// receive timeout is set and no frame starts in time (all as [`Error::Frame`]), and
    /// the frame's decoding error otherwise. Any error but a timeout poisons the channel.
    pub fn recv(&mut self) -> Result<Message> {
        if self.poisoned {
            return Err(Error::Closed);
        }
        let r = self.recv_inner();
        if let Err(e) = &r {
            if !matches!(e, Error::Frame(framing::Error::Timeout)) {
                self.poisoned = true;
            }
        }
        r
    }

    fn recv_inner(&mut self) -> Result<Message> {
        let mut hdr = [0u8; HEADER_LEN];
        read_full(&mut self.stream, &mut hdr, true)?;
        let (kind, arg, len) = FrameHeader::read_from(&hdr)?;
        let max = Message::max_payload(kind, self.max_state);
        if len > max {
            return Err(framing::Error::TooLarge {
                what: "payload length",
                len: len.into(),
                max: max.into(),
            }
            .into());
        }
        let mut payload = vec![0u8; len as usize];
        read_full(&mut self.stream, &mut payload, false)?;
        Message::decode(kind, arg, payload)
    }

    /// Exchanges Hellos with the peer and checks them. On a mismatch this side tells the
    /// peer why (a Reject frame) before returning the error, so both logs say the same.
    ///
    /// # Errors
    /// [`Error::Handshake`] on a mismatch found here, [`Error::Rejected`] when the peer
    /// refused us, [`framing::Error::VersionMismatch`] for a peer of another version, and
    /// [`Error::Protocol`] if the first frame is not a Hello.
    pub fn handshake(&mut self, local: &Hello) -> Result<Hello> {
        self.send(&Message::Hello(local.clone()))?;
        let peer = match self.recv() {
            Ok(Message::Hello(h)) => h,
            Ok(Message::Reject(why)) => return Err(Error::Rejected(why)),
            Ok(other) => {
                let e = Error::Protocol(format!("expected Hello, got {:?}", other.kind()));
                self.reject(&e);
                return Err(e);
            }
            Err(e) => {
                if matches!(
                    e,
                    Error::Frame(
                        framing::Error::VersionMismatch { .. } | framing::Error::BadMagic { .. }
                    ) | Error::Handshake(_)
                ) {
                    self.poisoned = false;
                    self.reject(&e);
                    self.poisoned = true;
                }
                return Err(e);
            }
        };
        if let Err(e) = local.check_peer(&peer) {
            self.reject(&e);
            return Err(e);
        }
        Ok(peer)
    }

    fn reject(&mut self, e: &Error) {
        let _ = self.send(&Message::Reject(e.to_string()));
        self.poisoned = true;
    }
}
