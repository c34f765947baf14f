//! Where the network device's frames go and come from: a tap device, length-prefixed
//! frames over a Unix stream socket (4-byte big-endian length, then the frame: QEMU's
//! `-netdev socket`/chardev framing, so netcmp or a QEMU VM can sit on the other end), or
//! an in-process channel.
//!
//! Every backend delivers received frames into a channel that the device thread
//! (`runner`) drains, writing an eventfd after each so that the thread wakes from its
//! wait on the queues' ioeventfds; transmitted frames go out through a `FrameSink`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use colo_netcmp::framing::PACE_HOLD;
use crossbeam_channel::{Receiver, SendError, Sender};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::error::{Error, Result};

/// Largest frame accepted from a backend.
pub(crate) const MAX_FRAME: usize = 65_536;
/// Frames queued towards the guest before the oldest are dropped (as a NIC would).
pub(crate) const RX_QUEUE: usize = 1024;

/// The transmit side of a backend.
pub(crate) trait FrameSink: Send {
    /// Sends one Ethernet frame.
    ///
    /// # Errors
    /// The backend's I/O error.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;

    /// Sends a commit marker in order with the frames (see `Machine::net_commit_marker`).
    ///
    /// # Errors
    /// `Unsupported` for a backend without markers, or its I/O error.
    fn marker(&mut self) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// Sends a role word in order with the frames (see `Machine::net_role_word`).
    ///
    /// # Errors
    /// `Unsupported` for a backend without words, or its I/O error.
    fn role_word(&mut self, _word: colo_netcmp::framing::RoleWord) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Pacing of a secondary VM by the COLO proxy (netcmp's `secondary_lead`). On a socket
/// backend the proxy sends one-byte frames, never Ethernet frames: `PACE_HOLD` when the
/// VM has run too far ahead of the primary (work each checkpoint would throw away), and
/// `PACE_GO` when it may go on. The vCPU thread does not enter the guest while held (see
/// `runner`), for a bounded time per wait. Off until enabled, and a disabled pace ignores
/// the proxy: only a secondary in COLO mode enables it, and failover disables it.
#[derive(Debug)]
pub(crate) struct Pace {
    state: AtomicU8,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

const PACE_OFF: u8 = 0;
const PACE_RUN: u8 = 1;
const PACE_HELD: u8 = 2;

impl Pace {
    fn new() -> Arc<Self> {
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        Arc::new(Self {
            state: AtomicU8::new(PACE_OFF),
            wake_tx,
            wake_rx,
        })
    }

    /// Honours the proxy's words from now on, or (`false`) ignores them. Either way a
    /// held VM goes on at once: a secondary calls this at each checkpoint, after which the
    /// proxy holds nothing (so a stray word cannot hold it longer than an epoch).
    pub(crate) fn set_enabled(&self, on: bool) {
        self.state
            .store(if on { PACE_RUN } else { PACE_OFF }, Ordering::SeqCst);
        let _ = self.wake_tx.try_send(());
    }

    /// The proxy's word: hold, or go on. Ignored while disabled.
    fn signal(&self, hold: bool) {
        let new = if hold { PACE_HELD } else { PACE_RUN };
        let _ = self
            .state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                (s != PACE_OFF).then_some(new)
            });
        if !hold {
            let _ = self.wake_tx.try_send(());
        }
    }

    /// Whether the proxy asked to hold the VM (and pacing is enabled).
    pub(crate) fn held(&self) -> bool {
        self.state.load(Ordering::SeqCst) == PACE_HELD
    }

    /// Ready when the VM may go on (or pacing was disabled).
    pub(crate) fn wake(&self) -> &Receiver<()> {
        &self.wake_rx
    }
}

/// A network backend: frames out through `sink`, frames in on `rx`.
pub struct NetBackend {
    /// Frames to transmit.
    pub(crate) sink: Box<dyn FrameSink>,
    /// Received frames.
    pub(crate) rx: Receiver<Vec<u8>>,
    /// Written after each frame put into `rx`.
    pub(crate) rx_ready: Arc<EventFd>,
    /// The proxy's pacing words (only a socket backend receives them).
    pub(crate) pace: Arc<Pace>,
    stop: Arc<AtomicBool>,
    /// What it is, for logs.
    pub(crate) name: String,
    /// False for [`NetBackend::none`]: the device is not announced to a Linux guest.
    connected: bool,
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for NetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBackend")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

struct ChannelSink(Sender<Vec<u8>>);

impl FrameSink for ChannelSink {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0
            .send(frame.to_vec())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "channel closed"))
    }
}

/// Sends frames towards the guest: into the backend's channel, then a wake-up of the
/// device thread.
#[derive(Debug, Clone)]
pub struct FrameSender {
    tx: Sender<Vec<u8>>,
    ready: Arc<EventFd>,
}

impl FrameSender {
    /// Queues `frame` for the guest, waiting while the queue is full.
    ///
    /// # Errors
    /// The frame back if the VM's backend is gone.
    pub fn send(&self, frame: Vec<u8>) -> std::result::Result<(), SendError<Vec<u8>>> {
        self.tx.send(frame)?;
        // A wake-up that cannot be written (the counter is full) is one already pending.
        let _ = self.ready.write(1);
        Ok(())
    }
}

/// The other end of a channel backend: frames from the guest, and a sender of frames to it.
#[derive(Debug)]
pub struct ChannelPeer {
    /// Frames the guest transmitted.
    pub from_guest: Receiver<Vec<u8>>,
    /// Frames for the guest.
    pub to_guest: FrameSender,
}

/// A new wake-up eventfd for received frames.
fn rx_event() -> Result<Arc<EventFd>> {
    EventFd::new(EFD_NONBLOCK)
        .map(Arc::new)
        .map_err(Error::io("create the receive eventfd"))
}

impl NetBackend {
    /// Whether frames go anywhere (not [`NetBackend::none`]).
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// An in-process channel backend and its peer.
    ///
    /// # Panics
    /// If no eventfd can be created (the process is out of file descriptors).
    pub fn channel() -> (Self, ChannelPeer) {
        let (to_guest, rx) = crossbeam_channel::bounded(RX_QUEUE);
        let (tx, from_guest) = crossbeam_channel::bounded(RX_QUEUE);
        let ready = rx_event().expect("an eventfd for the channel backend");
        (
            Self {
                sink: Box::new(ChannelSink(tx)),
                rx,
                rx_ready: Arc::clone(&ready),
                pace: Pace::new(),
                stop: Arc::default(),
                name: "channel".into(),
                connected: true,
            },
            ChannelPeer {
                from_guest,
                to_guest: FrameSender {
                    tx: to_guest,
                    ready,
                },
            },
        )
    }

    /// A backend without a network: frames out are dropped, none come in.
    ///
    /// # Panics
    /// If no eventfd can be created (the process is out of file descriptors).
    pub fn none() -> Self {
        struct Drop0;
        impl FrameSink for Drop0 {
            fn send(&mut self, _: &[u8]) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (_tx, rx) = crossbeam_channel::bounded(1);
        Self {
            sink: Box::new(Drop0),
            rx,
            rx_ready: rx_event().expect("an eventfd for the backend"),
            pace: Pace::new(),
            stop: Arc::default(),
            name: "none".into(),
            connected: false,
        }
    }

    /// Opens (creating if needed) the tap device `name`.
    ///
    /// # Errors
    /// [`Error::Tap`] naming the tap, the step and the OS error if /dev/net/tun cannot be
    /// opened or the device cannot be attached (not root, the name is in use by a non-tap
    /// device, or another process holds the tap); [`Error::Config`] for a bad name.
    pub fn tap(name: &str) -> Result<Self> {
        let tap_err = |what: &'static str| {
            let name = name.to_string();
            move |source| Error::Tap { name, what, source }
        };
        if name.is_empty() || name.len() >= 16 {
            return Err(Error::Config(format!(
                "tap name '{name}' must be 1 to 15 bytes"
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(tap_err("open /dev/net/tun"))?;
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            flags: i16,
            _pad: [u8; 22],
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as i16,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which IfReq matches in
        // size (40 bytes) and layout for the name and flags fields.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(tap_err("attach (TUNSETIFF)")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: dup returns a new descriptor we own (checked below).
        let dup = unsafe { libc::dup(file.as_raw_fd()) };
        if dup < 0 {
            return Err(tap_err("duplicate the descriptor")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `dup` is a fresh descriptor owned by nobody else.
        let reader = unsafe { File::from_raw_fd(dup) };
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crossbeam_channel::bounded(RX_QUEUE);
        let flag = Arc::clone(&stop);
        let rx_ready = rx_event()?;
        let ready = Arc::clone(&rx_ready);
        std::thread::Builder::new()
            .name(format!("tap-{name}"))
            .spawn(move || read_frames(reader, &tx, &ready, &flag, None))
            .map_err(Error::io("spawn the tap reader"))?;
        struct TapSink(File);
        impl FrameSink for TapSink {
            fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
                self.0.write_all(frame)
            }
        }
        Ok(Self {
            sink: Box::new(TapSink(file)),
            rx,
            rx_ready,
            pace: Pace::new(),
            stop,
            name: format!("tap {name}"),
            connected: true,
        })
    }

    /// Frames over a connected Unix stream socket, each preceded by its length as a 4-byte
    /// big-endian number.
    ///
    /// # Errors
    /// [`Error::Io`] if the socket cannot be cloned or the reader started.
    pub fn socket(stream: UnixStream) -> Result<Self> {
        let reader = stream.try_clone().map_err(Error::io("clone the socket"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crossbeam_channel::bounded(RX_QUEUE);
        let flag = Arc::clone(&stop);
        let pace = Pace::new();
        let words = Arc::clone(&pace);
        let rx_ready = rx_event()?;
        let ready = Arc::clone(&rx_ready);
        std::thread::Builder::new()
            .name("net-socket".into())
            .spawn(move || read_frames(reader, &tx, &ready, &flag, Some(&words)))
            .map_err(Error::io("spawn the socket reader"))?;
        /// The socket and a buffer reused for length + frame (one write per frame).
        struct SocketSink(UnixStream, Vec<u8>);
        impl FrameSink for SocketSink {
            fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
                // An empty frame is the commit marker on this stream (the proxy's
                // `commit_marker`); whatever the guest does, it never sends one.
                if frame.is_empty() {
                    return Err(std::io::ErrorKind::InvalidInput.into());
                }
                self.1.clear();
                self.1
                    .extend_from_slice(&(frame.len() as u32).to_be_bytes());
                self.1.extend_from_slice(frame);
                self.0.write_all(&self.1)
            }
            fn marker(&mut self) -> std::io::Result<()> {
                self.0.write_all(&0u32.to_be_bytes())
            }
            fn role_word(&mut self, word: colo_netcmp::framing::RoleWord) -> std::io::Result<()> {
                // A one-byte frame: shorter than any Ethernet header, so never the guest's.
                self.1.clear();
                self.1.extend_from_slice(&1u32.to_be_bytes());
                self.1.extend_from_slice(&word.encode());
                self.0.write_all(&self.1)
            }
        }
        Ok(Self {
            sink: Box::new(SocketSink(stream, Vec::with_capacity(4 + MAX_FRAME))),
            rx,
            rx_ready,
            pace,
            stop,
            name: "socket".into(),
            connected: true,
        })
    }
}

/// Reads frames until `stop`, EOF or an error. `framed` (a socket): a 4-byte big-endian
/// length precedes each frame, and a one-byte frame is the proxy's pacing word for it;
/// else (a tap) each read is one frame.
fn read_frames<R: Read + AsRawFd>(
    mut r: R,
    tx: &Sender<Vec<u8>>,
    ready: &EventFd,
    stop: &AtomicBool,
    framed: Option<&Pace>,
) {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut dropped = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, Duration::from_millis(100).as_millis() as i32) };
        if n <= 0 {
            continue;
        }
        let frame = if let Some(pace) = framed {
            let mut len = [0u8; 4];
            if r.read_exact(&mut len).is_err() {
                break;
            }
            let len = u32::from_be_bytes(len) as usize;
            if len == 0 || len > MAX_FRAME {
                tracing::warn!(len, "socket backend: bad frame length; closing");
                break;
            }
            if r.read_exact(&mut buf[..len]).is_err() {
                break;
            }
            if len == 1 {
                // Shorter than any Ethernet header: the proxy's word, not a frame.
                pace.signal(buf[0] == PACE_HOLD[0]);
                continue;
            }
            buf[..len].to_vec()
        } else {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf[..n].to_vec(),
            }
        };
        match tx.try_send(frame) {
            // A wake-up that cannot be written (the counter is full) is one already
            // pending.
            Ok(()) => {
                let _ = ready.write(1);
            }
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                dropped += 1;
                if dropped.is_power_of_two() {
                    tracing::warn!(dropped, "guest is not taking frames; dropping");
                }
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Waits up to 5 s for `f`.
    fn eventually(f: impl Fn() -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn role_words_and_markers_go_out_in_order_with_the_frames() {
        use colo_netcmp::framing::{Decoder, FromVm, MAX_FRAME, RoleWord};
        let (ours, mut proxy) = UnixStream::pair().unwrap();
        let mut b = NetBackend::socket(ours).unwrap();
        let frame = [0xCD; 20];
        b.sink.role_word(RoleWord::Follower).unwrap();
        b.sink.send(&frame).unwrap();
        b.sink.role_word(RoleWord::Alone).unwrap();
        b.sink.marker().unwrap();
        b.sink.role_word(RoleWord::Protected).unwrap();
        let mut wire = vec![0u8; 4 + 1 + 4 + 20 + 4 + 1 + 4 + 4 + 1];
        proxy.read_exact(&mut wire).unwrap();
        assert_eq!(&wire[..5], &[0, 0, 0, 1, b'F']);
        let mut d = Decoder::new(MAX_FRAME);
        d.feed(&wire);
        let got: Vec<FromVm> = std::iter::from_fn(|| d.next_frame().unwrap())
            .map(|f| FromVm::classify(f).unwrap())
            .collect();
        assert_eq!(
            got,
            vec![
                FromVm::Role(RoleWord::Follower),
                FromVm::Frame(frame.to_vec()),
                FromVm::Role(RoleWord::Alone),
                FromVm::Marker,
                FromVm::Role(RoleWord::Protected),
            ]
        );
    }

    #[test]
    fn the_proxys_one_byte_words_hold_a_socket_backend_only_while_pacing_is_on() {
        let (ours, mut proxy) = UnixStream::pair().unwrap();
        let b = NetBackend::socket(ours).unwrap();
        let word = |w: [u8; 1]| [0, 0, 0, 1, w[0]];
        let frame = [0u8, 0, 0, 14]
            .iter()
            .copied()
            .chain([0xAB; 14])
            .collect::<Vec<u8>>();
        // Off: a hold is read (not handed to the guest) and ignored.
        proxy
            .write_all(&word(colo_netcmp::framing::PACE_HOLD))
            .unwrap();
        proxy.write_all(&frame).unwrap();
        assert_eq!(
            b.rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            vec![0xAB; 14],
            "the word is not a frame for the guest"
        );
        assert!(!b.pace.held());
        // On: hold, then go (which also wakes a waiter).
        b.pace.set_enabled(true);
        proxy
            .write_all(&word(colo_netcmp::framing::PACE_HOLD))
            .unwrap();
        assert!(eventually(|| b.pace.held()), "held");
        while b.pace.wake().try_recv().is_ok() {}
        proxy
            .write_all(&word(colo_netcmp::framing::PACE_GO))
            .unwrap();
        assert!(eventually(|| !b.pace.held()), "let go");
        assert!(
            b.pace.wake().recv_timeout(Duration::from_secs(5)).is_ok(),
            "a waiter is woken"
        );
        // Disabling lets a held VM go at once and ignores later holds.
        proxy
            .write_all(&word(colo_netcmp::framing::PACE_HOLD))
            .unwrap();
        assert!(eventually(|| b.pace.held()));
        b.pace.set_enabled(false);
        assert!(!b.pace.held());
        proxy
            .write_all(&word(colo_netcmp::framing::PACE_HOLD))
            .unwrap();
        proxy.write_all(&frame).unwrap();
        b.rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(!b.pace.held(), "a disabled pace ignores the proxy");
    }
}
