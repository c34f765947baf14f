//! The control link between primary and secondary: one TCP control channel shared by the
//! checkpoint protocol and the heartbeat.
//!
//! A reader thread takes every message off the socket: heartbeats only refresh the
//! "last heard" time, everything else goes to the controller through a channel. A
//! heartbeat thread sends a heartbeat every interval. Sends from both threads go through
//! one mutex, so frames never interleave. The link is *lost* when the peer closes the
//! socket, a frame is bad, or nothing (not even a heartbeat) arrives within the timeout;
//! [`LostReason`] says which.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use colo_transport::control::{Conn, ControlChannel, Kind, Message};
use colo_transport::framing;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::{Deserialize, Serialize};

use super::{Chain, ColoError, Result};

/// Why the peer counts as lost.
///
/// Serialized (its `kind`, and its figures) in the events a side reports; the sources of
/// the failures are not, they are for this side's logs.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum LostReason {
    /// Nothing, not even a heartbeat, arrived within the heartbeat timeout.
    #[error("no heartbeat for {silent_ms} ms")]
    HeartbeatTimeout {
        /// How long the peer was silent.
        silent_ms: u64,
    },
    /// The peer closed the control connection.
    #[error("the peer closed the control connection")]
    Closed,
    /// Receiving on the control connection failed (a bad frame, a reset).
    #[error("the control connection failed")]
    Receive {
        /// The transport's error.
        #[serde(skip)]
        #[source]
        source: Option<Arc<colo_transport::Error>>,
    },
    /// A heartbeat could not be sent.
    #[error("cannot send a heartbeat")]
    HeartbeatSend {
        /// The transport's error.
        #[serde(skip)]
        #[source]
        source: Option<Arc<colo_transport::Error>>,
    },
    /// A protocol message could not be sent.
    #[error("cannot send on the control connection")]
    Send {
        /// The transport's error.
        #[serde(skip)]
        #[source]
        source: Option<Arc<colo_transport::Error>>,
    },
    /// Declared lost by hand (QMP `x-colo-lost-heartbeat`).
    #[error("x-colo-lost-heartbeat")]
    Forced,
    /// The peer asked for failover (`Failover` message).
    #[error("the peer asked for failover")]
    FailoverRequested,
    /// The peer said goodbye outside an orderly stop of this side.
    #[error("the peer left")]
    Left,
    /// The push path closed in the middle of an epoch.
    #[error("the push path closed mid-epoch")]
    PushClosed,
}

impl LostReason {
    fn receive(e: colo_transport::Error) -> Self {
        match e {
            colo_transport::Error::Frame(framing::Error::PeerClosed) => Self::Closed,
            e => Self::Receive {
                source: Some(Arc::new(e)),
            },
        }
    }
}

/// A control message as a protocol step names it: its kind, and its epoch where it
/// carries one (as expected: `None` takes any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageId {
    /// The message type.
    pub kind: Kind,
    /// The checkpoint epoch.
    pub epoch: Option<u64>,
}

impl MessageId {
    /// What `m` is.
    pub fn of(m: &Message) -> Self {
        Self {
            kind: m.kind(),
            epoch: m.epoch(),
        }
    }

    /// Checks that `m` is this message, and returns it.
    ///
    /// # Errors
    /// [`ColoError::Unexpected`] naming this message and `m`.
    pub fn check(self, m: Message) -> Result<Message> {
        let got = Self::of(&m);
        if got.kind == self.kind && self.epoch.is_none_or(|e| got.epoch == Some(e)) {
            Ok(m)
        } else {
            Err(ColoError::Unexpected {
                expected: self,
                got,
            })
        }
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.epoch {
            Some(e) => write!(f, "{:?}(epoch {e})", self.kind),
            None => write!(f, "{:?}", self.kind),
        }
    }
}

/// Heartbeat settings.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    /// How often a heartbeat is sent.
    pub interval: Duration,
    /// Silence after which the peer is declared lost.
    pub timeout: Duration,
}

struct Inner {
    tx: Mutex<ControlChannel<Conn>>,
    lost: AtomicBool,
    /// Set once, before `lost`.
    why: Mutex<Option<LostReason>>,
    /// When the link was lost (wall clock, microseconds since the Unix epoch; 0 while it
    /// is not): the start of a takeover's timeline, comparable across processes.
    lost_at_unix_us: AtomicU64,
    /// Milliseconds since `epoch` when the peer was last heard.
    last_heard_ms: AtomicU64,
    /// The last heartbeat sent: its sequence number and microseconds since `epoch`.
    hb_sent: Mutex<(u64, u64)>,
    /// The last heartbeat round trip in microseconds (`u64::MAX`: none measured yet).
    rtt_us: AtomicU64,
    epoch: Instant,
    /// Run once when the link is lost (e.g. ending the push streams).
    on_lost: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

/// One side's end of the link.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
    rx: Receiver<Message>,
    hb: Heartbeat,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Starts the reader and heartbeat threads over a channel that finished its handshake.
    ///
    /// # Errors
    /// [`ColoError::Transport`] if the socket cannot be cloned.
    pub fn start(ch: ControlChannel<Conn>, hb: Heartbeat) -> Result<Self> {
        let mut reader = ch
            .try_clone()
            .map_err(ColoError::transport("clone the control socket"))?;
        reader
            .set_recv_timeout(Some(hb.interval.max(Duration::from_millis(20))))
            .map_err(ColoError::transport("set the control timeout"))?;
        let inner = Arc::new(Inner {
            tx: Mutex::new(ch),
            lost: AtomicBool::new(false),
            why: Mutex::default(),
            lost_at_unix_us: AtomicU64::new(0),
            last_heard_ms: AtomicU64::new(0),
            hb_sent: Mutex::new((0, 0)),
            rtt_us: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            on_lost: Mutex::default(),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let i = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("colo-link-rx".into())
            .spawn(move || {
                loop {
                    if i.lost.load(Ordering::SeqCst) {
                        return;
                    }
                    match reader.recv() {
                        Ok(Message::Heartbeat { seq }) => {
                            i.heard();
                            // Answered only if the sending side is free: this thread must
                            // never wait behind a long send (it would stop reading).
                            i.try_send(&Message::HeartbeatAck { seq });
                        }
                        Ok(Message::HeartbeatAck { seq }) => {
                            i.heard();
                            i.acked(seq);
                        }
                        Ok(m) => {
                            i.heard();
                            if tx.send(m).is_err() {
                                return;
                            }
                        }
                        Err(colo_transport::Error::Frame(framing::Error::Timeout)) => {}
                        Err(e) => {
                            i.lose(LostReason::receive(e));
                            return;
                        }
                    }
                }
            })
            .map_err(ColoError::spawn("control link reader"))?;
        let i = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("colo-heartbeat".into())
            .spawn(move || {
                let mut seq = 0;
                while !i.lost.load(Ordering::SeqCst) {
                    seq += 1;
                    *i.hb_sent.lock().unwrap_or_else(|p| p.into_inner()) =
                        (seq, i.epoch.elapsed().as_micros() as u64);
                    if let Err(e) = i.send(&Message::Heartbeat { seq }) {
                        i.lose(LostReason::HeartbeatSend {
                            source: Some(Arc::new(e)),
                        });
                        return;
                    }
                    let silent = i.since_heard();
                    if silent > hb.timeout {
                        i.lose(LostReason::HeartbeatTimeout {
                            silent_ms: silent.as_millis() as u64,
                        });
                        return;
                    }
                    std::thread::sleep(hb.interval);
                }
            })
            .map_err(ColoError::spawn("heartbeat"))?;
        inner.heard();
        Ok(Self { inner, rx, hb })
    }

    /// Sends a message.
    ///
    /// # Errors
    /// [`ColoError::PeerLost`] if the link is lost or the send fails (which loses it).
    pub fn send(&self, m: &Message) -> Result<()> {
        if self.is_lost() {
            return Err(self.lost_error());
        }
        self.inner.send(m).map_err(|e| {
            self.inner.lose(LostReason::Send {
                source: Some(Arc::new(e)),
            });
            self.lost_error()
        })
    }

    /// Waits for the next message (heartbeats excluded) for at most `timeout`.
    ///
    /// # Errors
    /// [`ColoError::PeerLost`] if the link is lost first, [`ColoError::Timeout`] on
    /// timeout.
    pub fn recv(&self, timeout: Duration) -> Result<Message> {
        self.recv_for(timeout, None)
    }

    /// [`recv`](Self::recv), for a step that waits for `expected` (named in the timeout).
    fn recv_for(&self, timeout: Duration, expected: Option<MessageId>) -> Result<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_lost() {
                return Err(self.lost_error());
            }
            let step = deadline
                .saturating_duration_since(Instant::now())
                .min(self.hb.interval.max(Duration::from_millis(5)));
            match self.rx.recv_timeout(step) {
                Ok(m) => return Ok(m),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(ColoError::Timeout {
                        expected,
                        after: timeout,
                    });
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.lost_error()),
            }
        }
    }

    /// Waits for the next message (heartbeats excluded) for at most `timeout`, and checks
    /// that it is a `kind` message of `epoch` (any epoch where `None`).
    ///
    /// # Errors
    /// As [`recv`](Self::recv), and [`ColoError::Unexpected`] for another message.
    pub fn expect(&self, kind: Kind, epoch: Option<u64>, timeout: Duration) -> Result<Message> {
        let expected = MessageId { kind, epoch };
        expected.check(self.recv_for(timeout, Some(expected))?)
    }

    /// A message if one is waiting.
    pub fn try_recv(&self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// Whether the peer is lost (or declared lost by hand).
    pub fn is_lost(&self) -> bool {
        self.inner.lost.load(Ordering::SeqCst)
    }

    /// Why the link was lost (`None` while it is not: once [`is_lost`](Self::is_lost)
    /// says so, this is set).
    pub fn why(&self) -> Option<LostReason> {
        self.inner
            .why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// When the link was lost, in microseconds since the Unix epoch (`None` while it is
    /// not).
    pub fn lost_at_unix_us(&self) -> Option<u64> {
        Some(self.inner.lost_at_unix_us.load(Ordering::SeqCst)).filter(|&t| t > 0)
    }

    /// `x-colo-lost-heartbeat`: declares the peer lost now.
    pub fn force_lost(&self) {
        self.inner.lose(LostReason::Forced);
    }

    /// Runs `f` once when the link is lost (at once if it already is): the heartbeat is
    /// the authority on whether the peer lives, and whatever else waits for the peer
    /// (the push streams) must stop waiting then.
    pub fn on_lost(&self, f: impl Fn() + Send + Sync + 'static) {
        let mut v = self
            .inner
            .on_lost
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.is_lost() {
            drop(v);
            f();
        } else {
            v.push(Box::new(f));
        }
    }

    /// A probe of how long the peer has been silent, which does not keep the link alive
    /// (for the metrics endpoint).
    pub fn silence_probe(&self) -> SilenceProbe {
        SilenceProbe(Arc::downgrade(&self.inner))
    }

    pub(crate) fn lost_error(&self) -> ColoError {
        // Lost without a reason cannot be: `lose` sets the reason first.
        ColoError::PeerLost(self.why().unwrap_or(LostReason::Closed))
    }
}

/// `t` in microseconds since the Unix epoch (0 before it, which a clock here never is).
pub fn unix_us(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Reads how long a link's peer has been silent, without keeping the link alive.
#[derive(Clone)]
pub struct SilenceProbe(Weak<Inner>);

impl std::fmt::Debug for SilenceProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SilenceProbe").finish_non_exhaustive()
    }
}

impl SilenceProbe {
    /// The time since the peer was last heard (a heartbeat or any message, to the
    /// millisecond); `None` once the link is lost or gone.
    pub fn silence(&self) -> Option<Duration> {
        let i = self.0.upgrade()?;
        (!i.lost.load(Ordering::SeqCst)).then(|| i.since_heard())
    }

    /// The last heartbeat's round trip (sent until its answer came back); `None` before
    /// the first answer, once the link is lost or gone.
    pub fn round_trip(&self) -> Option<Duration> {
        let i = self.0.upgrade()?;
        if i.lost.load(Ordering::SeqCst) {
            return None;
        }
        let us = i.rtt_us.load(Ordering::SeqCst);
        (us != u64::MAX).then(|| Duration::from_micros(us))
    }
}

impl Inner {
    fn heard(&self) {
        self.last_heard_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
    }

    fn since_heard(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_heard_ms.load(Ordering::SeqCst)))
    }

    /// An answer to heartbeat `seq` came: the round trip of the last one sent, if it is
    /// that one (an answer to an older one is not a fresh figure).
    fn acked(&self, seq: u64) {
        let (sent_seq, sent_us) = *self.hb_sent.lock().unwrap_or_else(|p| p.into_inner());
        if sent_seq == seq {
            let now = self.epoch.elapsed().as_micros() as u64;
            self.rtt_us
                .store(now.saturating_sub(sent_us), Ordering::SeqCst);
        }
    }

    /// Sends `m` if no other send is under way (errors are left to the other sends).
    fn try_send(&self, m: &Message) {
        if let Ok(mut tx) = self.tx.try_lock() {
            let _ = tx.send(m);
        }
    }

    fn send(&self, m: &Message) -> colo_transport::Result<()> {
        self.tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(m)
    }

    fn lose(&self, why: LostReason) {
        let mut w = self
            .why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.is_none() {
            tracing::warn!(reason = %Chain(&why), "peer lost");
            self.lost_at_unix_us
                .store(unix_us(std::time::SystemTime::now()), Ordering::SeqCst);
            *w = Some(why);
            self.lost.store(true, Ordering::SeqCst);
            drop(w);
            if let Ok(c) = self.tx.lock() {
                c.shutdown();
            }
            let callbacks = std::mem::take(
                &mut *self
                    .on_lost
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            for f in callbacks {
                f();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// Two ends of a control connection on loopback, the second as a bare channel.
    fn pair() -> (ControlChannel<Conn>, ControlChannel<Conn>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (
            ControlChannel::from_tcp(a).unwrap(),
            ControlChannel::from_tcp(b).unwrap(),
        )
    }

    fn hb(timeout_ms: u64) -> Heartbeat {
        Heartbeat {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn wait_lost(l: &Link) -> LostReason {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Some(why) = l.why() {
                assert!(l.is_lost());
                return why;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the link was never lost");
    }

    #[test]
    fn a_link_says_why_it_was_lost_as_a_reason_to_match() {
        // By hand on one side; the other sees the connection closed.
        let (a, b) = pair();
        let (a, b) = (
            Link::start(a, hb(5000)).unwrap(),
            Link::start(b, hb(5000)).unwrap(),
        );
        assert!(a.why().is_none() && !a.is_lost());
        assert!(matches!(
            a.recv(Duration::from_millis(30)),
            Err(ColoError::Timeout { expected: None, .. })
        ));
        b.force_lost();
        assert!(matches!(b.why(), Some(LostReason::Forced)));
        assert!(matches!(
            b.recv(Duration::from_secs(1)),
            Err(ColoError::PeerLost(LostReason::Forced))
        ));
        assert!(matches!(wait_lost(&a), LostReason::Closed));
        assert!(matches!(
            a.send(&Message::Goodbye),
            Err(ColoError::PeerLost(LostReason::Closed))
        ));

        // A silent peer: the heartbeat's verdict.
        let (a, _silent) = pair();
        let a = Link::start(a, hb(100)).unwrap();
        let LostReason::HeartbeatTimeout { silent_ms } = wait_lost(&a) else {
            panic!("{:?}", a.why());
        };
        assert!(silent_ms > 100, "{silent_ms}");
        assert!(
            a.expect(Kind::CheckpointReply, Some(1), Duration::from_secs(1))
                .is_err_and(|e| matches!(
                    e,
                    ColoError::PeerLost(LostReason::HeartbeatTimeout { .. })
                ))
        );
    }

    #[test]
    fn a_closed_connection_and_a_failed_one_are_told_apart() {
        let closed = colo_transport::Error::Frame(framing::Error::PeerClosed);
        assert!(matches!(LostReason::receive(closed), LostReason::Closed));
        let r = LostReason::receive(colo_transport::Error::Frame(framing::Error::Truncated {
            got: 3,
            want: 8,
        }));
        assert_eq!(
            Chain(&r).to_string(),
            "the control connection failed: truncated frame: the connection ended after 3 of 8 bytes"
        );
        // Serialized: the kind and the figures; the source stays in this side's log.
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"kind":"receive"}"#);
        let back: LostReason = serde_json::from_str(r#"{"kind":"receive"}"#).unwrap();
        assert!(matches!(back, LostReason::Receive { source: None }));
    }

    #[test]
    fn a_check_names_what_was_expected_and_what_came() {
        let reply = MessageId {
            kind: Kind::CheckpointReply,
            epoch: Some(5),
        };
        assert!(reply.check(Message::CheckpointReply { epoch: 5 }).is_ok());
        let e = reply
            .check(Message::CheckpointReply { epoch: 4 })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "protocol: expected CheckpointReply(epoch 5), got CheckpointReply(epoch 4)"
        );
        // A message without an epoch, and no megabytes of state in the error.
        let e = reply
            .check(Message::VmstateSize {
                state: vec![7; 1 << 20],
            })
            .unwrap_err();
        assert!(
            matches!(
                e,
                ColoError::Unexpected {
                    got: MessageId {
                        kind: Kind::VmstateSize,
                        epoch: None
                    },
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "protocol: expected CheckpointReply(epoch 5), got VmstateSize"
        );
        let state = MessageId {
            kind: Kind::VmstateSize,
            epoch: None,
        };
        assert!(state.check(Message::VmstateSize { state: vec![1] }).is_ok());
        assert!(state.check(Message::VmstateSend { epoch: 1 }).is_err());
    }
}
