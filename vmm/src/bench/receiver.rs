//! The receiver process of `colo bench transport` (`colo bench transport-receiver`): it
//! holds the destination region, receives pushed epochs and raw streams, and checks every
//! epoch. See [`super::protocol`] for the conversation.

use std::io::{BufRead, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use colo_memory::Region;
use colo_transport::control::{Conn, ControlChannel, Message, Role};
use colo_transport::push::PushReceiver;
use colo_transport::tcp::TcpPushListener;

use super::args::ReceiverArgs;
use super::cpu::Cpu;
use super::error::{Error, Result};
use super::pages::{self, PAGE_SIZE};
use super::protocol::{Reply, Request, hello};
use super::sock;

/// The byte every destination page holds before data lands in it, so that a check never
/// passes on data an earlier epoch or stream left behind.
const SCRIBBLE: u8 = 0xA5;

/// How long the parent may take to connect a stream.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait for the next epoch of a push session.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the receiver until the parent says quit, closes stdin, or closes the control
/// channel.
///
/// # Errors
/// A non-loopback control address, a transport or socket failure, or a request it does
/// not understand.
pub fn run(args: &ReceiverArgs) -> Result<()> {
    let _span = tracing::info_span!("receiver").entered();
    if !args.control.ip().is_loopback() {
        return Err(Error::InvalidArgs(format!(
            "the control address {} is not a loopback address",
            args.control
        )));
    }
    let len = args.size as usize;
    tracing::debug!(
        bytes = args.size,
        "mapping and pre-faulting the destination region"
    );
    let region = Arc::new(Region::anonymous(len).map_err(Error::transport("mapping the region"))?);
    let mut ctrl = ControlChannel::connect(&args.control.to_string(), ACCEPT_TIMEOUT)
        .map_err(Error::transport("connecting the control channel"))?;
    ctrl.handshake(&hello(Role::Secondary, args.pair_id, args.size)?)
        .map_err(Error::transport("the control handshake"))?;
    watch_control(
        ctrl.try_clone()
            .map_err(Error::transport("cloning the control channel"))?,
    )?;
    let mut out = std::io::stdout().lock();
    let mut raw: Option<TcpStream> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(Error::io("reading a request"))?;
        match Request::parse(&line) {
            Some(Request::Push) => {
                let kind = Session::Tcp { sealed: false };
                push_session(&mut ctrl, &region, args.corrupt_for_test, kind, &mut out)?;
            }
            Some(Request::PushSealed) => {
                let kind = Session::Tcp { sealed: true };
                push_session(&mut ctrl, &region, args.corrupt_for_test, kind, &mut out)?;
            }
            Some(Request::PushOfi) => {
                let provider = args
                    .ofi_provider
                    .as_deref()
                    .ok_or_else(|| Error::Child("push-ofi without --ofi-provider".into()))?;
                let kind = Session::Ofi(provider);
                push_session(&mut ctrl, &region, args.corrupt_for_test, kind, &mut out)?;
            }
            Some(Request::RawOpen) => raw = Some(raw_open(&mut out)?),
            Some(Request::Raw(bytes)) => {
                let s = raw
                    .as_mut()
                    .ok_or_else(|| Error::Child("raw transfer before raw-open".into()))?;
                raw_transfer(s, bytes, &region, &mut out)?;
            }
            Some(Request::Quit) => return Ok(()),
            None => return Err(Error::Child(format!("unknown request {line:?}"))),
        }
    }
    tracing::debug!("stdin closed: the benchmark is gone");
    Ok(())
}

/// Exits the process when the control channel closes or says goodbye, wherever the main
/// thread is blocked.
fn watch_control(mut ch: ControlChannel<Conn>) -> Result<()> {
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("control-watch".into())
        .spawn(move || {
            let _span = span.entered();
            loop {
                match ch.recv() {
                    Ok(Message::Goodbye) => {
                        tracing::debug!("control: goodbye");
                        std::process::exit(0);
                    }
                    Ok(other) => tracing::warn!(kind = ?other.kind(), "control message ignored"),
                    Err(e) => {
                        tracing::error!(error = %e, "control channel closed: the benchmark is gone");
                        std::process::exit(1);
                    }
                }
            }
        })
        .map_err(Error::io("starting the control watcher"))?;
    Ok(())
}

fn reply(out: &mut impl Write, r: Reply) -> Result<()> {
    writeln!(out, "{}", r.to_line())
        .and_then(|()| out.flush())
        .map_err(Error::io("writing a reply"))
}

/// The transport of a push session.
#[derive(Debug, Clone, Copy)]
enum Session<'a> {
    /// TCP streams, sealed or not.
    Tcp { sealed: bool },
    /// One libfabric endpoint of this provider.
    Ofi(&'a str),
}

/// Binds the session's listener, announces its region to the parent and accepts the
/// sender.
fn accept_session(
    ctrl: &mut ControlChannel<Conn>,
    region: &Arc<Region>,
    kind: Session<'_>,
) -> Result<Box<dyn PushReceiver>> {
    match kind {
        Session::Tcp { sealed } => {
            let listener = TcpPushListener::bind(
                "127.0.0.1:0",
                Arc::clone(region),
                PAGE_SIZE,
                super::protocol::bench_credentials().encrypted(sealed),
            )
            .map_err(Error::transport("binding the push listener"))?;
            ctrl.send(&Message::Region(*listener.desc()))
                .map_err(Error::transport("announcing the push region"))?;
            Ok(Box::new(
                listener
                    .accept(ACCEPT_TIMEOUT)
                    .map_err(Error::transport("accepting the push streams"))?,
            ))
        }
        Session::Ofi(provider) => accept_ofi(ctrl, region, provider),
    }
}

#[cfg(feature = "ofi")]
fn accept_ofi(
    ctrl: &mut ControlChannel<Conn>,
    region: &Arc<Region>,
    provider: &str,
) -> Result<Box<dyn PushReceiver>> {
    use colo_transport::ofi::{OfiListener, OfiOptions};
    let opts = OfiOptions {
        provider: Some(provider.to_string()),
        ..OfiOptions::default()
    };
    let lo = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
    let mut listener = OfiListener::bind(lo, Arc::clone(region), PAGE_SIZE, &opts)
        .map_err(Error::transport("binding the libfabric push listener"))?;
    ctrl.send(&Message::Region(*listener.desc()))
        .map_err(Error::transport("announcing the push region"))?;
    Ok(Box::new(listener.accept(ACCEPT_TIMEOUT).map_err(
        Error::transport("accepting the libfabric push connection"),
    )?))
}

#[cfg(not(feature = "ofi"))]
fn accept_ofi(
    _ctrl: &mut ControlChannel<Conn>,
    _region: &Arc<Region>,
    _provider: &str,
) -> Result<Box<dyn PushReceiver>> {
    Err(Error::InvalidArgs(
        "this build has no libfabric support (build with --features ofi)".into(),
    ))
}

/// Whether `e` is the sender ending the session: its streams closed (TCP) or its endpoint
/// gone (libfabric: the connection shut down, its receives flushed).
fn sender_left(e: &colo_transport::Error) -> bool {
    use colo_transport::verbs::WcStatus;
    matches!(
        e,
        colo_transport::Error::Frame(colo_transport::framing::Error::PeerClosed)
            | colo_transport::Error::Completion {
                status: WcStatus::RetryExceeded | WcStatus::Flushed,
                ..
            }
    )
}

/// One push session: announce a fresh push listener, then check and release every epoch
/// until the sender says goodbye.
fn push_session(
    ctrl: &mut ControlChannel<Conn>,
    region: &Arc<Region>,
    corrupt: bool,
    kind: Session<'_>,
    out: &mut impl Write,
) -> Result<()> {
    pages::fill_byte(region, SCRIBBLE);
    let mut rx = accept_session(ctrl, region, kind)?;
    let mut epochs = 0;
    // The sender pushes an epoch only after the reply of the previous one, so the CPU from
    // one release to the next commit is what taking in that epoch cost.
    let mut mark = Cpu::now();
    loop {
        let c = match rx.next_commit(COMMIT_TIMEOUT) {
            Ok(c) => c,
            Err(e) if sender_left(&e) => break,
            Err(e) => return Err(Error::transport("waiting for an epoch commit")(e)),
        };
        let cpu = Cpu::now() - mark;
        if corrupt {
            if let Some(p) = pages::set_pages(c.bitmap.words()).next() {
                tracing::warn!(
                    page = p,
                    "corrupting the epoch, as asked (--corrupt-for-test)"
                );
                let off = p * u64::from(PAGE_SIZE) + 100;
                let mut b = [0u8];
                region
                    .read_at(off, &mut b)
                    .and_then(|()| region.write_at(off, &[!b[0]]))
                    .map_err(Error::transport("corrupting an epoch"))?;
            }
        }
        let sum = pages::checksum(region, c.bitmap.words())
            .map_err(Error::transport("checksumming an epoch"))?;
        let pages = pages::count_pages(c.bitmap.words());
        pages::scribble(region, c.bitmap.words(), SCRIBBLE)
            .map_err(Error::transport("scribbling an epoch"))?;
        rx.release(c.epoch)
            .map_err(Error::transport("releasing an epoch"))?;
        tracing::debug!(epoch = c.epoch, pages, bytes = c.bytes, "epoch checked");
        mark = Cpu::now();
        reply(
            out,
            Reply::Checksum {
                epoch: c.epoch,
                sum,
                pages,
                bytes: c.bytes,
                cpu,
            },
        )?;
        epochs += 1;
    }
    drop(rx);
    reply(out, Reply::PushDone(epochs))
}

/// Opens the raw-TCP baseline's stream: a plain listener, its port to the parent, one
/// connection.
fn raw_open(out: &mut impl Write) -> Result<TcpStream> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(Error::io("binding the raw listener"))?;
    let port = l
        .local_addr()
        .map_err(Error::io("binding the raw listener"))?
        .port();
    reply(out, Reply::RawPort(port))?;
    sock::accept_within(&l, ACCEPT_TIMEOUT, || Ok(()))
        .map_err(Error::io("accepting the raw stream"))
}

/// One raw-TCP baseline transfer: `bytes` read in 1 MiB calls into the region,
/// acknowledged with one byte.
fn raw_transfer(
    s: &mut TcpStream,
    bytes: u64,
    region: &Region,
    out: &mut impl Write,
) -> Result<()> {
    if bytes > region.len() as u64 {
        return Err(Error::Child(format!(
            "a raw transfer of {bytes} bytes does not fit the region of {} bytes",
            region.len()
        )));
    }
    reply(out, Reply::RawReady(bytes))?;
    let mark = Cpu::now();
    sock::recv_region(s, region, bytes).map_err(Error::io("receiving the raw stream"))?;
    s.write_all(&[1])
        .map_err(Error::io("acknowledging the raw stream"))?;
    let cpu = Cpu::now() - mark;
    reply(out, Reply::RawDone(bytes, cpu))
}
