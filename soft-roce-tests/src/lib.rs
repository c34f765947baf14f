//! Verbs push scenarios, written once over a [`Fabric`]: [`Sim`] (the in-process queue
//! pair, which runs everywhere) and [`Device`] (a real RDMA device named by the environment:
//! soft-RoCE in CI where the kernel has it, InfiniBand on clusters).
//!
//! `tests/verbs.rs` runs each scenario on both; the device variants are `#[ignore]`d and
//! run by `soft-roce-tests/run.sh`, which sets up rxe where the kernel supports it.
//!
//! Environment for the device: `COLO_RDMA_DEVICE` (e.g. `rxe0`), `COLO_RDMA_ADDR` (the IP
//! address of the device's netdev), optionally `COLO_RDMA_GID_INDEX`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use colo_memory::{GuestLayout, GuestRegion, PageBitmap, Region};
use colo_ramcache::RamCache;
use colo_transport::ofi::{self, OfiEndpoint, OfiListener, OfiOptions};
use colo_transport::push::{PushReceiver, RegionDesc, WriteRun, push_epoch};
use colo_transport::rdma::{RdmaEndpoint, RdmaListener, RdmaOptions, connect_endpoint};
use colo_transport::verbs::sim::{self, Faults, SimConfig, SimEndpoint};
use colo_transport::verbs::{
    Caps, Endpoint, Sge, VerbsOptions, VerbsReceiver, VerbsSender, Wc, WcStatus, WriteWr, message,
};
use colo_transport::{Error, Result};

/// Page size of every scenario.
pub const PAGE: u32 = 4096;
const T: Duration = Duration::from_secs(10);

/// Where the queue pairs come from.
pub trait Fabric {
    /// The endpoint type.
    type Ep: Endpoint + 'static;

    /// A connected pair: the sender's endpoint (reading `source`), the receiver's (owning
    /// `target`), and the target's descriptor as the receiver publishes it.
    ///
    /// # Errors
    /// Setup failures.
    fn endpoints(
        &self,
        target: Arc<Region>,
        source: Arc<Region>,
    ) -> Result<(Self::Ep, Self::Ep, RegionDesc)>;

    /// How the sender sees a write the target refuses (a bad key): a remote access error
    /// on verbs.
    fn refusal(&self) -> Refusal {
        Refusal::Status(WcStatus::RemoteAccess)
    }

    /// The sender's options: the defaults, with a short completion wait where a refusal
    /// shows as silence.
    fn sender_options(&self) -> VerbsOptions {
        match self.refusal() {
            Refusal::Status(_) => VerbsOptions::default(),
            Refusal::Silence => VerbsOptions {
                completion_timeout: Duration::from_secs(2),
                ..VerbsOptions::default()
            },
        }
    }
}

/// How a fabric shows the sender a write its target refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The write completes with this status.
    Status(WcStatus),
    /// The write never completes: libfabric 1.17's shm drops a command it cannot place
    /// (it logs "unknown key") and answers nothing, so the sender's wait for the
    /// completion times out, or its next post does once the queue behind it is full.
    Silence,
}

impl Refusal {
    /// Whether `outcome` is this refusal: exactly its status (`exact`), or any failed
    /// completion; or, for silence, the wait or the post timing out.
    pub fn seen_in(self, outcome: &Result<()>, exact: bool) -> bool {
        match (self, outcome) {
            (Self::Status(want), Err(Error::Completion { status, .. })) => {
                !exact || *status == want
            }
            (Self::Silence, Err(Error::Timeout(..) | Error::Post(_))) => true,
            _ => false,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(s) => write!(f, "{s}"),
            Self::Silence => f.write_str("no completion (a timeout)"),
        }
    }
}

/// The in-process queue pair.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sim;

impl Fabric for Sim {
    type Ep = SimEndpoint;

    fn endpoints(
        &self,
        target: Arc<Region>,
        source: Arc<Region>,
    ) -> Result<(SimEndpoint, SimEndpoint, RegionDesc)> {
        let rkey = 0x1234_5678;
        let desc = RegionDesc {
            addr: target.as_ptr() as u64,
            key: u64::from(rkey),
            len: target.len() as u64,
            page_size: PAGE,
            port: 0,
            name: colo_transport::push::EndpointName::EMPTY,
        };
        let cfg = SimConfig {
            recv_lens: Some((
                message::HEADER_LEN,
                message::commit_len(desc.bitmap_words()),
            )),
            ..SimConfig::default()
        };
        let (a, b) = sim::connect(target, rkey, source, cfg, Faults::default())?;
        Ok((a, b, desc))
    }
}

/// A real RDMA device, from the environment.
#[derive(Debug, Clone)]
pub struct Device {
    addr: IpAddr,
    opts: RdmaOptions,
}

impl Device {
    /// The device named by `COLO_RDMA_DEVICE` at `COLO_RDMA_ADDR`.
    ///
    /// # Errors
    /// A message saying which variable is missing or malformed.
    pub fn from_env() -> std::result::Result<Self, String> {
        let device = std::env::var("COLO_RDMA_DEVICE")
            .map_err(|_| "set COLO_RDMA_DEVICE to the RDMA device (e.g. rxe0)".to_string())?;
        let addr = std::env::var("COLO_RDMA_ADDR")
            .map_err(|_| "set COLO_RDMA_ADDR to the IP address of the device's netdev".to_string())?
            .parse()
            .map_err(|e| format!("COLO_RDMA_ADDR: {e}"))?;
        let gid_index = match std::env::var("COLO_RDMA_GID_INDEX") {
            Ok(v) => Some(v.parse().map_err(|e| format!("COLO_RDMA_GID_INDEX: {e}"))?),
            Err(_) => None,
        };
        Ok(Self {
            addr,
            opts: RdmaOptions {
                device: Some(device),
                gid_index,
                ..RdmaOptions::default()
            },
        })
    }
}

impl Fabric for Device {
    type Ep = RdmaEndpoint;

    fn endpoints(
        &self,
        target: Arc<Region>,
        source: Arc<Region>,
    ) -> Result<(RdmaEndpoint, RdmaEndpoint, RegionDesc)> {
        let mut listener =
            RdmaListener::bind(SocketAddr::new(self.addr, 0), target, PAGE, &self.opts)?;
        let desc = *listener.desc();
        let acceptor = std::thread::spawn(move || listener.accept_endpoint(T));
        let tx = connect_endpoint(self.addr, &desc, source, &self.opts)?;
        let rx = acceptor.join().map_err(|_| Error::Closed)??;
        Ok((tx, rx, desc))
    }
}

/// A libfabric provider on loopback: `tcp` runs everywhere (RMA writes in user space over
/// TCP), so the one-sided pipeline runs for real in the test command.
#[derive(Debug, Clone)]
pub struct Ofi {
    opts: OfiOptions,
}

impl Ofi {
    /// The provider `name` on 127.0.0.1, on the kind of endpoint it offers RMA on
    /// (connected where it can).
    pub fn provider(name: &str) -> Self {
        Self {
            opts: OfiOptions {
                provider: Some(name.to_string()),
                ..OfiOptions::default()
            },
        }
    }

    /// The provider `name` on reliable datagram endpoints (`shm`; `tcp` through
    /// `ofi_rxm`): names exchanged, no connection.
    pub fn rdm(name: &str) -> Self {
        Self {
            opts: OfiOptions {
                provider: Some(name.to_string()),
                endpoint: ofi::EndpointKind::Rdm,
                ..OfiOptions::default()
            },
        }
    }
}

impl Fabric for Ofi {
    type Ep = OfiEndpoint;

    fn endpoints(
        &self,
        target: Arc<Region>,
        source: Arc<Region>,
    ) -> Result<(OfiEndpoint, OfiEndpoint, RegionDesc)> {
        let lo = IpAddr::from([127, 0, 0, 1]);
        let mut listener = OfiListener::bind(SocketAddr::new(lo, 0), target, PAGE, &self.opts)?;
        let desc = *listener.desc();
        let acceptor = std::thread::spawn(move || listener.accept_endpoint(T));
        let tx = ofi::connect_endpoint(lo, &desc, source, &self.opts)?;
        let rx = acceptor.join().map_err(|_| Error::Closed)??;
        Ok((tx, rx, desc))
    }

    /// The `tcp` provider (connected, or under `ofi_rxm`) closes a connection whose peer
    /// wrote with a bad key: the sender sees its writes canceled (flushed), and nothing
    /// lands. `shm` drops the write and answers nothing.
    fn refusal(&self) -> Refusal {
        if self.opts.provider.as_deref() == Some("shm") {
            Refusal::Silence
        } else {
            Refusal::Status(WcStatus::Flushed)
        }
    }
}

/// Wraps an endpoint and corrupts the rkey of its `at`-th RDMA WRITE (from 0): the
/// responder refuses it, and the queue pair goes to the error state mid-epoch.
#[derive(Debug)]
pub struct CorruptAt<E> {
    inner: E,
    at: u64,
    seen: u64,
    wrs: Vec<WriteWr>,
}

impl<E: Endpoint> CorruptAt<E> {
    /// Corrupts the `at`-th write posted through `inner`.
    pub fn new(inner: E, at: u64) -> Self {
        Self {
            inner,
            at,
            seen: 0,
            wrs: Vec::new(),
        }
    }
}

impl<E: Endpoint> Endpoint for CorruptAt<E> {
    fn caps(&self) -> Caps {
        self.inner.caps()
    }

    fn bounce(&self) -> Option<&Region> {
        self.inner.bounce()
    }

    fn post_writes(&mut self, wrs: &[WriteWr], sges: &[Sge]) -> Result<()> {
        self.wrs.clear();
        self.wrs.extend_from_slice(wrs);
        for w in &mut self.wrs {
            if self.seen == self.at {
                w.rkey ^= 0x00a5_5a00;
            }
            self.seen += 1;
        }
        self.inner.post_writes(&self.wrs, sges)
    }

    fn post_send(&mut self, wr_id: u64, imm: u32, msg: &[u8]) -> Result<()> {
        self.inner.post_send(wr_id, imm, msg)
    }

    fn poll_send(&mut self, out: &mut Vec<Wc>, timeout: Duration) -> Result<()> {
        self.inner.poll_send(out, timeout)
    }

    fn recv(&mut self, buf: &mut Vec<u8>, timeout: Duration) -> Result<u32> {
        self.inner.recv(buf, timeout)
    }
}

/// A deterministic pseudo-random sequence.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn page_bytes(tag: u64, page: u64) -> Vec<u8> {
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ page.wrapping_mul(0xBF58_476D) ^ 1;
    (0..PAGE / 8)
        .flat_map(|_| xorshift(&mut x).to_le_bytes())
        .collect()
}

fn runs_of(pages: &[u64]) -> Vec<WriteRun> {
    pages.iter().map(|&p| WriteRun::pages(p, 1, PAGE)).collect()
}

fn bitmap_of(pages: &[u64], total: u64) -> PageBitmap {
    let mut b = PageBitmap::new(total);
    for &p in pages {
        b.set(p);
    }
    b
}

fn check(cond: bool, what: impl Into<String>) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Protocol(what.into()))
    }
}

/// Random page sets over `epochs` epochs: after each commit the receiver's region matches
/// a model of every page byte for byte, and the commit's bitmap is exactly the set sent;
/// then the sender closes, and the receiver sees it.
///
/// # Errors
/// The first transport error or mismatch.
pub fn random_pages_land_and_commit<F: Fabric>(f: &F, pages: u64, epochs: u64) -> Result<()> {
    let len = (pages * u64::from(PAGE)) as usize;
    let (src, dst) = (
        Arc::new(Region::anonymous(len)?),
        Arc::new(Region::anonymous(len)?),
    );
    let (a, b, desc) = f.endpoints(Arc::clone(&dst), Arc::clone(&src))?;
    let mut tx = VerbsSender::new(a, desc, Arc::clone(&src), 1, f.sender_options())?;
    let mut rx = VerbsReceiver::new(b, desc, 0);
    let mut model: Vec<u64> = vec![0; pages as usize]; // the tag each page holds; 0 = zero
    let mut seed = 0x5eed_u64;
    for epoch in 1..=epochs {
        let chosen: Vec<u64> = (0..pages)
            .filter(|_| xorshift(&mut seed) % 3 == 0)
            .collect();
        for &p in &chosen {
            src.write_at(p * u64::from(PAGE), &page_bytes(epoch, p))?;
            model[p as usize] = epoch;
        }
        let bitmap = bitmap_of(&chosen, pages);
        push_epoch(&mut tx, runs_of(&chosen), &bitmap)?;
        let c = rx.next_commit(T)?;
        check(
            c.epoch == epoch,
            format!("commit of epoch {} for {epoch}", c.epoch),
        )?;
        check(
            c.bitmap == bitmap,
            "the commit's bitmap differs from the pages sent",
        )?;
        check(
            c.bytes == chosen.len() as u64 * u64::from(PAGE),
            format!("commit says {} bytes", c.bytes),
        )?;
        let mut got = vec![0u8; PAGE as usize];
        for p in 0..pages {
            dst.read_at(p * u64::from(PAGE), &mut got)?;
            let tag = model[p as usize];
            let want = if tag == 0 {
                vec![0; PAGE as usize]
            } else {
                page_bytes(tag, p)
            };
            check(got == want, format!("page {p} after epoch {epoch}"))?;
        }
        rx.release(epoch)?;
    }
    // An orderly end: the receiver's next wait returns the sender's close.
    tx.close()?;
    let end = rx.next_commit(T);
    check(
        matches!(
            end,
            Err(Error::Frame(colo_transport::framing::Error::PeerClosed))
        ),
        format!("after the sender's close the receiver got {end:?}"),
    )
}

/// A descriptor with a wrong rkey: the first write fails ([`Fabric::refusal`]), no
/// commit arrives, and nothing lands.
///
/// # Errors
/// When the outcome differs.
pub fn bad_rkey_is_refused<F: Fabric>(f: &F) -> Result<()> {
    let pages = 64u64;
    let len = (pages * u64::from(PAGE)) as usize;
    let (src, dst) = (
        Arc::new(Region::anonymous(len)?),
        Arc::new(Region::anonymous(len)?),
    );
    src.write_at(0, &vec![0xab; len])?;
    let (a, b, mut desc) = f.endpoints(Arc::clone(&dst), Arc::clone(&src))?;
    let rx_desc = desc;
    desc.key ^= 0x0101_0000;
    let mut tx = VerbsSender::new(a, desc, src, 1, f.sender_options())?;
    let mut rx = VerbsReceiver::new(b, rx_desc, 0);
    let all: Vec<u64> = (0..pages).collect();
    let refused = f.refusal();
    let outcome = push_epoch(&mut tx, runs_of(&all), &bitmap_of(&all, pages)).map(|_| ());
    check(
        refused.seen_in(&outcome, true),
        format!("expected the write to fail with {refused}, got {outcome:?}"),
    )?;
    check(
        rx.next_commit(Duration::from_millis(300)).is_err(),
        "a commit arrived after a refused write",
    )?;
    let mut got = vec![1u8; len];
    dst.read_at(0, &mut got)?;
    check(
        got.iter().all(|&x| x == 0),
        "a write with a bad rkey landed",
    )
}

/// A descriptor that claims twice the registered region: writes past its end fail at the
/// target ([`Fabric::refusal`]), no commit arrives, and no byte of the region (or
/// past it) changes.
///
/// # Errors
/// When the outcome differs.
pub fn write_outside_the_region_is_refused<F: Fabric>(f: &F) -> Result<()> {
    let pages = 64u64;
    let len = (pages * u64::from(PAGE)) as usize;
    // The target is the first half of a mapping whose second half stays unregistered.
    let whole = Arc::new(Region::anonymous(2 * len)?);
    let dst = Arc::new(whole.sub(0, len as u64)?);
    let src = Arc::new(Region::anonymous(2 * len)?);
    src.write_at(0, &vec![0xcd; 2 * len])?;
    let (a, b, mut desc) = f.endpoints(Arc::clone(&dst), Arc::clone(&src))?;
    let rx_desc = desc;
    desc.len *= 2;
    let mut tx = VerbsSender::new(a, desc, src, 1, f.sender_options())?;
    let mut rx = VerbsReceiver::new(b, rx_desc, 0);
    let past: Vec<u64> = (pages..2 * pages).collect();
    let refused = f.refusal();
    let outcome = push_epoch(&mut tx, runs_of(&past), &bitmap_of(&past, 2 * pages)).map(|_| ());
    check(
        refused.seen_in(&outcome, true),
        format!("expected the write past the region to fail with {refused}, got {outcome:?}"),
    )?;
    check(
        rx.next_commit(Duration::from_millis(300)).is_err(),
        "a commit arrived after a refused write",
    )?;
    let mut got = vec![1u8; 2 * len];
    whole.read_at(0, &mut got)?;
    check(
        got.iter().all(|&x| x == 0),
        "a write outside the registered region landed",
    )
}

/// Epoch 1 commits through the RAM cache into the SVM; the queue pair fails in the middle
/// of epoch 2 (a refused write). The receiver reports the error, the cache aborts the
/// checkpoint, and the SVM still holds epoch 1 exactly.
///
/// # Errors
/// When the outcome differs.
pub fn qp_error_mid_epoch_keeps_the_previous_epoch<F: Fabric>(f: &F) -> Result<()> {
    let pages = 256u64;
    let len = pages * u64::from(PAGE);
    let layout = GuestLayout::new(
        u64::from(PAGE),
        vec![GuestRegion {
            slot: 0,
            gpa: 0,
            len,
        }],
    )
    .map_err(|e| Error::Protocol(e.to_string()))?;
    let svm = Arc::new(Region::anonymous(len as usize)?);
    let mut cache = RamCache::new(layout, vec![Arc::clone(&svm)])
        .map_err(|e| Error::Protocol(e.to_string()))?;
    let src = Arc::new(Region::anonymous(len as usize)?);
    let (a, b, desc) = f.endpoints(Arc::clone(cache.region()), Arc::clone(&src))?;
    let mut tx = VerbsSender::new(
        CorruptAt::new(a, u64::MAX),
        desc,
        Arc::clone(&src),
        1,
        f.sender_options(),
    )?;
    let mut rx = VerbsReceiver::new(b, desc, 0);
    let cache_err = |e: colo_ramcache::Error| Error::Protocol(e.to_string());

    // Epoch 1: every page, committed into the SVM.
    let all: Vec<u64> = (0..pages).collect();
    for &p in &all {
        src.write_at(p * u64::from(PAGE), &page_bytes(1, p))?;
    }
    push_epoch(&mut tx, runs_of(&all), &bitmap_of(&all, pages))?;
    let c = rx.next_commit(T)?;
    cache.land(&c).map_err(cache_err)?;
    cache.seal_pages(c.epoch).map_err(cache_err)?;
    cache.stage_state(b"state 1".to_vec()).map_err(cache_err)?;
    cache.stage_disk_acked().map_err(cache_err)?;
    cache.commit(&PageBitmap::new(pages)).map_err(cache_err)?;
    rx.release(c.epoch)?;

    // Epoch 2: every other page; the 5th write is refused.
    tx.endpoint_mut().at = tx.endpoint_mut().seen + 5;
    let odd: Vec<u64> = (0..pages).filter(|p| p % 2 == 1).collect();
    for &p in &odd {
        src.write_at(p * u64::from(PAGE), &page_bytes(2, p))?;
    }
    let e = push_epoch(&mut tx, runs_of(&odd), &bitmap_of(&odd, pages)).map(|_| ());
    check(
        f.refusal().seen_in(&e, false),
        format!("expected a completion error mid-epoch, got {e:?}"),
    )?;
    check(
        rx.next_commit(T).is_err(),
        "the receiver saw a commit of a failed epoch",
    )?;
    check(
        cache.commit(&PageBitmap::new(pages)).is_err(),
        "an incomplete checkpoint committed",
    )?;
    cache.abort();
    let mut got = vec![0u8; PAGE as usize];
    for p in 0..pages {
        svm.read_at(p * u64::from(PAGE), &mut got)?;
        check(
            got == page_bytes(1, p),
            format!("SVM page {p} lost epoch 1"),
        )?;
    }
    Ok(())
}
