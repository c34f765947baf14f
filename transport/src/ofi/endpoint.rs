//! libfabric objects, connection setup, and the [`Endpoint`] of one connected `FI_EP_MSG`
//! endpoint.
//!
//! Every libfabric object is an [`Object`] that closes itself when dropped and holds the
//! objects it was opened from (an endpoint its completion queues, event queue and domain;
//! a domain its fabric), so they close in the order libfabric requires whatever order the
//! owners drop them in.

use std::ffi::{CStr, CString, c_void};
use std::net::{IpAddr, SocketAddr};
use std::os::raw::c_int;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use colo_memory::Region;

use super::sys;
use super::{EndpointKind, OfiError, OfiOptions};
use crate::error::{Error, Result};
use crate::push::{EndpointName, RegionDesc};
use crate::verbs::{
    Caps, Endpoint, LocalMr, Sge, VerbsOptions, VerbsReceiver, VerbsSender, Wc, WcStatus, WriteWr,
    memlock_limit, message,
};

/// Receive buffers posted on each side (the protocol keeps at most one message in flight
/// each way; the rest are spares).
const RECV_DEPTH: usize = 4;
/// Completions taken per read.
const POLL_BATCH: usize = 16;
/// Longest a post waits for room in the provider's queue.
const POST_WAIT: Duration = Duration::from_secs(5);
/// Room for connection data after an `fi_eq_cm_entry` (colo sends none).
const CM_ENTRY_LEN: usize = 256;

/// libfabric calls return 0 or a negative `FI_E*` code.
fn check(call: &'static str, rc: impl Into<i64>) -> Result<()> {
    let rc = rc.into();
    if rc >= 0 {
        Ok(())
    } else {
        Err(call_error(call, rc))
    }
}

fn call_error(call: &'static str, rc: i64) -> Error {
    let code = i32::try_from(rc.unsigned_abs()).unwrap_or(i32::MAX);
    Error::Ofi(OfiError::Call {
        call,
        code,
        message: strerror(code),
    })
}

fn strerror(code: i32) -> String {
    // SAFETY: fi_strerror returns a static NUL-terminated string for any code.
    let s = unsafe { sys::fi_strerror(code) };
    if s.is_null() {
        return format!("libfabric error {code}");
    }
    // SAFETY: non-null, NUL-terminated, static.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

/// Keeps whatever an object was opened from alive until the object is closed.
type Parent = Arc<dyn std::any::Any + Send + Sync>;

/// One libfabric object (`fid_*` begins with its `struct fid`), closed on drop, after
/// which its parents are released.
struct Object<T> {
    ptr: *mut T,
    _parents: Vec<Parent>,
}

// SAFETY: the domain is opened with FI_THREAD_SAFE (or the provider's stricter model is
// refused by fi_getinfo), so objects may be used and closed from any thread.
unsafe impl<T> Send for Object<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Object<T> {}

impl<T> Object<T> {
    fn new(ptr: *mut T, parents: Vec<Parent>) -> Self {
        Self {
            ptr,
            _parents: parents,
        }
    }

    fn fid(&self) -> *mut sys::fid {
        self.ptr.cast()
    }
}

impl<T> Drop for Object<T> {
    fn drop(&mut self) {
        // SAFETY: the object is live and closed exactly once; everything opened from it
        // holds it (through `_parents`) and is closed already.
        let rc = unsafe { sys::colo_fi_close(self.fid()) };
        if rc != 0 {
            tracing::debug!(code = rc, "fi_close failed");
        }
    }
}

/// An `fi_info` list from `fi_getinfo` (or a connection request), freed on drop.
struct Info(*mut sys::fi_info);

// SAFETY: plain heap data owned by this value.
unsafe impl Send for Info {}

impl Drop for Info {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: owned, freed once.
            unsafe { sys::fi_freeinfo(self.0) };
        }
    }
}

impl Info {
    fn get(&self) -> &sys::fi_info {
        // SAFETY: non-null by construction (checked where made), live while `self` is.
        unsafe { &*self.0 }
    }

    fn mr_mode(&self) -> u32 {
        // SAFETY: every fi_info from libfabric has its domain attributes.
        unsafe { (*self.get().domain_attr).mr_mode as u32 }
    }

    /// Bytes of the keys the provider takes (1 to 8 colo asks for).
    fn mr_key_size(&self) -> usize {
        // SAFETY: every fi_info from libfabric has its domain attributes.
        unsafe { (*self.get().domain_attr).mr_key_size }.clamp(1, 8)
    }

    fn provider(&self) -> String {
        // SAFETY: fabric attributes and their prov_name are set by libfabric.
        unsafe {
            let f = self.get().fabric_attr;
            if f.is_null() || (*f).prov_name.is_null() {
                return "?".into();
            }
            CStr::from_ptr((*f).prov_name)
                .to_string_lossy()
                .into_owned()
        }
    }
}

/// The MR modes colo handles: registering local buffers, virtual addresses or offsets,
/// allocated memory, and keys chosen by the provider.
const MR_MODES: u32 =
    sys::FI_MR_LOCAL | sys::FI_MR_VIRT_ADDR | sys::FI_MR_ALLOCATED | sys::FI_MR_PROV_KEY;

/// Finds an RMA endpoint of `kind` (connected or reliable datagram; not `Any`) of
/// `opts.provider` for `node:service`.
fn getinfo(
    node: Option<&str>,
    service: Option<&str>,
    flags: u64,
    opts: &OfiOptions,
    kind: EndpointKind,
) -> Result<Info> {
    let rdm = kind == EndpointKind::Rdm;
    // SAFETY: fi_allocinfo returns a zeroed fi_info with its attribute structs allocated,
    // or null.
    let hints = Info(unsafe { sys::colo_fi_allocinfo() });
    if hints.0.is_null() {
        return Err(call_error("fi_allocinfo", -i64::from(sys::FI_ENOMEM)));
    }
    // SAFETY: `hints` and its attribute structs are live and ours to fill; strings are
    // strdup'ed because fi_freeinfo frees them.
    unsafe {
        let h = &mut *hints.0;
        h.caps = u64::from(sys::FI_MSG | sys::FI_RMA | sys::FI_WRITE | sys::FI_REMOTE_WRITE);
        h.mode = 0;
        (*h.ep_attr).type_ = if rdm {
            sys::fi_ep_type_FI_EP_RDM
        } else {
            sys::fi_ep_type_FI_EP_MSG
        };
        // Registrations bound to the endpoint: on reliable datagram endpoints only, where
        // the endpoint exists before anything is registered (cxi needs it).
        let endpoint_mrs = if rdm { sys::FI_MR_ENDPOINT } else { 0 };
        (*h.domain_attr).mr_mode = (MR_MODES | endpoint_mrs) as c_int;
        (*h.domain_attr).threading = sys::fi_threading_FI_THREAD_SAFE;
        if let Some(p) = &opts.provider {
            let c = CString::new(p.as_str())
                .map_err(|_| Error::Protocol(format!("provider name {p:?} has a NUL byte")))?;
            (*h.fabric_attr).prov_name = libc::strdup(c.as_ptr());
        }
    }
    let node_c = node
        .map(CString::new)
        .transpose()
        .map_err(|_| Error::Protocol("address with a NUL byte".into()))?;
    let service_c = service
        .map(CString::new)
        .transpose()
        .map_err(|_| Error::Protocol("port with a NUL byte".into()))?;
    let mut info = ptr::null_mut();
    // SAFETY: valid C strings (or null), live hints, a valid out-pointer.
    let rc = unsafe {
        sys::fi_getinfo(
            sys::colo_fi_version(),
            node_c.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            service_c.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            flags,
            hints.0,
            &mut info,
        )
    };
    let info = Info(info);
    if rc == -(sys::FI_ENODATA as c_int) || (rc == 0 && info.0.is_null()) {
        return Err(no_rma(opts, kind));
    }
    check("fi_getinfo", rc)?;
    Ok(info)
}

/// Why `fi_getinfo` found nothing of `kind`: an unknown provider, or one without what colo
/// needs.
fn no_rma(opts: &OfiOptions, kind: EndpointKind) -> Error {
    let present = providers();
    match &opts.provider {
        Some(p) if !present.contains(p) => Error::Ofi(OfiError::UnknownProvider {
            wanted: p.clone(),
            present,
        }),
        p => Error::Ofi(OfiError::NoRma {
            provider: p.clone().unwrap_or_else(|| "any".into()),
            kinds: kind.describe(),
            hint: match kind {
                EndpointKind::Msg => {
                    ": try --ofi-endpoint rdm (efa, cxi and shm offer RMA only on reliable \
                     datagram endpoints)"
                }
                _ => {
                    ": try --ofi-provider tcp (user space, any network), shm (one machine) or \
                     verbs (InfiniBand, RoCE)"
                }
            },
        }),
    }
}

/// Finds an endpoint of the kind `opts` asks for: connected where the provider offers RMA
/// on one (and `opts` allows it), else reliable datagram. `msg_at` is the node, port and
/// flags a connected endpoint is looked up with.
fn find(opts: &OfiOptions, msg_at: (Option<&str>, &str, u64)) -> Result<(Info, EndpointKind)> {
    let (node, service, flags) = msg_at;
    if opts.endpoint != EndpointKind::Rdm {
        match getinfo(node, Some(service), flags, opts, EndpointKind::Msg) {
            Ok(info) => return Ok((info, EndpointKind::Msg)),
            Err(e @ Error::Ofi(OfiError::NoRma { .. })) if opts.endpoint == EndpointKind::Any => {
                tracing::debug!(error = %e, "no connected libfabric endpoint; trying RDM");
            }
            Err(e) => return Err(e),
        }
    }
    let info = getinfo(None, None, 0, opts, EndpointKind::Rdm).map_err(|e| match e {
        // Neither kind: say so once, with both.
        Error::Ofi(OfiError::NoRma { provider, hint, .. }) => Error::Ofi(OfiError::NoRma {
            provider,
            kinds: opts.endpoint.describe(),
            hint,
        }),
        e => e,
    })?;
    Ok((info, EndpointKind::Rdm))
}

/// The providers libfabric lists on this machine (as `fi_info -l` does).
pub fn providers() -> Vec<String> {
    let mut info = ptr::null_mut();
    // SAFETY: no hints (everything), a valid out-pointer.
    let rc = unsafe {
        sys::fi_getinfo(
            sys::colo_fi_version(),
            ptr::null(),
            ptr::null(),
            0,
            ptr::null_mut(),
            &mut info,
        )
    };
    let info = Info(info);
    let mut names = Vec::new();
    if rc != 0 {
        return names;
    }
    let mut cur = info.0;
    while !cur.is_null() {
        // SAFETY: a live element of the list.
        let (name, next) = unsafe {
            let f = (*cur).fabric_attr;
            let name = (!f.is_null() && !(*f).prov_name.is_null()).then(|| {
                CStr::from_ptr((*f).prov_name)
                    .to_string_lossy()
                    .into_owned()
            });
            (name, (*cur).next)
        };
        // Core providers only: "tcp;ofi_rxm" layers name their core provider too.
        if let Some(n) = name.and_then(|n| n.split(';').next().map(str::to_string)) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        cur = next;
    }
    names
}

/// Checks that `opts.provider` (or, without one, any provider) offers what colo needs, and
/// returns the provider libfabric would use and the kind of endpoint.
///
/// # Errors
/// [`OfiError::UnknownProvider`] or [`OfiError::NoRma`], each saying what to change.
pub fn probe(opts: &OfiOptions) -> Result<(String, EndpointKind)> {
    let (info, kind) = find(opts, (None, "0", sys::FI_SOURCE))?;
    Ok((info.provider(), kind))
}

type Fabric = Object<sys::fid_fabric>;
type Domain = Object<sys::fid_domain>;
type Eq = Object<sys::fid_eq>;
/// A completion queue, and whether it has a wait object to block on.
struct Cq {
    cq: Object<sys::fid_cq>,
    /// Opened with a file descriptor to wait on. Providers without one (shm: its queues
    /// live in shared memory, with nothing to sleep on) are polled with short naps; their
    /// own blocking read only spins with `sched_yield` (and in libfabric 1.17 shm's
    /// sometimes never returned).
    blocking: bool,
}

/// The longest nap between empty reads of a completion queue that cannot block.
const MAX_NAP: Duration = Duration::from_micros(50);

impl Cq {
    fn fid(&self) -> *mut sys::fid {
        self.cq.fid()
    }

    /// Reads up to `count` entries into `buf`: at once (`timeout` `None`), or waiting up
    /// to `timeout` for the first. Returns the count, or a negative `FI_E*` code
    /// (`-FI_EAGAIN` when nothing came).
    fn read(&self, buf: *mut c_void, count: usize, timeout: Option<Duration>) -> isize {
        let once = || {
            // SAFETY: live CQ; the caller gives room for `count` data entries.
            unsafe { sys::colo_fi_cq_read(self.cq.ptr, buf, count) }
        };
        let Some(t) = timeout else {
            return once();
        };
        if self.blocking {
            let ms = c_int::try_from(t.as_millis()).unwrap_or(c_int::MAX);
            // SAFETY: as above; the CQ has a wait object.
            return unsafe { sys::colo_fi_cq_sread(self.cq.ptr, buf, count, ptr::null(), ms) };
        }
        let deadline = Instant::now() + t;
        let mut nap = Duration::from_micros(10);
        loop {
            let rc = once();
            let left = deadline.saturating_duration_since(Instant::now());
            if rc != -(sys::FI_EAGAIN as isize) || left.is_zero() {
                return rc;
            }
            std::thread::sleep(nap.min(left));
            nap = (nap * 2).min(MAX_NAP);
        }
    }

    /// Reads the error entry of a failed completion into `err`.
    fn read_err(&self, err: &mut sys::fi_cq_err_entry) -> isize {
        // SAFETY: live CQ; a valid error entry to fill.
        unsafe { sys::colo_fi_cq_readerr(self.cq.ptr, err, 0) }
    }
}
type Mr = Object<sys::fid_mr>;
type Av = Object<sys::fid_av>;
type Ep = Object<sys::fid_ep>;

fn open_fabric(info: &Info) -> Result<Arc<Fabric>> {
    let mut f = ptr::null_mut();
    // SAFETY: the fabric attributes of a live info; a valid out-pointer.
    check("fi_fabric", unsafe {
        sys::fi_fabric(info.get().fabric_attr, &mut f, ptr::null_mut())
    })?;
    Ok(Arc::new(Object::new(f, Vec::new())))
}

fn open_domain(fabric: &Arc<Fabric>, info: &Info) -> Result<Arc<Domain>> {
    let mut d = ptr::null_mut();
    // SAFETY: live fabric and info; a valid out-pointer.
    check("fi_domain", unsafe {
        sys::colo_fi_domain(fabric.ptr, info.0, &mut d)
    })?;
    Ok(Arc::new(Object::new(d, vec![fabric.clone() as Parent])))
}

fn open_eq(fabric: &Arc<Fabric>) -> Result<Arc<Eq>> {
    let mut attr = sys::fi_eq_attr {
        size: 16,
        wait_obj: sys::fi_wait_obj_FI_WAIT_UNSPEC,
        ..Default::default()
    };
    let mut eq = ptr::null_mut();
    // SAFETY: live fabric; valid attributes and out-pointer.
    check("fi_eq_open", unsafe {
        sys::colo_fi_eq_open(fabric.ptr, &mut attr, &mut eq)
    })?;
    Ok(Arc::new(Object::new(eq, vec![fabric.clone() as Parent])))
}

/// Opens a completion queue with a file descriptor to block on, or, where the provider
/// has none, one that is polled.
fn open_cq(domain: &Arc<Domain>, size: usize) -> Result<Arc<Cq>> {
    let open = |wait_obj| {
        let mut attr = sys::fi_cq_attr {
            size,
            format: sys::fi_cq_format_FI_CQ_FORMAT_DATA,
            wait_obj,
            ..Default::default()
        };
        let mut cq = ptr::null_mut();
        // SAFETY: live domain; valid attributes and out-pointer.
        let rc = unsafe { sys::colo_fi_cq_open(domain.ptr, &mut attr, &mut cq) };
        (rc, cq)
    };
    let (rc, cq, blocking) = match open(sys::fi_wait_obj_FI_WAIT_FD) {
        (0, cq) => (0, cq, true),
        (rc, _) => {
            tracing::debug!(
                code = rc,
                "libfabric completion queue without a file descriptor to wait on; polled"
            );
            let (rc, cq) = open(sys::fi_wait_obj_FI_WAIT_NONE);
            (rc, cq, false)
        }
    };
    check("fi_cq_open", rc)?;
    Ok(Arc::new(Cq {
        cq: Object::new(cq, vec![domain.clone() as Parent]),
        blocking,
    }))
}

/// An address vector for a reliable datagram endpoint: of the type the provider prefers,
/// else a table.
fn open_av(domain: &Arc<Domain>, info: &Info) -> Result<Arc<Av>> {
    // SAFETY: every fi_info from libfabric has its domain attributes.
    let preferred = unsafe { (*info.get().domain_attr).av_type };
    let mut attr = sys::fi_av_attr {
        type_: if preferred == sys::fi_av_type_FI_AV_UNSPEC {
            sys::fi_av_type_FI_AV_TABLE
        } else {
            preferred
        },
        count: 2,
        ..Default::default()
    };
    let mut av = ptr::null_mut();
    // SAFETY: live domain; valid attributes and out-pointer.
    check("fi_av_open", unsafe {
        sys::colo_fi_av_open(domain.ptr, &mut attr, &mut av)
    })?;
    Ok(Arc::new(Object::new(av, vec![domain.clone() as Parent])))
}

/// Bytes of the random key asked for a buffer only this side reads or writes.
const LOCAL_KEY_BYTES: usize = 4;

/// Registers `len` bytes at `addr` (owned by `owner`, kept alive by the registration),
/// asking a random key of `key_bytes` bytes (at most 8) unless the provider picks keys.
/// Under `FI_MR_ENDPOINT` (`bind_to`) the registration is bound to the endpoint and
/// enabled, and holds the endpoint, which therefore closes after it.
fn register(
    domain: &Arc<Domain>,
    owner: Parent,
    (addr, len): (*mut u8, usize),
    access: u64,
    key_bytes: usize,
    bind_to: Option<&Arc<Ep>>,
) -> Result<Arc<Mr>> {
    let mut key = [0u8; 8];
    // A fresh key per registration, so a key from an earlier connection never matches.
    getrandom::fill(&mut key[..key_bytes.clamp(1, 8)])
        .map_err(|e| Error::Protocol(format!("no randomness: {e}")))?;
    let mut mr = ptr::null_mut();
    // SAFETY: live domain; `addr..addr+len` is mapped memory kept alive by `owner`, which
    // the registration holds until it is closed.
    let rc = unsafe {
        sys::colo_fi_mr_reg(
            domain.ptr,
            addr.cast::<c_void>(),
            len,
            access,
            0,
            u64::from_le_bytes(key),
            0,
            &mut mr,
            ptr::null_mut(),
        )
    };
    if rc != 0 {
        let code = rc.unsigned_abs() as i32;
        return Err(Error::Ofi(OfiError::Memlock {
            len,
            limit: memlock_limit(),
            message: strerror(code),
        }));
    }
    let mut parents = vec![domain.clone() as Parent, owner];
    if let Some(ep) = bind_to {
        parents.push(ep.clone() as Parent);
    }
    let mr = Arc::new(Object::new(mr, parents));
    if let Some(ep) = bind_to {
        // SAFETY: a live registration and endpoint of the same domain.
        unsafe {
            check("fi_mr_bind", sys::colo_fi_mr_bind(mr.ptr, ep.fid(), 0))?;
            check("fi_mr_enable", sys::colo_fi_mr_enable(mr.ptr))?;
        }
    }
    Ok(mr)
}

fn mr_key(mr: &Mr) -> u64 {
    // SAFETY: a live registration.
    unsafe { sys::colo_fi_mr_key(mr.ptr) }
}

fn mr_desc(mr: &Mr) -> *mut c_void {
    // SAFETY: a live registration.
    unsafe { sys::colo_fi_mr_desc(mr.ptr) }
}

/// Waits for the next event on `eq`: its kind and the fid and info of its CM entry.
fn eq_wait(eq: &Eq, timeout: Duration, what: &'static str) -> Result<(u32, sys::fid_t, Info)> {
    #[repr(C)]
    struct Entry {
        cm: sys::fi_eq_cm_entry,
        data: [u8; CM_ENTRY_LEN],
    }
    let mut entry = Entry {
        cm: sys::fi_eq_cm_entry {
            fid: ptr::null_mut(),
            info: ptr::null_mut(),
            data: Default::default(),
        },
        data: [0; CM_ENTRY_LEN],
    };
    let mut event = 0u32;
    let ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
    // SAFETY: live EQ; `entry` has room for a CM entry and its data.
    let rc = unsafe {
        sys::colo_fi_eq_sread(
            eq.ptr,
            &mut event,
            ptr::from_mut(&mut entry).cast(),
            size_of::<Entry>(),
            ms,
            0,
        )
    };
    if rc == -(sys::FI_EAGAIN as isize) || rc == -(sys::FI_ETIMEDOUT as isize) {
        return Err(Error::Timeout(timeout, what));
    }
    if rc == -(sys::FI_EAVAIL as isize) {
        let mut err = sys::fi_eq_err_entry::default();
        // SAFETY: live EQ; a valid error entry to fill.
        unsafe { sys::colo_fi_eq_readerr(eq.ptr, &mut err, 0) };
        return Err(Error::Ofi(OfiError::Call {
            call: what,
            code: err.err,
            message: strerror(err.err),
        }));
    }
    check("fi_eq_sread", rc as i64)?;
    Ok((event, entry.cm.fid, Info(entry.cm.info)))
}

/// Where the sender's writes read from.
enum Local {
    /// The source region, registered.
    Source(Arc<Mr>, Arc<Region>),
    /// Registered bounce buffers (the source could not be registered).
    Bounce(Arc<Mr>, Arc<Region>),
}

/// A registered buffer of this side.
struct Buf {
    mem: Arc<Region>,
    mr: Arc<Mr>,
}

impl Buf {
    fn new(
        domain: &Arc<Domain>,
        len: usize,
        access: u64,
        bind_to: Option<&Arc<Ep>>,
    ) -> Result<Self> {
        let mem = Arc::new(Region::anonymous(len.max(1))?);
        let mr = register(
            domain,
            mem.clone() as Parent,
            (mem.as_ptr(), mem.len()),
            access,
            LOCAL_KEY_BYTES,
            bind_to,
        )?;
        Ok(Self { mem, mr })
    }
}

/// How the receiver waits for its sender.
enum Listening {
    /// A passive endpoint the sender connects to (`FI_EP_MSG`).
    Msg {
        /// Open while the listener is: closing it stops the listening.
        _pep: Object<sys::fid_pep>,
        eq: Arc<Eq>,
    },
    /// The reliable datagram endpoint itself, whose name the descriptor carries; the
    /// sender's first message gives its own name. `None` once accepted.
    Rdm(Option<Box<OfiEndpoint>>),
}

/// The receiving side's endpoint before the sender arrives, with the RAM cache registered
/// for remote write.
pub struct OfiListener {
    listening: Listening,
    domain: Arc<Domain>,
    region_mr: Arc<Mr>,
    desc: RegionDesc,
    opts: OfiOptions,
    provider: String,
}

impl std::fmt::Debug for OfiListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfiListener")
            .field("provider", &self.provider)
            .field("desc", &self.desc)
            .finish_non_exhaustive()
    }
}

/// The port of a bound socket address libfabric wrote (IPv4 or IPv6).
fn port_of(addr: &[u8]) -> Option<u16> {
    let family = u16::from_ne_bytes([*addr.first()?, *addr.get(1)?]);
    let ok = i32::from(family) == libc::AF_INET || i32::from(family) == libc::AF_INET6;
    ok.then(|| u16::from_be_bytes([addr[2], addr[3]]))
}

impl OfiListener {
    /// Listens on `addr` (port 0 picks one) and registers `region` for remote write only.
    ///
    /// # Errors
    /// [`Error::Ofi`]: an unknown provider, one without connected RMA, a registration
    /// refused (with the locked-memory fix), or a failed libfabric call.
    pub fn bind(
        addr: SocketAddr,
        region: Arc<Region>,
        page_size: u32,
        opts: &OfiOptions,
    ) -> Result<Self> {
        let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
        let (info, kind) = find(opts, (Some(&ip), &port, sys::FI_SOURCE))?;
        let provider = info.provider();
        let fabric = open_fabric(&info)?;
        let (listening, domain, port) = match kind {
            EndpointKind::Rdm => {
                let domain = open_domain(&fabric, &info)?;
                let av = open_av(&domain, &info)?;
                let recv_len =
                    message::commit_len(RegionDesc::words_for(region.len() as u64, page_size))
                        .max(message::ADDRESS_MAX_LEN);
                let mut ep = OfiEndpoint::open(
                    &domain,
                    Link::Unconnected(av),
                    &info,
                    opts,
                    (recv_len, message::HEADER_LEN),
                )?;
                ep.start_progress()?;
                (Listening::Rdm(Some(Box::new(ep))), domain, 0)
            }
            _ => {
                let eq = open_eq(&fabric)?;
                let mut pep = ptr::null_mut();
                // SAFETY: live fabric and info; a valid out-pointer.
                check("fi_passive_ep", unsafe {
                    sys::colo_fi_passive_ep(fabric.ptr, info.0, &mut pep)
                })?;
                let pep = Object::new(pep, vec![eq.clone() as Parent, fabric.clone() as Parent]);
                // SAFETY: live passive endpoint and EQ.
                check("fi_pep_bind", unsafe {
                    sys::colo_fi_pep_bind(pep.ptr, eq.fid(), 0)
                })?;
                // SAFETY: a bound passive endpoint.
                check("fi_listen", unsafe { sys::colo_fi_listen(pep.ptr) })?;
                let name = getname(pep.fid())?;
                let port = port_of(name.as_bytes()).ok_or_else(|| {
                    Error::Protocol(format!(
                        "libfabric provider {provider} listens on an address that is not IP"
                    ))
                })?;
                let domain = open_domain(&fabric, &info)?;
                (Listening::Msg { _pep: pep, eq }, domain, port)
            }
        };
        // Remote write and nothing else: never remote read. The key is as wide as the
        // provider's keys go (up to 64 bits): it is what keeps other writers out.
        let bind_to = match &listening {
            Listening::Rdm(Some(ep)) => ep.mr_endpoint(),
            _ => None,
        };
        let region_mr = register(
            &domain,
            region.clone() as Parent,
            (region.as_ptr(), region.len()),
            u64::from(sys::FI_REMOTE_WRITE),
            info.mr_key_size(),
            bind_to,
        )?;
        let name = match &listening {
            Listening::Rdm(Some(ep)) => ep.name()?,
            _ => EndpointName::EMPTY,
        };
        let virt = info.mr_mode() & sys::FI_MR_VIRT_ADDR != 0;
        let desc = RegionDesc {
            addr: if virt { region.as_ptr() as u64 } else { 0 },
            key: mr_key(&region_mr),
            len: region.len() as u64,
            page_size,
            port,
            name,
        };
        tracing::info!(
            %provider,
            endpoint = ?kind,
            port,
            name = ?desc.name,
            virt_addr = virt,
            mr_endpoint = bind_to.is_some(),
            "libfabric push listener"
        );
        Ok(Self {
            listening,
            domain,
            region_mr,
            desc,
            opts: opts.clone(),
            provider,
        })
    }

    /// The region as the sender needs it (send it over the control channel).
    pub fn desc(&self) -> &RegionDesc {
        &self.desc
    }

    /// Waits up to `timeout` for the sender to connect, and accepts it.
    ///
    /// # Errors
    /// [`Error::Timeout`], or a failed libfabric call.
    pub fn accept(&mut self, timeout: Duration) -> Result<VerbsReceiver<OfiEndpoint>> {
        Ok(VerbsReceiver::new(
            self.accept_endpoint(timeout)?,
            self.desc,
            0,
        ))
    }

    /// [`accept`](Self::accept), returning the bare endpoint (to wrap it, in tests).
    ///
    /// # Errors
    /// As [`accept`](Self::accept).
    pub fn accept_endpoint(&mut self, timeout: Duration) -> Result<OfiEndpoint> {
        let deadline = Instant::now() + timeout;
        let eq = match &mut self.listening {
            // The passive endpoint stays with the listener; its event queue tells of the
            // connection request.
            Listening::Msg { eq, .. } => eq.clone(),
            Listening::Rdm(slot) => {
                let mut ep = *slot.take().ok_or_else(|| {
                    Error::Protocol("this libfabric listener has accepted its sender".into())
                })?;
                // The sender's first message names it; writes and releases go to it.
                let mut buf = Vec::new();
                let imm = ep.recv(&mut buf, timeout).map_err(|e| match e {
                    Error::Timeout(t, _) => Error::Timeout(t, "the libfabric sender's address"),
                    e => e,
                })?;
                match message::decode(&buf, imm, 0)? {
                    message::Message::Address { name } => ep.insert_peer(&name)?,
                    other => {
                        return Err(Error::Protocol(format!(
                            "expected the libfabric sender's address, got {other:?}"
                        )));
                    }
                }
                ep.region = Some(self.region_mr.clone());
                tracing::info!(
                    provider = %self.provider,
                    "libfabric push sender known (reliable datagram)"
                );
                return Ok(ep);
            }
        };
        let req = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (event, _, info) = eq_wait(&eq, left, "the libfabric sender to connect")?;
            if event == sys::FI_CONNREQ && !info.0.is_null() {
                break info;
            }
            tracing::debug!(event, "libfabric listener: event ignored");
        };
        let recv_len = message::commit_len(self.desc.bitmap_words());
        let mut ep = OfiEndpoint::open(
            &self.domain,
            Link::Connected(eq),
            &req,
            &self.opts,
            (recv_len, message::HEADER_LEN),
        )?;
        ep.region = Some(self.region_mr.clone());
        // SAFETY: an enabled endpoint from this request, with receives posted.
        check("fi_accept", unsafe {
            sys::colo_fi_accept(ep.ep.ptr, ptr::null(), 0)
        })?;
        ep.wait_connected(deadline.saturating_duration_since(Instant::now()))?;
        tracing::info!(provider = %self.provider, "libfabric push connection accepted");
        Ok(ep)
    }
}

/// The name of an endpoint (active or passive).
fn getname(fid: *mut sys::fid) -> Result<EndpointName> {
    let mut name = [0u8; EndpointName::MAX];
    let mut len = name.len();
    // SAFETY: a live endpoint; `name` has `len` bytes.
    let rc = unsafe { sys::colo_fi_getname(fid, name.as_mut_ptr().cast(), &mut len) };
    if rc == -(sys::FI_ETOOSMALL as c_int) {
        return Err(Error::Protocol(format!(
            "the libfabric endpoint's name has {len} bytes; colo carries at most {}",
            EndpointName::MAX
        )));
    }
    check("fi_getname", rc)?;
    EndpointName::new(&name[..len.min(name.len())])
}

/// Connects to the receiver at `addr` (the control channel's peer) and the port of
/// `remote`, and builds a sender over it.
///
/// # Errors
/// [`Error::Ofi`] for a provider, registration or connection failure, or
/// [`Error::Protocol`] for an unusable remote descriptor.
pub fn connect(
    addr: IpAddr,
    remote: RegionDesc,
    source: Arc<Region>,
    opts: &OfiOptions,
    vopts: VerbsOptions,
) -> Result<VerbsSender<OfiEndpoint>> {
    let ep = connect_endpoint(addr, &remote, Arc::clone(&source), opts)?;
    VerbsSender::new(ep, remote, source, 1, vopts)
}

/// [`connect`], returning the bare endpoint (to wrap it, in tests).
///
/// # Errors
/// As [`connect`].
pub fn connect_endpoint(
    addr: IpAddr,
    remote: &RegionDesc,
    source: Arc<Region>,
    opts: &OfiOptions,
) -> Result<OfiEndpoint> {
    // The receiver's descriptor says which kind it listens on: a name, or a port.
    let rdm = !remote.name.is_empty();
    let info = if rdm {
        getinfo(None, None, 0, opts, EndpointKind::Rdm)?
    } else {
        getinfo(
            Some(&addr.to_string()),
            Some(&remote.port.to_string()),
            0,
            opts,
            EndpointKind::Msg,
        )?
    };
    let provider = info.provider();
    let fabric = open_fabric(&info)?;
    let domain = open_domain(&fabric, &info)?;
    let send_len = message::commit_len(remote.bitmap_words()).max(message::ADDRESS_MAX_LEN);
    let link = if rdm {
        Link::Unconnected(open_av(&domain, &info)?)
    } else {
        Link::Connected(open_eq(&fabric)?)
    };
    let mut ep = OfiEndpoint::open(&domain, link, &info, opts, (message::HEADER_LEN, send_len))?;
    // The source is only read by the provider.
    let bind_to = ep.mr_endpoint().cloned();
    ep.local = Some(
        match register(
            &domain,
            source.clone() as Parent,
            (source.as_ptr(), source.len()),
            u64::from(sys::FI_WRITE),
            LOCAL_KEY_BYTES,
            bind_to.as_ref(),
        ) {
            Ok(mr) => Local::Source(mr, source),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    bounce_bytes = opts.bounce_len,
                    "cannot register guest memory with libfabric; pushing through registered \
                     bounce buffers"
                );
                let b = Buf::new(
                    &domain,
                    opts.bounce_len,
                    u64::from(sys::FI_WRITE),
                    bind_to.as_ref(),
                )?;
                Local::Bounce(b.mr, b.mem)
            }
        },
    );
    if rdm {
        ep.start_progress()?;
        ep.insert_peer(&remote.name)?;
        ep.announce(Duration::from_secs(10))?;
    } else {
        // SAFETY: an enabled endpoint with receives posted; the destination address is
        // the info's own.
        check("fi_connect", unsafe {
            sys::colo_fi_connect(ep.ep.ptr, info.get().dest_addr, ptr::null(), 0)
        })?;
        ep.wait_connected(Duration::from_secs(10))?;
    }
    tracing::info!(
        %provider,
        rdm,
        max_sge = ep.caps.max_sge,
        send_queue = ep.caps.max_send_wr,
        "libfabric push connection established"
    );
    Ok(ep)
}

/// How an endpoint reaches its peer.
enum Link {
    /// Connected (`FI_EP_MSG`): the event queue tells of its connection and shutdown.
    Connected(Arc<Eq>),
    /// Reliable datagram (`FI_EP_RDM`): the peer is an entry of this address vector.
    Unconnected(Arc<Av>),
}

/// The context of the sender's address message (never a pipeline's work request id).
const ADDRESS_ID: u64 = u64::MAX;

/// In-order retirement of an unconnected endpoint's operations. A reliable datagram
/// endpoint promises no order between writes and sends, so every operation asks a
/// delivery-complete completion, and completions are handed to the pipeline in the order
/// of their posts, as a queue pair retires them: a signaled write's completion then means
/// every write before it landed, and the commit, posted after it, follows them all.
#[derive(Debug, Default)]
struct InOrder {
    /// Token of the oldest operation not retired.
    base: u64,
    /// Operations posted and not retired, oldest first.
    queue: std::collections::VecDeque<Op>,
}

/// One operation posted on an unconnected endpoint.
#[derive(Debug, Clone, Copy)]
struct Op {
    wr_id: u64,
    /// The pipeline wants its completion.
    signaled: bool,
    done: bool,
}

impl InOrder {
    /// Notes a post; returns the token its completion will carry as context.
    fn post(&mut self, wr_id: u64, signaled: bool) -> u64 {
        self.queue.push_back(Op {
            wr_id,
            signaled,
            done: false,
        });
        self.base + self.queue.len() as u64 - 1
    }

    /// Undoes the last [`post`](Self::post) (the provider refused it).
    fn unpost(&mut self) {
        self.queue.pop_back();
    }

    /// The outstanding operation of `token`.
    fn op(&mut self, token: u64) -> Option<&mut Op> {
        let i = usize::try_from(token.checked_sub(self.base)?).ok()?;
        self.queue.get_mut(i)
    }

    /// The operation of `token` failed: it retires without a success, and its work
    /// request id (or the token, for none outstanding) is returned for the error.
    fn fail(&mut self, token: u64) -> u64 {
        match self.op(token) {
            Some(op) => {
                op.signaled = false;
                op.wr_id
            }
            None => token,
        }
    }

    /// Marks `token` done and retires what is done from the oldest on: the signaled ones
    /// go to `out`.
    fn complete(&mut self, token: u64, out: &mut Vec<Wc>) {
        match self.op(token) {
            Some(op) => op.done = true,
            None => tracing::debug!(token, "libfabric completion of no outstanding operation"),
        }
        while let Some(&Op {
            wr_id,
            signaled,
            done: true,
        }) = self.queue.front()
        {
            self.queue.pop_front();
            self.base += 1;
            if signaled {
                out.push(Wc {
                    wr_id,
                    status: WcStatus::Success,
                });
            }
        }
    }
}

/// One side of a libfabric push link: a connected `FI_EP_MSG` endpoint, or a reliable
/// datagram (`FI_EP_RDM`) endpoint with its one peer in an address vector.
pub struct OfiEndpoint {
    /// Shared with registrations bound to it (`FI_MR_ENDPOINT`), which close first.
    ep: Arc<Ep>,
    link: Link,
    /// The peer's address in the address vector (unconnected endpoints; ignored when
    /// connected).
    peer: sys::fi_addr_t,
    /// Unconnected endpoints: the operations posted, retired in order.
    in_order: Option<InOrder>,
    tx: Arc<Cq>,
    rx: Arc<Cq>,
    caps: Caps,
    /// Remote ranges per write the provider takes.
    rma_iov_limit: usize,
    local_mr: bool,
    /// Registrations must be bound to this endpoint (`FI_MR_ENDPOINT`).
    mr_endpoint: bool,
    local: Option<Local>,
    send: Buf,
    recv: Buf,
    recv_len: usize,
    /// Completions read while waiting for room to post, handed out by the next poll.
    pending: Vec<Wc>,
    /// The receive completions, from the thread that drives the receive queue.
    rx_events: Receiver<RxEvent>,
    /// That thread (started once connected).
    progress: Option<Progress>,
    rx_events_tx: Option<Sender<RxEvent>>,
    /// The receiver's registration of its region (kept while connected).
    region: Option<Arc<Mr>>,
}

/// What the receive-completion thread saw.
#[derive(Debug)]
enum RxEvent {
    /// A message landed in receive slot `slot`.
    Message {
        slot: usize,
        len: usize,
        flags: u64,
        data: u64,
    },
    /// A receive failed.
    Failed(WcStatus),
    /// The peer closed the connection.
    Shutdown,
}

/// The thread that keeps reading the receive completion queue, blocked in the provider:
/// with providers that progress data only when the application reads a queue (`tcp`,
/// `verbs` under `FI_PROGRESS_MANUAL`), the peer's RMA writes and messages land, and its
/// delivery-complete writes complete, only while some thread does.
struct Progress {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            // The thread wakes within one PROGRESS_SLICE to see the flag.
            let _ = h.join();
        }
    }
}

/// How long the progress thread blocks in the provider per read.
const PROGRESS_SLICE: Duration = Duration::from_millis(50);

fn drive_rx(rx: &Cq, eq: Option<&Eq>, ep: usize, out: &Sender<RxEvent>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut e = sys::fi_cq_data_entry::default();
        // SAFETY: live CQ (held by this thread); room for one data entry.
        let rc = rx.read(ptr::from_mut(&mut e).cast(), 1, Some(PROGRESS_SLICE));
        let event = if rc > 0 {
            RxEvent::Message {
                slot: e.op_context as usize,
                len: e.len,
                flags: e.flags,
                data: e.data,
            }
        } else if rc == -(sys::FI_EAGAIN as isize) {
            // Only a connection ends; a reliable datagram peer's loss shows as failed
            // operations and missing messages.
            if !eq.is_some_and(|eq| shut_down(eq, ep)) {
                continue;
            }
            RxEvent::Shutdown
        } else if rc == -(sys::FI_EAVAIL as isize) {
            let mut err = sys::fi_cq_err_entry::default();
            rx.read_err(&mut err);
            RxEvent::Failed(status_of(err.err))
        } else {
            RxEvent::Failed(WcStatus::Other(rc.unsigned_abs() as u32))
        };
        let last = !matches!(event, RxEvent::Message { .. });
        if out.send(event).is_err() || last {
            return;
        }
    }
}

/// Whether the next event of `eq` is the shutdown of endpoint `ep` (consumed if so; any
/// other event is left for its reader).
fn shut_down(eq: &Eq, ep: usize) -> bool {
    let mut event = 0u32;
    let mut entry = sys::fi_eq_cm_entry {
        fid: ptr::null_mut(),
        info: ptr::null_mut(),
        data: Default::default(),
    };
    let len = size_of::<sys::fi_eq_cm_entry>();
    // SAFETY: live EQ; `entry` has room for a CM entry without data.
    let n = unsafe {
        sys::colo_fi_eq_read(
            eq.ptr,
            &mut event,
            ptr::from_mut(&mut entry).cast(),
            len,
            u64::from(sys::FI_PEEK),
        )
    };
    if n <= 0 || event != sys::FI_SHUTDOWN || entry.fid as usize != ep {
        return false;
    }
    // SAFETY: as above; consumes the event just peeked.
    unsafe { sys::colo_fi_eq_read(eq.ptr, &mut event, ptr::from_mut(&mut entry).cast(), len, 0) };
    true
}

impl Drop for OfiEndpoint {
    fn drop(&mut self) {
        // The thread that drives the receive queue reads it inside the provider: it must be
        // gone before the endpoint (and its queues) close, whatever order the fields drop in.
        drop(self.progress.take());
    }
}

impl std::fmt::Debug for OfiEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfiEndpoint")
            .field("caps", &self.caps)
            .field("bounce", &self.bounce().is_some())
            .finish_non_exhaustive()
    }
}

impl OfiEndpoint {
    /// Opens, binds and enables an endpoint for `info`, with its buffers registered and
    /// receives posted. `lens` is (receive buffer, send buffer) in bytes.
    fn open(
        domain: &Arc<Domain>,
        link: Link,
        info: &Info,
        opts: &OfiOptions,
        (recv_len, send_len): (usize, usize),
    ) -> Result<Self> {
        let i = info.get();
        // SAFETY: libfabric fills the attributes of every info it returns.
        let (tx_attr, ep_attr) = unsafe { (*i.tx_attr, *i.ep_attr) };
        let caps = Caps {
            max_sge: (opts.max_sge as usize).min(tx_attr.iov_limit).max(1),
            max_send_wr: (opts.send_queue as usize).min(tx_attr.size).max(2),
            max_msg: ep_attr.max_msg_size as u64,
            recv_len,
            wide_keys: true,
        };
        let tx = open_cq(domain, caps.max_send_wr + RECV_DEPTH)?;
        let rx = open_cq(domain, RECV_DEPTH * 2)?;
        let mut raw = ptr::null_mut();
        // SAFETY: live domain and info; a valid out-pointer.
        check("fi_endpoint", unsafe {
            sys::colo_fi_endpoint(domain.ptr, info.0, &mut raw)
        })?;
        let (bound, bound_fid): (Parent, _) = match &link {
            Link::Connected(eq) => (eq.clone(), eq.fid()),
            Link::Unconnected(av) => (av.clone(), av.fid()),
        };
        let ep = Arc::new(Object::new(
            raw,
            vec![
                tx.clone() as Parent,
                rx.clone() as Parent,
                bound,
                domain.clone() as Parent,
            ],
        ));
        // SAFETY: live endpoint, EQ or AV, and CQs; flags as libfabric documents them.
        unsafe {
            check(
                "fi_ep_bind(eq/av)",
                sys::colo_fi_ep_bind(ep.ptr, bound_fid, 0),
            )?;
            check(
                "fi_ep_bind(tx cq)",
                sys::colo_fi_ep_bind(
                    ep.ptr,
                    tx.fid(),
                    u64::from(sys::FI_TRANSMIT) | sys::FI_SELECTIVE_COMPLETION,
                ),
            )?;
            check(
                "fi_ep_bind(rx cq)",
                sys::colo_fi_ep_bind(ep.ptr, rx.fid(), u64::from(sys::FI_RECV)),
            )?;
            check("fi_enable", sys::colo_fi_enable(ep.ptr))?;
        }
        let mr_endpoint = info.mr_mode() & sys::FI_MR_ENDPOINT != 0;
        let bind_to = mr_endpoint.then_some(&ep);
        let send = Buf::new(domain, send_len, u64::from(sys::FI_SEND), bind_to)?;
        let recv = Buf::new(
            domain,
            recv_len * RECV_DEPTH,
            u64::from(sys::FI_RECV),
            bind_to,
        )?;
        let (events_tx, rx_events) = crossbeam_channel::unbounded();
        let in_order = matches!(link, Link::Unconnected(_)).then(InOrder::default);
        let mut e = Self {
            ep,
            link,
            peer: 0,
            in_order,
            tx,
            rx,
            caps,
            rma_iov_limit: tx_attr.rma_iov_limit.max(1),
            local_mr: info.mr_mode() & sys::FI_MR_LOCAL != 0,
            mr_endpoint,
            local: None,
            send,
            recv,
            recv_len,
            pending: Vec::new(),
            rx_events,
            progress: None,
            rx_events_tx: Some(events_tx),
            region: None,
        };
        for slot in 0..RECV_DEPTH {
            e.post_recv(slot)?;
        }
        Ok(e)
    }

    /// Waits for this endpoint's `FI_CONNECTED` event, then starts the thread that drives
    /// its receive queue.
    fn wait_connected(&mut self, timeout: Duration) -> Result<()> {
        let Link::Connected(eq) = &self.link else {
            return Err(Error::Protocol(
                "a reliable datagram endpoint has no connection to wait for".into(),
            ));
        };
        let eq = eq.clone();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (event, fid, _) = eq_wait(&eq, left, "the libfabric connection")?;
            if event == sys::FI_CONNECTED && fid == self.ep.fid() {
                return self.start_progress();
            }
            if event == sys::FI_SHUTDOWN && fid == self.ep.fid() {
                return Err(Error::Closed);
            }
        }
    }

    /// Starts the thread that drives the receive queue (once).
    fn start_progress(&mut self) -> Result<()> {
        let out = self.rx_events_tx.take().ok_or(Error::Closed)?;
        let stop = Arc::new(AtomicBool::new(false));
        let eq = match &self.link {
            Link::Connected(eq) => Some(eq.clone()),
            Link::Unconnected(_) => None,
        };
        let (rx, ep) = (self.rx.clone(), self.ep.fid() as usize);
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("ofi-progress".into())
            .spawn(move || drive_rx(&rx, eq.as_deref(), ep, &out, &flag))
            .map_err(Error::Thread)?;
        self.progress = Some(Progress {
            stop,
            handle: Some(handle),
        });
        Ok(())
    }

    /// The endpoint registrations must be bound to (`FI_MR_ENDPOINT`), if they must.
    fn mr_endpoint(&self) -> Option<&Arc<Ep>> {
        self.mr_endpoint.then_some(&self.ep)
    }

    /// This endpoint's name (its address on the fabric).
    fn name(&self) -> Result<EndpointName> {
        getname(self.ep.fid())
    }

    /// Makes `name` this unconnected endpoint's peer.
    fn insert_peer(&mut self, name: &EndpointName) -> Result<()> {
        let Link::Unconnected(av) = &self.link else {
            return Err(Error::Protocol(
                "a connected libfabric endpoint takes no peer name".into(),
            ));
        };
        let mut addr: sys::fi_addr_t = 0;
        // SAFETY: live AV; the name is the provider's own format, from the peer's
        // fi_getname, and `addr` has room for one address.
        let rc = unsafe {
            sys::colo_fi_av_insert(av.ptr, name.as_bytes().as_ptr().cast(), 1, &mut addr, 0)
        };
        if rc != 1 {
            return Err(if rc < 0 {
                call_error("fi_av_insert", rc.into())
            } else {
                Error::Protocol(format!(
                    "libfabric could not resolve the peer's endpoint name {name:?}"
                ))
            });
        }
        self.peer = addr;
        Ok(())
    }

    /// Sends this endpoint's name to its peer (the sender's first message on an
    /// unconnected endpoint), and waits until it is delivered.
    fn announce(&mut self, timeout: Duration) -> Result<()> {
        let mut msg = Vec::new();
        message::encode_address(&mut msg, &self.name()?);
        self.post_send(ADDRESS_ID, 0, &msg)?;
        let deadline = Instant::now() + timeout;
        let mut wcs = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(
                    timeout,
                    "the libfabric receiver to take our address",
                ));
            }
            self.poll_send(&mut wcs, left)?;
            if let Some(wc) = wcs.iter().find(|w| w.wr_id == ADDRESS_ID) {
                return match wc.status {
                    WcStatus::Success => Ok(()),
                    s => Err(s.into_error("the address message to the libfabric receiver")),
                };
            }
        }
    }

    fn desc(&self, mr: &Mr) -> *mut c_void {
        if self.local_mr {
            mr_desc(mr)
        } else {
            ptr::null_mut()
        }
    }

    fn post_recv(&mut self, slot: usize) -> Result<()> {
        let buf = self
            .recv
            .mem
            .ptr_at((slot * self.recv_len) as u64, self.recv_len as u64)?;
        let desc = self.desc(&self.recv.mr);
        let deadline = Instant::now() + POST_WAIT;
        loop {
            // SAFETY: live endpoint; the buffer is registered and lives as long as the
            // endpoint; the context is the slot number, never dereferenced.
            let rc = unsafe {
                sys::colo_fi_recv(
                    self.ep.ptr,
                    buf.cast(),
                    self.recv_len,
                    desc,
                    0,
                    slot as *mut c_void,
                )
            };
            if rc == -(sys::FI_EAGAIN as isize) && Instant::now() < deadline {
                std::thread::yield_now();
                continue;
            }
            return check("fi_recv", rc as i64).map_err(|e| Error::Post(e.to_string()));
        }
    }

    /// The local address and descriptor of one SGE.
    fn local_iov(&self, s: &Sge) -> Result<(sys::iovec, *mut c_void)> {
        let (base, mr) = match (&self.local, s.mr) {
            (Some(Local::Source(mr, r)), LocalMr::Source) => (r, mr),
            (Some(Local::Bounce(mr, r)), LocalMr::Bounce) => (r, mr),
            _ => {
                return Err(Error::Post(format!(
                    "an SGE reads {:?} memory, which is not registered here",
                    s.mr
                )));
            }
        };
        let p = base.ptr_at(s.offset, u64::from(s.len))?;
        Ok((
            sys::iovec {
                iov_base: p.cast(),
                iov_len: s.len as usize,
            },
            self.desc(mr),
        ))
    }

    /// Posts with `call`, retrying for up to [`POST_WAIT`] while the provider's queue is
    /// full (driving its progress meanwhile, and keeping what completes for the next poll).
    fn post(&mut self, what: &'static str, call: impl Fn() -> isize) -> Result<()> {
        let deadline = Instant::now() + POST_WAIT;
        loop {
            let rc = call();
            if rc == 0 {
                return Ok(());
            }
            if rc != -(sys::FI_EAGAIN as isize) || Instant::now() >= deadline {
                return Err(Error::Post(format!(
                    "{what}: {}",
                    strerror(rc.unsigned_abs() as i32)
                )));
            }
            let mut got = std::mem::take(&mut self.pending);
            self.read_tx(&mut got, None)?;
            self.pending = got;
        }
    }

    /// Posts one operation for work request `wr_id` with `call`, which gets the context
    /// its completion will carry: the id itself on a connected endpoint, the operation's
    /// in-order token on an unconnected one (forgotten again if the post fails).
    fn post_op(
        &mut self,
        what: &'static str,
        wr_id: u64,
        signaled: bool,
        call: impl Fn(*mut c_void) -> isize,
    ) -> Result<()> {
        let context = match &mut self.in_order {
            Some(q) => q.post(wr_id, signaled),
            None => wr_id,
        };
        let posted = self.post(what, || call(context as *mut c_void));
        if posted.is_err()
            && let Some(q) = &mut self.in_order
        {
            q.unpost();
        }
        posted
    }

    /// Reads up to [`POLL_BATCH`] send completions (waiting up to `timeout`) into `out`.
    fn read_tx(&mut self, out: &mut Vec<Wc>, timeout: Option<Duration>) -> Result<()> {
        let mut entries = [sys::fi_cq_data_entry::default(); POLL_BATCH];
        let rc = self
            .tx
            .read(entries.as_mut_ptr().cast(), POLL_BATCH, timeout);
        if rc > 0 {
            let done = &entries[..rc as usize];
            match &mut self.in_order {
                Some(q) => done
                    .iter()
                    .for_each(|e| q.complete(e.op_context as u64, out)),
                None => out.extend(done.iter().map(|e| Wc {
                    wr_id: e.op_context as u64,
                    status: WcStatus::Success,
                })),
            }
            return Ok(());
        }
        if rc == -(sys::FI_EAGAIN as isize) {
            return Ok(());
        }
        if rc == -(sys::FI_EAVAIL as isize) {
            let mut err = sys::fi_cq_err_entry::default();
            let n = self.tx.read_err(&mut err);
            if n > 0 {
                let context = err.op_context as u64;
                let wr_id = match &mut self.in_order {
                    Some(q) => {
                        let id = q.fail(context);
                        // It retires with the error; what follows it may retire now.
                        q.complete(context, out);
                        id
                    }
                    None => context,
                };
                tracing::debug!(
                    err = err.err,
                    prov_errno = err.prov_errno,
                    wr_id,
                    "libfabric send completion failed"
                );
                out.push(Wc {
                    wr_id,
                    status: status_of(err.err),
                });
                return Ok(());
            }
            return Err(call_error("fi_cq_readerr", n as i64));
        }
        Err(call_error("fi_cq_sread", rc as i64))
    }
}

/// The verbs status a libfabric completion error stands for.
fn status_of(err: c_int) -> WcStatus {
    match err.unsigned_abs() {
        sys::FI_EACCES | sys::FI_EKEYREJECTED | sys::FI_EINVAL => WcStatus::RemoteAccess,
        sys::FI_ECANCELED => WcStatus::Flushed,
        sys::FI_ETIMEDOUT | sys::FI_ECONNRESET | sys::FI_ECONNABORTED | sys::FI_ENOTCONN => {
            WcStatus::RetryExceeded
        }
        sys::FI_EIO => WcStatus::RemoteOperation,
        sys::FI_ETRUNC => WcStatus::LocalLength,
        other => WcStatus::Other(other),
    }
}

impl Endpoint for OfiEndpoint {
    fn caps(&self) -> Caps {
        self.caps
    }

    fn bounce(&self) -> Option<&Region> {
        match &self.local {
            Some(Local::Bounce(_, r)) => Some(r),
            _ => None,
        }
    }

    fn post_writes(&mut self, wrs: &[WriteWr], sges: &[Sge]) -> Result<()> {
        // Consecutive work requests travel in one fi_writemsg while their SGEs fit the
        // provider's local iov limit and their remote ranges its RMA iov limit (libfabric
        // scatters the gathered bytes over the remote ranges in order). A signaled request
        // ends its message, which completes with its id; completions retire in order, as
        // the pipeline expects of a queue pair.
        let mut iovs = Vec::with_capacity(self.caps.max_sge);
        let mut descs = Vec::with_capacity(self.caps.max_sge);
        let mut rmas: Vec<sys::fi_rma_iov> = Vec::with_capacity(self.rma_iov_limit);
        for (n, wr) in wrs.iter().enumerate() {
            let chain = sges
                .get(wr.first_sge..wr.first_sge + wr.num_sge)
                .ok_or_else(|| Error::Post("a work request names SGEs it was not given".into()))?;
            if chain.len() > self.caps.max_sge {
                return Err(Error::Post(format!(
                    "{} SGEs in one write; the provider takes {}",
                    chain.len(),
                    self.caps.max_sge
                )));
            }
            for s in chain {
                let (iov, desc) = self.local_iov(s)?;
                iovs.push(iov);
                descs.push(desc);
            }
            rmas.push(sys::fi_rma_iov {
                addr: wr.remote_addr,
                len: wr.len(sges) as usize,
                key: wr.rkey,
            });
            let last = n + 1 == wrs.len();
            let next_fits = wrs.get(n + 1).is_some_and(|next| {
                iovs.len() + next.num_sge <= self.caps.max_sge && rmas.len() < self.rma_iov_limit
            });
            if !wr.signaled && !last && next_fits {
                continue;
            }
            let mut flags = if last { 0 } else { u64::from(sys::FI_MORE) };
            if self.in_order.is_some() {
                // Unconnected: every write completes once the target placed it, and
                // completions retire in order (see `InOrder`).
                flags |= u64::from(sys::FI_COMPLETION) | u64::from(sys::FI_DELIVERY_COMPLETE);
            } else if wr.signaled {
                flags |= u64::from(sys::FI_COMPLETION);
                if last {
                    // The last write of a chain completes only once the target placed it
                    // (and, the connection being ordered, every write before it): a write
                    // the target refused, which makes it close the connection, then fails
                    // here, before the pipeline posts a commit, as on verbs. The others
                    // complete when sent, which spares a round trip each.
                    flags |= u64::from(sys::FI_DELIVERY_COMPLETE);
                }
            }
            let (ep, peer) = (self.ep.ptr, self.peer);
            let (iov_count, rma_iov_count) = (iovs.len(), rmas.len());
            let (iov_ptr, desc_ptr, rma_ptr) = (iovs.as_ptr(), descs.as_mut_ptr(), rmas.as_ptr());
            self.post_op("fi_writemsg", wr.wr_id, wr.signaled, |context| {
                let msg = sys::fi_msg_rma {
                    msg_iov: iov_ptr,
                    desc: desc_ptr,
                    iov_count,
                    addr: peer,
                    rma_iov: rma_ptr,
                    rma_iov_count,
                    context,
                    data: 0,
                };
                // SAFETY: live endpoint; `msg` and the arrays it points to live for the
                // call (the provider copies them); the local memory is registered.
                unsafe { sys::colo_fi_writemsg(ep, &msg, flags) }
            })?;
            iovs.clear();
            descs.clear();
            rmas.clear();
        }
        Ok(())
    }

    fn post_send(&mut self, wr_id: u64, imm: u32, msg: &[u8]) -> Result<()> {
        if msg.len() > self.send.mem.len() {
            return Err(Error::Post(format!(
                "a {}-byte message exceeds the {}-byte send buffer",
                msg.len(),
                self.send.mem.len()
            )));
        }
        self.send.mem.write_at(0, msg)?;
        let iov = sys::iovec {
            iov_base: self.send.mem.as_ptr().cast(),
            iov_len: msg.len(),
        };
        let mut desc = self.desc(&self.send.mr);
        let desc_ptr: *mut *mut c_void = &mut desc;
        let flags = u64::from(sys::FI_COMPLETION | sys::FI_REMOTE_CQ_DATA);
        let (ep, peer) = (self.ep.ptr, self.peer);
        self.post_op("fi_sendmsg", wr_id, true, |context| {
            let m = sys::fi_msg {
                msg_iov: &iov,
                desc: desc_ptr,
                iov_count: 1,
                addr: peer,
                context,
                data: u64::from(imm),
            };
            // SAFETY: live endpoint; `m` and what it points to live for the call; the send
            // buffer is registered and not reused until this send completes (the pipeline
            // keeps one send outstanding).
            unsafe { sys::colo_fi_sendmsg(ep, &m, flags) }
        })
    }

    fn poll_send(&mut self, out: &mut Vec<Wc>, timeout: Duration) -> Result<()> {
        if !self.pending.is_empty() {
            out.append(&mut self.pending);
            return Ok(());
        }
        self.read_tx(out, Some(timeout))
    }

    fn recv(&mut self, buf: &mut Vec<u8>, timeout: Duration) -> Result<u32> {
        let (slot, len, flags, data) = match self.rx_events.recv_timeout(timeout) {
            Ok(RxEvent::Message {
                slot,
                len,
                flags,
                data,
            }) => (slot, len, flags, data),
            Ok(RxEvent::Failed(status)) => return Err(status.into_error("a posted receive")),
            Ok(RxEvent::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                return Err(WcStatus::RetryExceeded.into_error("the libfabric connection"));
            }
            Err(RecvTimeoutError::Timeout) => {
                return Err(Error::Timeout(
                    timeout,
                    "a message on the libfabric endpoint",
                ));
            }
        };
        let has_imm = flags & u64::from(sys::FI_REMOTE_CQ_DATA) != 0;
        if slot >= RECV_DEPTH || len > self.recv_len || !has_imm {
            return Err(Error::Protocol(format!(
                "a receive completion for slot {slot} of {len} bytes (immediate: {has_imm})"
            )));
        }
        let imm = u32::try_from(data)
            .map_err(|_| Error::Protocol(format!("immediate data {data:#x} over 32 bits")))?;
        buf.resize(len, 0);
        self.recv.mem.read_at((slot * self.recv_len) as u64, buf)?;
        self.post_recv(slot)?;
        Ok(imm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(out: &[Wc]) -> Vec<u64> {
        out.iter().map(|w| w.wr_id).collect()
    }

    #[test]
    fn completions_retire_in_the_order_of_their_posts() {
        let mut q = InOrder::default();
        let (a, b, c) = (q.post(1, false), q.post(2, true), q.post(3, true));
        let mut out = Vec::new();
        // The last completes first: nothing retires before the ones posted ahead of it.
        q.complete(c, &mut out);
        q.complete(a, &mut out);
        assert!(out.is_empty());
        q.complete(b, &mut out);
        assert_eq!(ids(&out), [2, 3], "unsignaled 1 retires silently");
        // A failed operation retires without a success; what follows it retires after.
        out.clear();
        let (d, e) = (q.post(4, true), q.post(5, true));
        q.complete(e, &mut out);
        assert_eq!(q.fail(d), 4);
        q.complete(d, &mut out);
        assert_eq!(ids(&out), [5]);
        // A refused post is forgotten; a stray token changes nothing.
        let f = q.post(6, true);
        q.unpost();
        q.complete(f, &mut out);
        q.complete(u64::MAX, &mut out);
        assert_eq!(ids(&out), [5]);
        assert!(q.queue.is_empty());
    }
}
