//! `colo bench transport`: the page-push path against its two limits, in one run.
//!
//! 1. Start the receiver process (this executable again), map and pre-fault the source
//!    region, fill it with random bytes, and choose the pages of every case.
//! 2. Connect the control channel and run the handshake.
//! 3. Baselines per case: an in-process memcpy of the case's runs into a second pre-faulted
//!    region, and as many bytes over one plain TCP stream to the receiver (the stream is
//!    opened once and kept for every case and rep, as a push session keeps its streams).
//! 4. Per stream count, one push session: every case is pushed `reps` times with
//!    `push_epoch`; after each, the receiver's checksum of the committed pages must equal
//!    the source's, or the benchmark fails.
//!
//! Only the transfers are timed: checksums, scribbling and the conversation with the
//! receiver happen outside. The same spans are measured in CPU seconds on both sides (the
//! receiver reports its own, see [`super::protocol`]): sender plus receiver per GiB, for
//! the push and for the raw stream, since on a 2-core host the push competes with both
//! guests for CPU.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use colo_memory::Region;
use colo_transport::control::Role;
use colo_transport::push::{EpochStats, PushSender, RegionDesc, WriteRun, push_epoch};
use colo_transport::tcp::{TcpPushOptions, TcpPushSender};

use super::args::Plan;
use super::child::ReceiverProcess;
use super::cpu::Cpu;
use super::error::{Error, Result};
use super::pages::{self, PAGE_SIZE, SplitMix64};
use super::protocol::{Reply, Request, hello};
use super::report::{CaseKind, CaseResult, CpuRep, PushResult, Report, Sample, fmt_bytes};
use super::sock;

/// One case: the pages it pushes, as a bitmap and as runs.
#[derive(Debug)]
struct Case {
    name: String,
    kind: CaseKind,
    bitmap: colo_memory::PageBitmap,
    runs: Vec<WriteRun>,
    pages: u64,
    bytes: u64,
    /// Checksum of the case's pages in the source region.
    checksum: u64,
}

/// Runs the benchmark and prints its results (table, or JSON with `plan.json`).
///
/// # Errors
/// A mapping, transport, socket or process failure, or a checksum mismatch.
pub fn run(plan: &Plan) -> Result<()> {
    let pair_id = pair_id();
    let len = plan.size as usize;
    tracing::info!(
        "starting the receiver process; both sides map and pre-fault {}",
        fmt_bytes(plan.size)
    );
    let mut child = ReceiverProcess::spawn(
        plan.size,
        pair_id,
        plan.corrupt_for_test,
        plan.ofi.as_deref(),
    )?;

    let t = Instant::now();
    let source = Arc::new(Region::anonymous(len).map_err(Error::transport("mapping the source"))?);
    tracing::info!(
        secs = secs(t),
        "source region mapped; filling it with random bytes"
    );
    let t = Instant::now();
    pages::fill_random(&source, plan.seed);
    tracing::info!(
        secs = secs(t),
        "source filled; mapping the memcpy destination"
    );
    let t = Instant::now();
    let copy_dst =
        Region::anonymous(len).map_err(Error::transport("mapping the memcpy destination"))?;
    tracing::info!(secs = secs(t), "memcpy destination mapped; choosing pages");
    let cases = build_cases(plan, &source)?;

    tracing::info!("waiting for the receiver to connect");
    child.connect(&hello(Role::Primary, pair_id, plan.size)?)?;
    tracing::info!("receiver connected; handshake done");

    let mut results: Vec<CaseResult> = cases
        .iter()
        .map(|c| CaseResult {
            name: c.name.clone(),
            kind: c.kind,
            pages: c.pages,
            runs: c.runs.len() as u64,
            memcpy: Sample::new(c.bytes),
            raw: Sample::new(c.bytes),
            push: Vec::new(),
        })
        .collect();

    let mut raw = raw_open(&mut child)?;
    for (case, res) in cases.iter().zip(&mut results) {
        for rep in 1..=plan.reps {
            let s = memcpy_rep(&source, &copy_dst, &case.runs)?;
            tracing::debug!(case = %case.name, rep, secs = s, gibs = res.memcpy.rate(s), "memcpy");
            res.memcpy.secs.push(s);
        }
        for rep in 1..=plan.reps {
            let (s, cpu) = raw_rep(&mut child, &mut raw, &source, case.bytes)?;
            tracing::debug!(case = %case.name, rep, secs = s, gibs = res.raw.rate(s), ?cpu, "raw tcp");
            res.raw.secs.push(s);
            res.raw.cpu.push(cpu);
        }
        tracing::info!(
            "baselines {}: memcpy {:.2} GiB/s, raw tcp {:.2} GiB/s, {:.3} CPU s/GiB (medians)",
            case.name,
            res.memcpy.median(),
            res.raw.median(),
            res.raw.cpu_per_gib().unwrap_or(0.0)
        );
    }

    drop(raw);
    for &streams in &plan.streams {
        let plain = Mode::Tcp { sealed: false };
        push_session(
            &mut child,
            &source,
            plan,
            streams,
            plain,
            &cases,
            &mut results,
        )?;
        if plan.encrypt {
            let sealed = Mode::Tcp { sealed: true };
            push_session(
                &mut child,
                &source,
                plan,
                streams,
                sealed,
                &cases,
                &mut results,
            )?;
        }
    }
    if let Some(provider) = &plan.ofi {
        let ofi = Mode::Ofi(provider);
        push_session(&mut child, &source, plan, 1, ofi, &cases, &mut results)?;
    }
    child.finish()?;

    let report = Report {
        size: plan.size,
        page_size: PAGE_SIZE,
        reps: plan.reps,
        streams: plan.streams.clone(),
        batch_bytes: plan.opts.batch_bytes,
        batch_runs: plan.opts.batch_runs,
        seed: plan.seed,
        ofi_provider: plan.ofi.clone(),
        cases: results,
    };
    if plan.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn secs(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1000.0).round() / 1000.0
}

/// A pair id unique enough for one run on one machine.
fn pair_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// The random-page cases, then the contiguous one, with their source checksums.
fn build_cases(plan: &Plan, source: &Region) -> Result<Vec<Case>> {
    let pages = plan.size / u64::from(PAGE_SIZE);
    let mut rng = SplitMix64::new(plan.seed.rotate_left(32) ^ 0xD1B5_4A32_D192_ED03);
    let mut cases = Vec::with_capacity(plan.random_pages.len() + 1);
    for &n in &plan.random_pages {
        let bitmap = pages::random_bitmap(&mut rng, pages, n);
        let runs = pages::runs_from_bitmap(&bitmap);
        cases.push(Case {
            name: format!("random-{n}"),
            kind: CaseKind::Random,
            runs,
            pages: n,
            bytes: n * u64::from(PAGE_SIZE),
            checksum: 0,
            bitmap: colo_memory::PageBitmap::from_words(bitmap, pages)
                .map_err(Error::transport("drawing the pages"))?,
        });
    }
    cases.push(Case {
        name: "contiguous".into(),
        kind: CaseKind::Contiguous,
        bitmap: colo_memory::PageBitmap::from_words(pages::full_bitmap(pages), pages)
            .map_err(Error::transport("marking every page"))?,
        runs: vec![WriteRun::pages(0, pages, PAGE_SIZE)],
        pages,
        bytes: plan.size,
        checksum: 0,
    });
    for c in &mut cases {
        c.checksum = pages::checksum(source, c.bitmap.words())
            .map_err(Error::transport("checksumming the source"))?;
        tracing::info!(
            "case {}: {} pages in {} runs, {}",
            c.name,
            c.pages,
            c.runs.len(),
            fmt_bytes(c.bytes)
        );
    }
    Ok(cases)
}

/// One in-process copy of the runs: the copy limit.
fn memcpy_rep(source: &Region, dst: &Region, runs: &[WriteRun]) -> Result<f64> {
    let t = Instant::now();
    for r in runs {
        dst.copy_from(r.dst, source, r.src, r.len)
            .map_err(Error::transport("copying a run"))?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Opens the raw baseline's single TCP stream to the receiver.
fn raw_open(child: &mut ReceiverProcess) -> Result<TcpStream> {
    child.request(Request::RawOpen)?;
    let port = match child.reply()? {
        Reply::RawPort(p) => p,
        other => return Err(Error::Child(format!("expected raw-port, got {other:?}"))),
    };
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(Error::io("connecting the raw stream"))
}

/// One raw transfer of `bytes` on the stream, timed from the first write until the
/// receiver's acknowledgement: the socket limit. Returns the seconds and the CPU of both
/// sides.
fn raw_rep(
    child: &mut ReceiverProcess,
    s: &mut TcpStream,
    source: &Region,
    bytes: u64,
) -> Result<(f64, CpuRep)> {
    child.request(Request::Raw(bytes))?;
    match child.reply()? {
        Reply::RawReady(n) if n == bytes => {}
        other => {
            return Err(Error::Child(format!(
                "expected raw-ready {bytes}, got {other:?}"
            )));
        }
    }
    let (t, cpu) = (Instant::now(), Cpu::now());
    sock::send_region(s, source, bytes).map_err(Error::io("sending the raw stream"))?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)
        .map_err(Error::io("waiting for the raw acknowledgement"))?;
    let secs = t.elapsed().as_secs_f64();
    let sender = Cpu::now() - cpu;
    match child.reply()? {
        Reply::RawDone(n, receiver) if n == bytes => Ok((secs, CpuRep { sender, receiver })),
        other => Err(Error::Child(format!(
            "expected raw-done {bytes}, got {other:?}"
        ))),
    }
}

/// What a push session pushes with.
#[derive(Debug, Clone, Copy)]
enum Mode<'a> {
    /// TCP streams, sealed or not.
    Tcp { sealed: bool },
    /// One libfabric endpoint of this provider.
    Ofi(&'a str),
}

/// A push session's sender.
enum Tx {
    Tcp(Box<TcpPushSender>),
    #[cfg(feature = "ofi")]
    Ofi(Box<colo_transport::verbs::VerbsSender<colo_transport::ofi::OfiEndpoint>>),
}

impl Tx {
    fn push(&mut self) -> &mut dyn PushSender {
        match self {
            Self::Tcp(t) => t.as_mut(),
            #[cfg(feature = "ofi")]
            Self::Ofi(t) => t.as_mut(),
        }
    }

    /// Ends the session: TCP says goodbye on every stream; the libfabric sender sends its
    /// close message (a reliable datagram endpoint has no connection to shut down).
    fn close(self) -> Result<()> {
        match self {
            Self::Tcp(t) => t
                .close()
                .map_err(Error::transport("closing the push sender")),
            #[cfg(feature = "ofi")]
            Self::Ofi(t) => t
                .close()
                .map_err(Error::transport("closing the libfabric push sender")),
        }
    }
}

#[cfg(feature = "ofi")]
fn connect_ofi(desc: RegionDesc, source: &Arc<Region>, provider: &str) -> Result<Tx> {
    let opts = colo_transport::ofi::OfiOptions {
        provider: Some(provider.to_string()),
        ..colo_transport::ofi::OfiOptions::default()
    };
    colo_transport::ofi::connect(
        Ipv4Addr::LOCALHOST.into(),
        desc,
        Arc::clone(source),
        &opts,
        colo_transport::verbs::VerbsOptions::default(),
    )
    .map(|s| Tx::Ofi(Box::new(s)))
    .map_err(Error::transport("connecting the libfabric push sender"))
}

#[cfg(not(feature = "ofi"))]
fn connect_ofi(_desc: RegionDesc, _source: &Arc<Region>, _provider: &str) -> Result<Tx> {
    Err(Error::InvalidArgs(
        "--transport ofi: this build has no libfabric support (build with --features ofi)".into(),
    ))
}

/// One push session with `streams` streams (TCP) or one libfabric endpoint: every case,
/// `reps` times, each epoch checked.
fn push_session(
    child: &mut ReceiverProcess,
    source: &Arc<Region>,
    plan: &Plan,
    streams: usize,
    mode: Mode<'_>,
    cases: &[Case],
    results: &mut [CaseResult],
) -> Result<()> {
    let (sealed, ofi) = match mode {
        Mode::Tcp { sealed } => (sealed, false),
        Mode::Ofi(_) => (false, true),
    };
    child.request(match mode {
        Mode::Tcp { sealed: true } => Request::PushSealed,
        Mode::Tcp { sealed: false } => Request::Push,
        Mode::Ofi(_) => Request::PushOfi,
    })?;
    let desc = child.region()?;
    if desc.len != plan.size || desc.page_size != PAGE_SIZE {
        return Err(Error::Control(format!(
            "the receiver announced {} bytes of {}-byte pages; expected {} of {PAGE_SIZE}",
            desc.len, desc.page_size, plan.size
        )));
    }
    let mut tx = match mode {
        Mode::Tcp { sealed } => {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, desc.port));
            let opts = TcpPushOptions {
                streams,
                ..plan.opts.clone()
            };
            Tx::Tcp(Box::new(
                TcpPushSender::connect(
                    addr,
                    desc,
                    Arc::clone(source),
                    &super::protocol::bench_credentials().encrypted(sealed),
                    opts,
                )
                .map_err(Error::transport("connecting the push sender"))?,
            ))
        }
        Mode::Ofi(provider) => connect_ofi(desc, source, provider)?,
    };
    let mut epochs = 0;
    for (case, res) in cases.iter().zip(results.iter_mut()) {
        let mut sample = Sample::new(case.bytes);
        let mut verified = 0;
        for rep in 1..=plan.reps {
            let (t, cpu) = (Instant::now(), Cpu::now());
            let stats = push_epoch(tx.push(), case.runs.iter().copied(), &case.bitmap)
                .map_err(Error::transport("pushing an epoch"))?;
            let s = t.elapsed().as_secs_f64();
            let sender = Cpu::now() - cpu;
            let receiver = check_epoch(child.reply()?, case, &stats, streams, rep)?;
            let cpu = CpuRep { sender, receiver };
            tracing::debug!(case = %case.name, streams, rep, secs = s, gibs = sample.rate(s), ?cpu, "push");
            sample.secs.push(s);
            sample.cpu.push(cpu);
            verified += 1;
            epochs += 1;
        }
        tracing::info!(
            "push {} with {streams} {}{}: {:.2} GiB/s median, {:.2} best, {:.3} CPU s/GiB; \
             checksums match",
            case.name,
            if ofi {
                "libfabric endpoint(s)"
            } else {
                "stream(s)"
            },
            if sealed { ", sealed" } else { "" },
            sample.median(),
            sample.best(),
            sample.cpu_per_gib().unwrap_or(0.0)
        );
        res.push.push(PushResult {
            streams,
            sealed,
            ofi,
            sample,
            verified,
        });
    }
    tx.close()?;
    match child.reply()? {
        Reply::PushDone(n) if n == epochs => Ok(()),
        other => Err(Error::Child(format!(
            "expected push-done {epochs}, got {other:?}"
        ))),
    }
}

/// Compares the receiver's report of one epoch with what was pushed; returns the CPU the
/// receiver says the epoch cost it.
fn check_epoch(
    reply: Reply,
    case: &Case,
    stats: &EpochStats,
    streams: usize,
    rep: u32,
) -> Result<Cpu> {
    let Reply::Checksum {
        epoch,
        sum,
        pages,
        bytes,
        cpu,
    } = reply
    else {
        return Err(Error::Child(format!("expected a checksum, got {reply:?}")));
    };
    if sum != case.checksum || pages != case.pages {
        return Err(Error::ChecksumMismatch {
            case: case.name.clone(),
            streams,
            rep,
            epoch,
            expected: case.checksum,
            expected_pages: case.pages,
            found: sum,
            found_pages: pages,
        });
    }
    if epoch != stats.epoch || bytes != case.bytes || stats.bytes != case.bytes {
        return Err(Error::Child(format!(
            "epoch {epoch} of {bytes} bytes committed; pushed epoch {} of {} bytes ({} \
             expected)",
            stats.epoch, stats.bytes, case.bytes
        )));
    }
    Ok(cpu)
}
