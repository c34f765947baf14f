//! What a side reports to whoever supervises it (`colo pair`), and what it is asked: one
//! JSON object a line on the `--events` Unix socket, typed on both ends.
//!
//! ```text
//!  side (colo primary | colo secondary)                      supervisor (colo pair)
//!    {"event":"checkpoint","epoch":7,"trigger":"timer",...} ─▶ figures, metrics file
//!    {"event":"aborted-pause","pause_us":1200}              ─▶ longest aborted pause
//!    {"event":"failover","side":"primary","reason":{...}}   ─▶ the primary serves alone
//!    {"event":"failover","side":"secondary","reason":{...}} ─▶ the client goes to the SVM
//!    {"event":"fenced","reason":{...}}                      ─▶ the secondary stays passive
//!    {"event":"protected"}                                  ─▶ compare again
//!  ◀─ {"request":"checkpoint"} (the proxy saw the outputs differ)
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use crossbeam_channel::Receiver;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::link::{Link, LostReason};
use super::metrics::EpochRecord;
use super::prometheus::MetricsHandle;
use super::{Chain, ColoError, Result};

/// A side of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The primary: its VM serves the clients.
    Primary,
    /// The secondary: its VM follows, and serves after a takeover.
    Secondary,
}

/// Why a side left COLO: the primary lost its secondary, or the secondary took over (or
/// would have, but was fenced).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ExitReason {
    /// The peer counts as lost.
    PeerLost {
        /// Why.
        lost: LostReason,
    },
    /// A step of the protocol failed while the link still stood.
    Failed {
        /// The error with its sources, for people to read.
        error: String,
    },
}

impl ExitReason {
    /// Why COLO ends after `e`, given why the link was lost, if it was. A lost link is the
    /// cause: the failure that surfaced (a push ended by the heartbeat's verdict, say) is
    /// only its consequence.
    pub fn of(e: &ColoError, link_lost: Option<LostReason>) -> Self {
        match (link_lost, e) {
            (Some(lost), _) => Self::PeerLost { lost },
            (None, ColoError::PeerLost(lost)) => Self::PeerLost { lost: lost.clone() },
            (None, e) => Self::Failed {
                error: Chain(e).to_string(),
            },
        }
    }

    /// Whether COLO was ended by hand (`x-colo-lost-heartbeat`).
    pub fn by_hand(&self) -> bool {
        matches!(
            self,
            Self::PeerLost {
                lost: LostReason::Forced
            }
        )
    }

    /// Whether the peer itself asked for failover.
    pub fn peer_asked(&self) -> bool {
        matches!(
            self,
            Self::PeerLost {
                lost: LostReason::FailoverRequested
            }
        )
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PeerLost { lost } => write!(f, "peer lost: {}", Chain(lost)),
            Self::Failed { error } => f.write_str(error),
        }
    }
}

/// What a side reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Event {
    /// The primary committed a checkpoint: its record.
    Checkpoint(EpochRecord),
    /// A checkpoint failed (the secondary vanished mid-way) after pausing the PVM this
    /// long.
    AbortedPause {
        /// The pause, in microseconds.
        pause_us: u64,
    },
    /// A new secondary joined the primary and is in sync (re-protection).
    Protected,
    /// A side left COLO: the primary serves alone, or the secondary took over and serves.
    Failover {
        /// The side that reports it.
        side: Side,
        /// Why.
        reason: ExitReason,
        /// A secondary's takeover: when it lost the primary and when it decided to take
        /// over (absent from a primary, and from older secondaries).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timing: Option<TakeoverTiming>,
    },
    /// The secondary lost the primary, but its takeover check says the primary still
    /// serves: it stays passive.
    Fenced {
        /// Why it would have taken over.
        reason: ExitReason,
    },
}

/// When a secondary's takeover passed its first steps, as wall-clock times (microseconds
/// since the Unix epoch), so that a supervisor on the same host can put them beside its
/// own: the time from losing the primary to the decision is the detection's and the
/// takeover check's share of the client's wait at failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeoverTiming {
    /// The link to the primary was lost (closed, or silent for the heartbeat timeout).
    pub lost_unix_us: u64,
    /// The takeover check passed and the takeover began (the event is sent then, before
    /// the disk buffer is flushed and the SVM resumed).
    pub decided_unix_us: u64,
}

/// What a supervisor asks of the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Request {
    /// Take a checkpoint now: the proxy saw the outputs differ.
    Checkpoint,
}

/// `v` as one JSON line.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // A derived Serialize of these types into a Vec cannot fail (no maps with non-string
    // keys, no I/O).
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    line
}

/// One line (without its newline) as a `T`.
///
/// # Errors
/// The line is not the JSON of a `T`.
pub fn decode<T: DeserializeOwned>(line: &str) -> serde_json::Result<T> {
    serde_json::from_str(line)
}

/// A side's end of the event socket, and its metrics: every event emitted is counted
/// there too (`--metrics-listen`, see [`super::prometheus`]).
pub struct Events {
    out: Option<UnixStream>,
    metrics: MetricsHandle,
    /// The supervisor's requests.
    pub requests: Receiver<Request>,
}

impl Events {
    /// No supervisor.
    pub fn none() -> Self {
        Self {
            out: None,
            metrics: MetricsHandle::none(),
            requests: crossbeam_channel::never(),
        }
    }

    /// Connects to a supervisor's event socket; its requests arrive on
    /// [`requests`](Self::requests).
    ///
    /// # Errors
    /// [`ColoError::File`] if the socket cannot be reached, [`ColoError::Io`] if it
    /// cannot be read.
    pub fn connect(path: &std::path::Path) -> Result<Self> {
        let s =
            UnixStream::connect(path).map_err(ColoError::file("connect the event socket", path))?;
        let r = s
            .try_clone()
            .map_err(ColoError::io("clone the event socket"))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("colo-requests".into())
            .spawn(move || {
                for line in BufReader::new(r).lines().map_while(std::result::Result::ok) {
                    match decode::<Request>(&line) {
                        Ok(req) => {
                            if tx.send(req).is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, line, "not a request; ignored"),
                    }
                }
            })
            .map_err(ColoError::spawn("event socket reader"))?;
        Ok(Self {
            out: Some(s),
            metrics: MetricsHandle::none(),
            requests: rx,
        })
    }

    /// Counts every event emitted from now on in `metrics` too.
    pub fn with_metrics(mut self, metrics: MetricsHandle) -> Self {
        self.metrics = metrics;
        self
    }

    /// A checkpoint applied on the secondary, with the pages it copied: for the metrics
    /// only (the supervisor hears of checkpoints from the primary).
    pub fn applied(&self, pages: u64) {
        self.metrics.applied(pages);
    }

    /// The control link whose heartbeat the metrics show (the newest one).
    pub fn watch_link(&self, link: &Link) {
        self.metrics.watch_link(link);
    }

    /// Reports `ev` to the supervisor (dropped if there is none, or it is gone) and
    /// counts it in the metrics.
    pub fn emit(&mut self, ev: &Event) {
        self.metrics.observe(ev);
        if let Some(s) = &mut self.out {
            if s.write_all(&encode(ev)).is_err() {
                self.out = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::colo::metrics::Trigger;

    fn line_of(ev: &Event) -> serde_json::Value {
        let l = encode(ev);
        assert_eq!(l.last(), Some(&b'\n'), "one line");
        serde_json::from_slice(&l).unwrap()
    }

    #[test]
    fn events_are_tagged_json_lines_that_read_back_as_the_same_variants() {
        let lost = ExitReason::PeerLost {
            lost: LostReason::HeartbeatTimeout { silent_ms: 1013 },
        };
        let ev = Event::Failover {
            side: Side::Secondary,
            reason: lost,
            timing: None,
        };
        assert_eq!(
            line_of(&ev),
            json!({"event": "failover", "side": "secondary",
                   "reason": {"kind": "peer-lost", "lost": {"kind": "heartbeat-timeout", "silent_ms": 1013}}})
        );
        let back: Event = decode(String::from_utf8(encode(&ev)).unwrap().trim_end()).unwrap();
        assert!(matches!(
            back,
            Event::Failover {
                side: Side::Secondary,
                reason: ExitReason::PeerLost {
                    lost: LostReason::HeartbeatTimeout { silent_ms: 1013 }
                },
                timing: None,
            }
        ));
        let timed = Event::Failover {
            side: Side::Secondary,
            reason: ExitReason::PeerLost {
                lost: LostReason::Closed,
            },
            timing: Some(TakeoverTiming {
                lost_unix_us: 10,
                decided_unix_us: 12,
            }),
        };
        assert_eq!(
            line_of(&timed)["timing"],
            json!({"lost_unix_us": 10, "decided_unix_us": 12})
        );

        assert_eq!(
            line_of(&Event::AbortedPause { pause_us: 7 }),
            json!({"event": "aborted-pause", "pause_us": 7})
        );
        assert_eq!(line_of(&Event::Protected), json!({"event": "protected"}));
        let fenced: Event =
            decode(r#"{"event":"fenced","reason":{"kind":"peer-lost","lost":{"kind":"closed"}}}"#)
                .unwrap();
        assert!(matches!(
            fenced,
            Event::Fenced {
                reason: ExitReason::PeerLost {
                    lost: LostReason::Closed
                }
            }
        ));

        // A checkpoint carries its whole record, flat beside the tag.
        let rec: EpochRecord = serde_json::from_value(json!({
            "epoch": 3, "trigger": "mismatch", "pause_us": 900, "pause_pages": 4,
            "background_pages": 10, "bytes": 57344, "state_bytes": 2048
        }))
        .unwrap();
        let v = line_of(&Event::Checkpoint(rec));
        assert_eq!(v["event"], "checkpoint");
        assert_eq!(v["trigger"], "mismatch");
        assert_eq!(v["pause_us"], 900);
        let Event::Checkpoint(r) = decode::<Event>(&v.to_string()).unwrap() else {
            panic!("not a checkpoint: {v}");
        };
        assert_eq!(
            (r.epoch, r.trigger, r.pause_us),
            (3, Trigger::Mismatch, 900)
        );

        assert!(
            decode::<Event>("COMMIT 3").is_err(),
            "the old text lines are no events"
        );
        assert!(decode::<Event>(r#"{"event":"no-such"}"#).is_err());
    }

    #[test]
    fn an_exit_reason_keeps_the_lost_link_as_the_cause_and_says_if_it_was_by_hand() {
        let push = ColoError::transport("background push")(colo_transport::Error::Closed);
        let r = ExitReason::of(&push, Some(LostReason::Forced));
        assert!(r.by_hand() && !r.peer_asked());
        assert_eq!(r.to_string(), "peer lost: x-colo-lost-heartbeat");
        let r = ExitReason::of(&push, None);
        assert!(!r.by_hand());
        assert_eq!(
            r.to_string(),
            "background push: the transport is closed",
            "the error with its source"
        );
        let r = ExitReason::of(&ColoError::PeerLost(LostReason::FailoverRequested), None);
        assert!(r.peer_asked() && !r.by_hand());
        assert_eq!(r.to_string(), "peer lost: the peer asked for failover");
    }

    #[test]
    fn a_checkpoint_request_crosses_the_socket_as_a_typed_line() {
        assert_eq!(
            encode(&Request::Checkpoint),
            b"{\"request\":\"checkpoint\"}\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let events = Events::connect(&path).unwrap();
        let (mut sup, _) = listener.accept().unwrap();
        // A line that is no request is skipped; the request after it arrives.
        sup.write_all(b"CHECKPOINT\n").unwrap();
        sup.write_all(&encode(&Request::Checkpoint)).unwrap();
        assert_eq!(
            events.requests.recv_timeout(Duration::from_secs(5)),
            Ok(Request::Checkpoint)
        );
        assert!(events.requests.try_recv().is_err(), "only one request");
    }
}
