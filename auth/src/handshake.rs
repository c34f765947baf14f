//! The handshake every colo connection runs before anything else crosses it.
//!
//! ```text
//! connector (client)                                  listener (server)
//!   Hello_c = magic, version, role, channel, flags, index, pair id, nonce_c  ->
//!                       <-  Hello_s (same fields, nonce_s), mac_s
//!   mac_c                                                                    ->
//!                       <-  verdict (0: accepted)
//!
//! mac_s = HMAC-SHA256(key, "colo-auth v1 server" | Hello_c | Hello_s)
//! mac_c = HMAC-SHA256(key, "colo-auth v1 client" | Hello_c | Hello_s | mac_s)
//! ```
//!
//! Both nonces are 32 fresh random bytes, so a recorded handshake replayed to either side
//! fails its MAC; the labels keep a side's own MAC from being reflected back to it; the
//! roles, the channel and the pair id are inside both MACs, so a connection cannot be
//! moved to another channel or pair. The listener acts on nothing a connector sends until
//! `mac_c` checked. Every read and write has one deadline for the whole handshake, so a
//! connection that stalls (or sends a byte a second) is dropped when it passes.
//!
//! `--insecure` runs the same exchange with a well-known all-zero key and the insecure
//! flag set, so a side with a key refuses such a peer with a clear error.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::key::{KEY_LEN, KeyError, PairKey};

/// The first bytes of every colo connection.
pub const MAGIC: [u8; 8] = *b"COLOAUTH";
/// This handshake's version.
pub const VERSION: u8 = 1;
/// Bytes of a MAC.
pub const MAC_LEN: usize = 32;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// How long a handshake may take by default.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const FLAG_INSECURE: u8 = 1;
const FLAG_ENCRYPT: u8 = 2;
const VERDICT_OK: u8 = 0;

/// Which side of a pair a peer is (the control protocol's Hello names it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs the PVM, serves clients, drives checkpoints.
    Primary,
    /// Runs the SVM and holds the RAM cache.
    Secondary,
}

impl Role {
    /// Its code on the wire.
    pub fn code(self) -> u8 {
        match self {
            Self::Primary => 1,
            Self::Secondary => 2,
        }
    }

    /// The role of a wire code, if it is one.
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Self::Primary),
            2 => Some(Self::Secondary),
            _ => None,
        }
    }

    /// The other role.
    pub fn peer(self) -> Self {
        match self {
            Self::Primary => Self::Secondary,
            Self::Secondary => Self::Primary,
        }
    }
}

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The control channel (checkpoint protocol and heartbeat).
    Control,
    /// Push stream `index` of the page transport.
    Push(u32),
    /// The disk replication link.
    Disk,
}

impl Channel {
    pub(crate) fn code(self) -> (u8, u32) {
        match self {
            Self::Control => (1, 0),
            Self::Push(i) => (2, i),
            Self::Disk => (3, 0),
        }
    }

    fn from_code(c: u8, index: u32) -> Option<Self> {
        match (c, index) {
            (1, 0) => Some(Self::Control),
            (2, i) => Some(Self::Push(i)),
            (3, 0) => Some(Self::Disk),
            _ => None,
        }
    }

    /// Whether `other` is the same kind of channel (any push stream matches any other).
    fn same_kind(self, other: Self) -> bool {
        self.code().0 == other.code().0
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Control => f.write_str("control"),
            Self::Push(i) => write!(f, "push stream {i}"),
            Self::Disk => f.write_str("disk"),
        }
    }
}

/// What a side proves itself with: the pair key, or nothing (`--insecure`).
#[derive(Debug, Clone)]
pub struct Credentials {
    key: PairKey,
    insecure: bool,
    encrypt: bool,
}

impl Credentials {
    /// Authenticate with `key`.
    pub fn key(key: PairKey) -> Self {
        Self {
            key,
            insecure: false,
            encrypt: false,
        }
    }

    /// No key (`--insecure`): anyone who speaks the protocol gets in.
    pub fn insecure() -> Self {
        Self {
            key: PairKey::from_bytes([0; KEY_LEN]),
            insecure: true,
            encrypt: false,
        }
    }

    /// A new random key (`colo pair` makes one for its two sides).
    ///
    /// # Errors
    /// [`KeyError::Random`] if the OS has no randomness.
    pub fn generate() -> Result<Self, KeyError> {
        PairKey::generate().map(Self::key)
    }

    /// With `on`, the channels are encrypted after the handshake (`--encrypt`, the
    /// [`seal`](crate::seal) record layer); both sides must agree, and the handshake
    /// refuses a peer that does not, saying which.
    pub fn encrypted(mut self, on: bool) -> Self {
        self.encrypt = on;
        self
    }

    /// Whether the channels are encrypted after the handshake.
    pub fn encrypts(&self) -> bool {
        self.encrypt
    }

    /// Whether this is `--insecure`.
    pub fn is_insecure(&self) -> bool {
        self.insecure
    }

    /// The key (the all-zero key when insecure).
    pub fn pair_key(&self) -> &PairKey {
        &self.key
    }
}

/// Why a handshake failed. The connection is dropped; nothing it sent was acted on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The connection failed or closed during the handshake.
    #[error("the connection failed during the handshake ({what})")]
    Io {
        /// The step.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The whole handshake took longer than allowed.
    #[error("the handshake did not finish within {after:?}")]
    Timeout {
        /// The limit.
        after: Duration,
    },
    /// The peer does not speak colo's protocol.
    #[error("the peer is not colo (no COLOAUTH greeting)")]
    NotColo,
    /// Another handshake version.
    #[error("the peer speaks handshake version {theirs}, this side {VERSION}")]
    Version {
        /// The peer's version.
        theirs: u8,
    },
    /// A field that no version of the handshake has.
    #[error("malformed handshake: {0}")]
    Malformed(&'static str),
    /// The peer has the wrong role for this connection.
    #[error("the peer says it is the {found:?}; this connection expects the {expected:?}")]
    WrongRole {
        /// The role expected.
        expected: Role,
        /// The role announced.
        found: Role,
    },
    /// The peer opened another kind of connection.
    #[error("the peer opened a {found} connection; this one is for {expected}")]
    WrongChannel {
        /// The channel expected.
        expected: Channel,
        /// The channel announced.
        found: Channel,
    },
    /// The peer belongs to another pair (another key).
    #[error("the peer belongs to another pair (pair id {theirs:016x}, ours {ours:016x})")]
    OtherPair {
        /// This side's pair id.
        ours: u64,
        /// The peer's.
        theirs: u64,
    },
    /// One side runs `--insecure`, the other has a key.
    #[error(
        "{}",
        if *.peer_insecure {
            "the peer runs without a pair key (--insecure); this side has one"
        } else {
            "the peer has a pair key; this side runs --insecure"
        }
    )]
    InsecureMismatch {
        /// Whether the peer is the insecure one.
        peer_insecure: bool,
    },
    /// One side encrypts (`--encrypt`), the other does not.
    #[error(
        "{}",
        if *.peer_encrypts {
            "the peer encrypts (--encrypt); this side does not"
        } else {
            "this side encrypts (--encrypt); the peer does not"
        }
    )]
    EncryptMismatch {
        /// Whether the peer is the one that encrypts.
        peer_encrypts: bool,
    },
    /// The peer's MAC is wrong: it does not hold this pair's key (or replayed a handshake).
    #[error("the peer does not prove it holds this pair's key (bad MAC)")]
    BadMac,
    /// The listener refused this side's proof.
    #[error("the peer refused this side's proof of the pair key")]
    Refused,
}

/// What the handshake established.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's role.
    pub role: Role,
    /// The channel (with the push stream's index).
    pub channel: Channel,
    /// A secret both sides now share and nobody else knows (for keys of an encrypted
    /// channel): HMAC-SHA256(key, "colo-auth v1 session" | transcript).
    pub session: [u8; MAC_LEN],
}

#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloWire {
    magic: [u8; 8],
    version: u8,
    role: u8,
    channel: u8,
    flags: u8,
    index: U32,
    pair_id: U64,
    nonce: [u8; NONCE_LEN],
}

/// Bytes of a Hello.
pub const HELLO_LEN: usize = size_of::<HelloWire>();

/// A decoded Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The sender's role.
    pub role: Role,
    /// The channel it opens.
    pub channel: Channel,
    /// Whether it runs `--insecure`.
    pub insecure: bool,
    /// Whether it encrypts the channel after the handshake.
    pub encrypt: bool,
    /// Its pair id.
    pub pair_id: u64,
    /// Its nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    fn new(creds: &Credentials, role: Role, channel: Channel) -> Result<Self, AuthError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| AuthError::Io {
            what: "draw a nonce",
            source: io::Error::other(e),
        })?;
        Ok(Self {
            role,
            channel,
            insecure: creds.insecure,
            encrypt: creds.encrypt,
            pair_id: creds.key.pair_id(),
            nonce,
        })
    }

    /// The wire bytes.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let (channel, index) = self.channel.code();
        let w = HelloWire {
            magic: MAGIC,
            version: VERSION,
            role: self.role.code(),
            channel,
            flags: if self.insecure { FLAG_INSECURE } else { 0 }
                | if self.encrypt { FLAG_ENCRYPT } else { 0 },
            index: index.into(),
            pair_id: self.pair_id.into(),
            nonce: self.nonce,
        };
        let mut out = [0u8; HELLO_LEN];
        out.copy_from_slice(w.as_bytes());
        out
    }

    /// Decodes a Hello.
    ///
    /// # Errors
    /// [`AuthError::NotColo`], [`AuthError::Version`] or [`AuthError::Malformed`].
    pub fn decode(bytes: &[u8]) -> Result<Self, AuthError> {
        let w = HelloWire::read_from_bytes(bytes)
            .map_err(|_| AuthError::Malformed("a Hello is 56 bytes"))?;
        if w.magic != MAGIC {
            return Err(AuthError::NotColo);
        }
        if w.version != VERSION {
            return Err(AuthError::Version { theirs: w.version });
        }
        if w.flags & !(FLAG_INSECURE | FLAG_ENCRYPT) != 0 {
            return Err(AuthError::Malformed("unknown flags"));
        }
        Ok(Self {
            role: Role::from_code(w.role).ok_or(AuthError::Malformed("unknown role"))?,
            channel: Channel::from_code(w.channel, w.index.get())
                .ok_or(AuthError::Malformed("unknown channel"))?,
            insecure: w.flags & FLAG_INSECURE != 0,
            encrypt: w.flags & FLAG_ENCRYPT != 0,
            pair_id: w.pair_id.get(),
            nonce: w.nonce,
        })
    }

    /// Checks a peer's Hello against what this side expects.
    fn check(
        &self,
        creds: &Credentials,
        expected: Role,
        channel: Channel,
    ) -> Result<(), AuthError> {
        if self.insecure != creds.insecure {
            return Err(AuthError::InsecureMismatch {
                peer_insecure: self.insecure,
            });
        }
        if self.encrypt != creds.encrypt {
            return Err(AuthError::EncryptMismatch {
                peer_encrypts: self.encrypt,
            });
        }
        let ours = creds.key.pair_id();
        if self.pair_id != ours {
            return Err(AuthError::OtherPair {
                ours,
                theirs: self.pair_id,
            });
        }
        if self.role != expected {
            return Err(AuthError::WrongRole {
                expected,
                found: self.role,
            });
        }
        if !self.channel.same_kind(channel) {
            return Err(AuthError::WrongChannel {
                expected: channel,
                found: self.channel,
            });
        }
        Ok(())
    }
}

fn mac(key: &PairKey, label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key.bytes()).expect("HMAC takes any key");
    m.update(label);
    for p in parts {
        m.update(p);
    }
    m
}

fn tag(key: &PairKey, label: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    mac(key, label, parts).finalize().into_bytes().into()
}

/// Checks `got` in constant time.
fn verify(key: &PairKey, label: &[u8], parts: &[&[u8]], got: &[u8]) -> Result<(), AuthError> {
    mac(key, label, parts)
        .verify_slice(got)
        .map_err(|_| AuthError::BadMac)
}

const SERVER: &[u8] = b"colo-auth v1 server";
const CLIENT: &[u8] = b"colo-auth v1 client";
const SESSION: &[u8] = b"colo-auth v1 session";

/// A stream whose reads and writes can be bounded in time.
pub trait Timed: Read + Write {
    /// Bounds every following read and write (None: no bound).
    ///
    /// # Errors
    /// The OS error.
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Timed for TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Timed for UnixStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// Reads and writes of one handshake, under one deadline.
struct Exchange<'a, S: Timed> {
    s: &'a mut S,
    deadline: Instant,
    limit: Duration,
}

impl<'a, S: Timed> Exchange<'a, S> {
    fn new(s: &'a mut S, limit: Duration) -> Self {
        Self {
            s,
            deadline: Instant::now() + limit,
            limit,
        }
    }

    fn left(&self) -> Result<Duration, AuthError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(AuthError::Timeout { after: self.limit })
        } else {
            Ok(left)
        }
    }

    fn io_error(&self, what: &'static str, e: io::Error) -> AuthError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                AuthError::Timeout { after: self.limit }
            }
            _ => AuthError::Io { what, source: e },
        }
    }

    fn read(&mut self, what: &'static str, buf: &mut [u8]) -> Result<(), AuthError> {
        let mut got = 0;
        while got < buf.len() {
            let left = self.left()?;
            self.s
                .set_timeouts(Some(left))
                .map_err(|e| self.io_error("set a timeout", e))?;
            match self.s.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(AuthError::Io {
                        what,
                        source: io::ErrorKind::UnexpectedEof.into(),
                    });
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error(what, e)),
            }
        }
        Ok(())
    }

    fn write(&mut self, what: &'static str, buf: &[u8]) -> Result<(), AuthError> {
        let left = self.left()?;
        self.s
            .set_timeouts(Some(left))
            .map_err(|e| self.io_error("set a timeout", e))?;
        self.s
            .write_all(buf)
            .and_then(|()| self.s.flush())
            .map_err(|e| self.io_error(what, e))
    }

    fn finish(self) -> Result<(), AuthError> {
        self.s.set_timeouts(None).map_err(|e| AuthError::Io {
            what: "clear the timeout",
            source: e,
        })
    }
}

/// The connecting side: proves `me` holds the key on `channel`, and checks the listener
/// is the peer role of the same pair. `limit` bounds the whole handshake.
///
/// # Errors
/// [`AuthError`]: the listener is not the expected peer, or refused this side.
pub fn connect<S: Timed>(
    s: &mut S,
    creds: &Credentials,
    me: Role,
    channel: Channel,
    limit: Duration,
) -> Result<Peer, AuthError> {
    let mut x = Exchange::new(s, limit);
    let hello_c = Hello::new(creds, me, channel)?.encode();
    x.write("send the Hello", &hello_c)?;
    let mut reply = [0u8; HELLO_LEN + MAC_LEN];
    x.read("read the peer's Hello", &mut reply)?;
    let (hello_s, mac_s) = reply.split_at(HELLO_LEN);
    let theirs = Hello::decode(hello_s)?;
    theirs.check(creds, me.peer(), channel)?;
    if theirs.channel != channel {
        return Err(AuthError::WrongChannel {
            expected: channel,
            found: theirs.channel,
        });
    }
    verify(&creds.key, SERVER, &[&hello_c, hello_s], mac_s)?;
    let mac_c = tag(&creds.key, CLIENT, &[&hello_c, hello_s, mac_s]);
    x.write("send the proof", &mac_c)?;
    let mut verdict = [0u8; 1];
    x.read("read the verdict", &mut verdict)
        .map_err(|e| match e {
            AuthError::Io { .. } => AuthError::Refused,
            other => other,
        })?;
    if verdict[0] != VERDICT_OK {
        return Err(AuthError::Refused);
    }
    x.finish()?;
    Ok(Peer {
        role: theirs.role,
        channel,
        session: tag(&creds.key, SESSION, &[&hello_c, hello_s, mac_s, &mac_c]),
    })
}

/// The listening side: checks the connector is the peer role of the same pair opening a
/// `channel` connection (any index for a push stream: [`Peer::channel`] says which), and
/// proves `me` holds the key. `limit` bounds the whole handshake.
///
/// # Errors
/// [`AuthError`]: the connector is not the expected peer. Nothing it sent was acted on.
pub fn accept<S: Timed>(
    s: &mut S,
    creds: &Credentials,
    me: Role,
    channel: Channel,
    limit: Duration,
) -> Result<Peer, AuthError> {
    let mut x = Exchange::new(s, limit);
    let mut hello_c = [0u8; HELLO_LEN];
    x.read("read the peer's Hello", &mut hello_c)?;
    let theirs = Hello::decode(&hello_c)?;
    let fits = theirs.check(creds, me.peer(), channel);
    let hello_s = Hello::new(creds, me, theirs.channel)?.encode();
    let mac_s = tag(&creds.key, SERVER, &[&hello_c, &hello_s]);
    let mut reply = [0u8; HELLO_LEN + MAC_LEN];
    reply[..HELLO_LEN].copy_from_slice(&hello_s);
    reply[HELLO_LEN..].copy_from_slice(&mac_s);
    // Answered even when it does not fit (another pair, role or channel), so that the
    // connector can say why; then dropped.
    let sent = x.write("send the Hello", &reply);
    fits?;
    sent?;
    let mut mac_c = [0u8; MAC_LEN];
    x.read("read the peer's proof", &mut mac_c)?;
    verify(&creds.key, CLIENT, &[&hello_c, &hello_s, &mac_s], &mac_c)?;
    x.write("send the verdict", &[VERDICT_OK])?;
    x.finish()?;
    Ok(Peer {
        role: theirs.role,
        channel: theirs.channel,
        session: tag(&creds.key, SESSION, &[&hello_c, &hello_s, &mac_s, &mac_c]),
    })
}

/// Why [`accept_peer`] gave up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// No connection authenticated before the deadline.
    #[error(
        "no peer authenticated on the {channel} listener within {after:?} ({refused} connection(s) refused)"
    )]
    Timeout {
        /// The channel.
        channel: Channel,
        /// The wait.
        after: Duration,
        /// Connections that came but failed their handshake.
        refused: u32,
    },
    /// The caller's stop condition came true first (a signal, a deadline of its own).
    #[error("stopped while waiting for the peer on the {channel} listener")]
    Stopped {
        /// The channel.
        channel: Channel,
    },
    /// The listener failed.
    #[error("accept on the {channel} listener failed")]
    Accept {
        /// The channel.
        channel: Channel,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Accepts connections on `listener` until one authenticates as `me`'s peer on `channel`
/// or `wait` passes (None: no limit; `stop` returning true ends the wait too). Each
/// connection gets [`HANDSHAKE_TIMEOUT`] (or `handshake`); one that fails is logged with
/// its address and dropped, and the listener keeps waiting.
///
/// # Errors
/// [`AcceptError`].
pub fn accept_peer(
    listener: &TcpListener,
    creds: &Credentials,
    me: Role,
    channel: Channel,
    wait: Option<Duration>,
    handshake: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<(TcpStream, SocketAddr, Peer), AcceptError> {
    let accept_err = |source| AcceptError::Accept { channel, source };
    listener.set_nonblocking(true).map_err(accept_err)?;
    let started = Instant::now();
    let mut refused = 0;
    let timeout = |refused| AcceptError::Timeout {
        channel,
        after: started.elapsed(),
        refused,
    };
    loop {
        if stop() {
            return Err(AcceptError::Stopped { channel });
        }
        if wait.is_some_and(|w| started.elapsed() >= w) {
            return Err(timeout(refused));
        }
        let (mut s, addr) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(accept_err(e)),
        };
        s.set_nonblocking(false).map_err(accept_err)?;
        match accept(&mut s, creds, me, channel, handshake) {
            Ok(peer) => {
                tracing::debug!(%addr, %channel, "peer authenticated");
                return Ok((s, addr, peer));
            }
            Err(e) => {
                refused += 1;
                tracing::warn!(
                    %addr,
                    %channel,
                    error = %e,
                    "refused a connection that did not authenticate; still waiting for the peer"
                );
            }
        }
    }
}
