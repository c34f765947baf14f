//! The control link between primary and secondary: one TCP control channel shared by the
//! checkpoint protocol and the heartbeat.
//!
//! A reader thread takes every message off the socket: heartbeats only refresh the
//! "last heard" time, everything else goes to the controller through a channel. A
//! heartbeat thread sends a heartbeat every interval. Sends from both threads go through
//! one mutex, so frames never interleave. The link is *lost* when the peer closes the
//! socket, a frame is bad, or nothing (not even a heartbeat) arrives within the timeout.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_transport::control::{ControlChannel, Kind, Message};
use colo_transport::framing;
use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::{ColoError, Result};

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
    tx: Mutex<ControlChannel<TcpStream>>,
    lost: AtomicBool,
    why: Mutex<String>,
    /// Milliseconds since `epoch` when the peer was last heard.
    last_heard_ms: AtomicU64,
    epoch: Instant,
    /// `x-colo-lost-heartbeat`: act as if the peer were lost.
    forced: AtomicBool,
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
    pub fn start(ch: ControlChannel<TcpStream>, hb: Heartbeat) -> Result<Self> {
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
            last_heard_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            forced: AtomicBool::new(false),
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
                        Ok(Message::Heartbeat { .. }) => i.heard(),
                        Ok(m) => {
                            i.heard();
                            if tx.send(m).is_err() {
                                return;
                            }
                        }
                        Err(colo_transport::Error::Frame(framing::Error::Timeout)) => {}
                        Err(e) => {
                            i.lose(format!("control connection: {e}"));
                            return;
                        }
                    }
                }
            })
            .map_err(|e| ColoError::Setup(format!("spawn the link reader: {e}")))?;
        let i = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("colo-heartbeat".into())
            .spawn(move || {
                let mut seq = 0;
                while !i.lost.load(Ordering::SeqCst) {
                    seq += 1;
                    if let Err(e) = i.send(&Message::Heartbeat { seq }) {
                        i.lose(format!("heartbeat send: {e}"));
                        return;
                    }
                    let silent = i.since_heard();
                    if silent > hb.timeout {
                        i.lose(format!("no heartbeat for {} ms", silent.as_millis()));
                        return;
                    }
                    std::thread::sleep(hb.interval);
                }
            })
            .map_err(|e| ColoError::Setup(format!("spawn the heartbeat: {e}")))?;
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
            self.inner.lose(format!("control send: {e}"));
            self.lost_error()
        })
    }

    /// Waits for the next message (heartbeats excluded) for at most `timeout`.
    ///
    /// # Errors
    /// [`ColoError::PeerLost`] if the link is lost first, [`ColoError::Protocol`] on
    /// timeout.
    pub fn recv(&self, timeout: Duration, waiting_for: &str) -> Result<Message> {
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
                    return Err(ColoError::Protocol(format!(
                        "no {waiting_for} within {} ms",
                        timeout.as_millis()
                    )));
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
        expected.check(self.recv(timeout, &expected.to_string())?)
    }

    /// A message if one is waiting.
    pub fn try_recv(&self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// Whether the peer is lost (or declared lost by hand).
    pub fn is_lost(&self) -> bool {
        self.inner.lost.load(Ordering::SeqCst)
    }

    /// Why the link was lost.
    pub fn why(&self) -> String {
        self.inner.why.lock().map(|w| w.clone()).unwrap_or_default()
    }

    /// `x-colo-lost-heartbeat`: declares the peer lost now.
    pub fn force_lost(&self) {
        self.inner.forced.store(true, Ordering::SeqCst);
        self.inner.lose("x-colo-lost-heartbeat".into());
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

    pub(crate) fn lost_error(&self) -> ColoError {
        ColoError::PeerLost(self.why())
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

    fn send(&self, m: &Message) -> colo_transport::Result<()> {
        self.tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(m)
    }

    fn lose(&self, why: String) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            tracing::warn!(reason = %why, "peer lost");
            if let Ok(mut w) = self.why.lock() {
                *w = why;
            }
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
    use super::*;

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
