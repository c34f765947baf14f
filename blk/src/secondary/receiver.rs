//! The secondary's receiver: the handshake, then one thread applying the primary's frames
//! in order and acknowledging them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use colo_transport::framing;

use super::reader::FrameReader;
use super::{Inner, SecondaryPhase, State};
use crate::error::{Error, Result};
use crate::frame_io::{read_frame, send_reject, write_frame};
use crate::wire::{Frame, SyncMode};

/// Writeback starts at a primary flush at most this often.
const WRITEBACK_EVERY: Duration = Duration::from_millis(20);

/// Frames applied between two acknowledgements at most, when more input is already
/// waiting (otherwise every time the input runs dry).
const ACK_EVERY: u32 = 64;
/// Payload bytes applied between two acknowledgements at most, when more input is
/// already waiting. An acknowledgement costs the receiver a send and the primary a
/// wake-up: once per 64 KiB frame it took a third of the receiver's time. Acknowledging
/// whenever the input runs dry keeps any window the primary uses from stalling: a
/// primary blocked on a full window sends nothing more, so the input soon runs dry.
const ACK_BYTES: u64 = 4 << 20;

/// Runs the secondary's half of the handshake on a fresh connection.
pub(crate) fn handshake(stream: &TcpStream, disk_len: u64, timeout: Duration) -> Result<SyncMode> {
    let opt =
        |option, r: std::io::Result<()>| r.map_err(|source| Error::SocketOption { option, source });
    opt("TCP_NODELAY", stream.set_nodelay(true))?;
    opt("SO_RCVTIMEO", stream.set_read_timeout(Some(timeout)))?;
    let mut payload = Vec::new();
    let mut s = stream;
    let frame = read_frame(&mut s, &mut payload).map_err(|e| match e {
        Error::Frame(framing::Error::Timeout) => Error::Timeout(timeout, "the primary's hello"),
        e => e,
    })?;
    let mode = match frame {
        Frame::Hello {
            disk_len: theirs,
            mode,
        } => {
            if theirs != disk_len {
                let why = format!(
                    "disk size mismatch: the primary's disk has {theirs} bytes, the secondary's {disk_len}"
                );
                let _ = send_reject(&mut s, &why);
                return Err(Error::Handshake(why));
            }
            mode
        }
        other => {
            let why = format!("expected a hello, got {other:?}");
            let _ = send_reject(&mut s, &why);
            return Err(Error::Protocol(why));
        }
    };
    write_frame(&mut s, Frame::HelloAck { disk_len }, &[])?;
    opt("SO_RCVTIMEO", stream.set_read_timeout(None))?;
    Ok(mode)
}

/// The receiver thread's body: serves the stream, then records why it ended.
pub(crate) fn run(inner: &Inner, stream: TcpStream) {
    let r = match stream.try_clone() {
        Ok(reader) => serve_loop(inner, reader, &stream, Some(&stream)),
        Err(source) => Err(Error::SocketOption {
            option: "dup",
            source,
        }),
    };
    let mut st = inner.lock();
    let why = match r {
        _ if st.stop => "stopped by this side".to_string(),
        Ok(()) => "the primary said goodbye".to_string(),
        Err(e) => {
            tracing::warn!(error = %e, "secondary: replication link ended");
            e.to_string()
        }
    };
    st.link_error = Some(why);
    st.link = None;
    drop(st);
    inner.cond.notify_all();
}

/// What the loop does after a frame.
enum Next {
    Continue,
    AckNow,
    /// Acknowledge, then wait until this epoch is committed.
    Pause(u64),
    Stop,
}

/// How often a receiver paused at an epoch marker checks whether the primary is gone.
const PAUSED_PROBE: Duration = Duration::from_millis(50);

/// The events of `events` that are ready on `s` now (`poll` with a zero timeout; an
/// interrupted call reports none).
#[allow(unsafe_code)]
fn poll_now(s: &TcpStream, events: libc::c_short) -> Result<libc::c_short> {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: `p` is one initialized pollfd living across the call and nfds is 1, so the
    // kernel reads and writes only it; the fd is open (borrowed from `s`); a zero timeout
    // never blocks.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(framing::Error::Recv(e).into());
    }
    Ok(if r > 0 { p.revents } else { 0 })
}

/// Whether the peer of `s` has closed its side (or the connection failed), even with
/// bytes still waiting to be read (the next epoch's writes): `poll` with `POLLRDHUP`.
fn peer_gone(s: &TcpStream) -> Result<bool> {
    Ok(poll_now(s, libc::POLLRDHUP)? & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
}

/// Whether more input is already waiting: in the read buffer, or (with a socket to ask)
/// in the socket. Without a socket only the buffer counts.
fn input_waiting<R: Read>(reader: &FrameReader<R>, probe: Option<&TcpStream>) -> Result<bool> {
    if reader.buffered() > 0 {
        return Ok(true);
    }
    match probe {
        Some(s) => Ok(poll_now(s, libc::POLLIN)? & libc::POLLIN != 0),
        None => Ok(false),
    }
}

/// Applies frames from `reader` until Goodbye, an error, or a stop request, and sends
/// acknowledgements to `writer`. Paused at an epoch marker, it waits for the commit and
/// meanwhile checks `probe` for a primary that went away; without a probe (fuzzing:
/// there is no controller) every epoch commits as soon as its marker arrives.
pub(crate) fn serve_loop<R: Read, W: Write>(
    inner: &Inner,
    reader: R,
    mut writer: W,
    probe: Option<&TcpStream>,
) -> Result<()> {
    let mut reader = FrameReader::new(reader);
    let mut since_ack = 0u32;
    let mut since_ack_bytes = 0u64;
    let mut acked = 0u64;
    loop {
        let frame = match reader.next() {
            Ok(f) => f,
            Err(e) => {
                if !matches!(
                    e,
                    Error::Frame(
                        framing::Error::PeerClosed
                            | framing::Error::Truncated { .. }
                            | framing::Error::Recv(_)
                    )
                ) {
                    let _ = send_reject(&mut writer, &e.to_string());
                }
                return Err(e);
            }
        };
        let mut st = inner.lock();
        if st.stop {
            return Ok(());
        }
        let payload = reader.payload();
        let next = match apply(&mut st, inner.disk_len, frame, payload) {
            Ok(n) => n,
            Err(e) => {
                drop(st);
                let _ = send_reject(&mut writer, &e.to_string());
                return Err(e);
            }
        };
        since_ack += 1;
        since_ack_bytes += payload.len() as u64;
        if !matches!(next, Next::Continue) || st.pace.waiting > 0 {
            inner.cond.notify_all();
        }
        let ack_now = match next {
            Next::Stop => return Ok(()),
            Next::Continue => {
                since_ack >= ACK_EVERY
                    || since_ack_bytes >= ACK_BYTES
                    || !input_waiting(&reader, probe)?
            }
            Next::AckNow | Next::Pause(_) => true,
        };
        if ack_now && st.applied_seq > acked {
            let ack = Frame::Ack {
                seq: st.applied_seq,
                buffered: st.buf.stats().footprint(),
            };
            acked = st.applied_seq;
            since_ack = 0;
            since_ack_bytes = 0;
            drop(st);
            write_frame(&mut writer, ack, &[])?;
            st = inner.lock();
        }
        if let Next::Pause(epoch) = next {
            let Some(probe) = probe else {
                st.buf.drop_all()?;
                st.committed = epoch;
                continue;
            };
            while st.committed < epoch && !st.stop && st.phase == SecondaryPhase::Replicating {
                st = inner
                    .cond
                    .wait_timeout(st, PAUSED_PROBE)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                if st.committed < epoch && !st.stop && peer_gone(probe)? {
                    return Err(framing::Error::PeerClosed.into());
                }
            }
            if st.stop {
                return Ok(());
            }
        }
    }
}

/// Checks one frame against the state and applies it.
fn apply(st: &mut State, disk_len: u64, frame: Frame, payload: &[u8]) -> Result<Next> {
    if let Some(seq) = frame.seq() {
        if matches!(frame, Frame::Ack { .. }) {
            return Err(Error::Protocol("an Ack frame from the primary".into()));
        }
        if seq != st.applied_seq.wrapping_add(1) {
            return Err(Error::Protocol(format!(
                "frame sequence {seq} where {} was due",
                st.applied_seq.wrapping_add(1)
            )));
        }
    }
    frame.check_disk(disk_len)?;
    let wrong = |what: &str, st: &State| {
        Err(Error::Protocol(format!(
            "{what} while {}",
            st.phase.words()
        )))
    };
    let next = match frame {
        Frame::Write { seq, offset, .. } => {
            if st.phase != SecondaryPhase::Replicating {
                return wrong("a write", st);
            }
            st.buf.primary_write(offset, payload)?;
            st.applied_seq = seq;
            st.writes += 1;
            st.write_bytes += payload.len() as u64;
            Next::Continue
        }
        Frame::SyncData { seq, offset, .. } => {
            if st.phase != SecondaryPhase::Syncing {
                return wrong("resync data", st);
            }
            st.buf.direct_write(offset, payload)?;
            st.applied_seq = seq;
            st.sync_bytes += payload.len() as u64;
            Next::Continue
        }
        Frame::SyncDone { seq, epoch } => {
            if st.phase != SecondaryPhase::Syncing {
                return wrong("the end of a resync", st);
            }
            st.buf.disk().sync()?;
            st.phase = SecondaryPhase::Replicating;
            st.committed = epoch;
            st.applied_seq = seq;
            tracing::info!(epoch, "secondary: resync complete");
            Next::AckNow
        }
        Frame::Flush { seq } => {
            // Made durable at the epoch's commit (see SecondaryDisk::commit). Writeback
            // starts now, so that the commit's sync, which the checkpoint waits for, finds
            // little left to write; at most every WRITEBACK_EVERY, since a guest that
            // flushes after every small write would otherwise turn each flush into disk
            // I/O here (in `colo pair`, on one shared disk, that competed with the
            // primary's own flushes). A failure here costs only that head start.
            st.flush_pending = true;
            st.pace.primary += 1;
            if st
                .last_writeback
                .is_none_or(|t| t.elapsed() >= WRITEBACK_EVERY)
            {
                st.last_writeback = Some(Instant::now());
                let _ = st.buf.disk().start_writeback();
            }
            st.applied_seq = seq;
            // Nothing on the primary waits for a flush: it is acknowledged with the frames
            // around it, not at once (an acknowledgement per guest flush cost both sides a
            // send and a wake-up per request).
            Next::Continue
        }
        Frame::Checkpoint { seq, epoch } => {
            if st.phase != SecondaryPhase::Replicating {
                return wrong("an epoch marker", st);
            }
            let after = st.last_marker.unwrap_or(0).max(st.committed);
            if epoch <= after {
                return Err(Error::EpochOrder { epoch, after });
            }
            st.last_marker = Some(epoch);
            st.applied_seq = seq;
            // The primary's flushes after this one belong to the next epoch.
            st.pace.primary = 0;
            Next::Pause(epoch)
        }
        Frame::Goodbye => Next::Stop,
        Frame::Reject { .. } => {
            return Err(Error::Rejected(
                String::from_utf8_lossy(payload).into_owned(),
            ));
        }
        other => {
            return Err(Error::Protocol(format!(
                "unexpected {other:?} from the primary"
            )));
        }
    };
    Ok(next)
}
