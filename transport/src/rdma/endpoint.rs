//! The verbs endpoint: rdma_cm connection setup, memory registration, and the work
//! requests and completions of one RC queue pair.
//!
//! Completion queues are polled (no completion channel): the pipeline waits on them only
//! at a fence, a commit or a full send queue, where latency matters more than a core.

use std::ffi::{CStr, CString};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::raw::c_int;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_sys::{
    ibv_access_flags, ibv_alloc_pd, ibv_close_device, ibv_context, ibv_dealloc_pd, ibv_dereg_mr,
    ibv_device_attr, ibv_free_device_list, ibv_get_device_list, ibv_get_device_name, ibv_gid,
    ibv_mr, ibv_open_device, ibv_pd, ibv_poll_cq, ibv_port_attr, ibv_port_state, ibv_post_recv,
    ibv_post_send, ibv_qp_init_attr, ibv_qp_type, ibv_query_device, ibv_query_gid, ibv_recv_wr,
    ibv_reg_mr, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc, ibv_wc_flags, ibv_wc_status,
    ibv_wr_opcode, rdma_accept, rdma_addrinfo, rdma_cm_id, rdma_conn_param, rdma_connect,
    rdma_create_ep, rdma_create_qp, rdma_destroy_ep, rdma_freeaddrinfo, rdma_get_request,
    rdma_get_src_port, rdma_getaddrinfo, rdma_listen, rdma_port_space, rdma_t,
};

use super::{RdmaError, RdmaOptions};
use crate::error::{Error, Result};
use crate::push::RegionDesc;
use crate::verbs::{
    Caps, Endpoint, LocalMr, Sge, VerbsOptions, VerbsReceiver, VerbsSender, Wc, WcStatus, WriteWr,
    memlock_limit, message,
};
use colo_memory::Region;

/// Receive buffers posted on each side. The protocol keeps at most one message in flight
/// each way (a commit waits for the previous release); the rest are spares.
const RECV_DEPTH: usize = 4;
/// Completions taken per poll.
const POLL_BATCH: usize = 16;

fn call_error(call: &'static str) -> Error {
    Error::Rdma(RdmaError::Call {
        call,
        source: io::Error::last_os_error(),
    })
}

/// rdma_cm calls return -1 and set errno.
fn cm(call: &'static str, rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(call_error(call))
    }
}

/// Verbs calls return the errno value itself.
fn verbs(call: &'static str, rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Rdma(RdmaError::Call {
            call,
            source: io::Error::from_raw_os_error(rc.abs()),
        }))
    }
}

/// A protection domain.
#[derive(Debug)]
struct Pd(*mut ibv_pd);

// SAFETY: a PD handle may be used and released from any thread (libibverbs locks
// internally); it is only passed to verbs calls.
unsafe impl Send for Pd {}
// SAFETY: as for Send; shared use only passes the handle to thread-safe verbs calls.
unsafe impl Sync for Pd {}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: the PD came from ibv_alloc_pd; every MR and QP in it is gone by now
        // (they hold an Arc of it).
        unsafe { ibv_dealloc_pd(self.0) };
    }
}

/// A registered memory region.
#[derive(Debug)]
struct Mr {
    mr: *mut ibv_mr,
    _pd: Arc<Pd>,
}

// SAFETY: an MR handle may be used and deregistered from any thread; reads of its keys
// are reads of immutable fields.
unsafe impl Send for Mr {}
// SAFETY: as for Send.
unsafe impl Sync for Mr {}

impl Mr {
    fn register(pd: &Arc<Pd>, region: &Region, access: u32) -> Result<Self> {
        // SAFETY: the region's memory is valid for its length and outlives the MR (the
        // owners keep an Arc of the region beside the MR).
        let mr = unsafe { ibv_reg_mr(pd.0, region.as_ptr().cast(), region.len(), access as c_int) };
        if mr.is_null() {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::ENOMEM | libc::EPERM | libc::EAGAIN) => {
                    Error::Rdma(RdmaError::Memlock {
                        len: region.len(),
                        limit: memlock_limit(),
                        source,
                    })
                }
                _ => Error::Rdma(RdmaError::Call {
                    call: "ibv_reg_mr",
                    source,
                }),
            });
        }
        Ok(Self {
            mr,
            _pd: Arc::clone(pd),
        })
    }

    fn lkey(&self) -> u32 {
        // SAFETY: `mr` is a live registration.
        unsafe { (*self.mr).lkey }
    }

    fn rkey(&self) -> u32 {
        // SAFETY: `mr` is a live registration.
        unsafe { (*self.mr).rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered once by `register`, deregistered once here.
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

/// A registered buffer the endpoint owns.
#[derive(Debug)]
struct Buf {
    mr: Mr,
    mem: Region,
}

impl Buf {
    fn new(pd: &Arc<Pd>, len: usize, access: u32) -> Result<Self> {
        let mem = Region::anonymous(len.max(1))?;
        let mr = Mr::register(pd, &mem, access)?;
        Ok(Self { mr, mem })
    }

    fn sge(&self, offset: u64, len: u32) -> Result<ibv_sge> {
        Ok(ibv_sge {
            addr: self.mem.ptr_at(offset, u64::from(len))? as u64,
            length: len,
            lkey: self.mr.lkey(),
        })
    }
}

/// rdma_getaddrinfo's result.
struct AddrInfo(*mut rdma_addrinfo);

impl Drop for AddrInfo {
    fn drop(&mut self) {
        // SAFETY: from rdma_getaddrinfo, freed once.
        unsafe { rdma_freeaddrinfo(self.0) };
    }
}

fn addrinfo(
    addr: SocketAddr,
    passive: bool,
    src: Option<&(libc::sockaddr_storage, u32)>,
) -> Result<AddrInfo> {
    let node = CString::new(addr.ip().to_string()).map_err(|_| Error::Closed)?;
    let service = CString::new(addr.port().to_string()).map_err(|_| Error::Closed)?;
    // SAFETY: all-zero is a valid rdma_addrinfo (null pointers, zero lengths).
    let mut hints: rdma_addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_port_space = rdma_port_space::RDMA_PS_TCP as c_int;
    hints.ai_qp_type = ibv_qp_type::IBV_QPT_RC as c_int;
    hints.ai_flags =
        (rdma_sys::RAI_NUMERICHOST | if passive { rdma_sys::RAI_PASSIVE } else { 0 }) as c_int;
    if let Some((ss, len)) = src {
        // librdmacm copies the hinted source address into the result.
        hints.ai_src_addr = ptr::from_ref(ss).cast_mut().cast();
        hints.ai_src_len = *len;
    }
    let mut res = ptr::null_mut();
    // SAFETY: node/service are NUL-terminated, hints is initialized (its source address, if
    // any, outlives the call), res is an out-pointer.
    let rc = unsafe { rdma_getaddrinfo(node.as_ptr(), service.as_ptr(), &hints, &mut res) };
    if rc != 0 || res.is_null() {
        return Err(call_error("rdma_getaddrinfo"));
    }
    Ok(AddrInfo(res))
}

fn device_name(ctx: *mut ibv_context) -> String {
    if ctx.is_null() {
        return String::new();
    }
    // SAFETY: a live context has a live device whose name is NUL-terminated.
    unsafe { CStr::from_ptr(ibv_get_device_name((*ctx).device)) }
        .to_string_lossy()
        .into_owned()
}

/// Checks that rdma_cm resolved `id` onto the device and port asked for, and that the port
/// is up. Returns the port's largest message.
fn check_route(id: *mut rdma_cm_id, opts: &RdmaOptions, addr: SocketAddr) -> Result<u64> {
    // SAFETY: `id` is a live cm id.
    let (ctx, port) = unsafe { ((*id).verbs, (*id).port_num) };
    if ctx.is_null() {
        return Err(Error::Rdma(RdmaError::Mismatch {
            what: format!(
                "{} is not the address of an RDMA netdev (bind to the device's IP, not a \
                 wildcard; the address chooses the device)",
                addr.ip()
            ),
        }));
    }
    let name = device_name(ctx);
    if let Some(want) = &opts.device {
        if *want != name {
            return Err(Error::Rdma(RdmaError::Mismatch {
                what: format!(
                    "{} routes through RDMA device {name}, not {want}",
                    addr.ip()
                ),
            }));
        }
    }
    if port != 0 && port != opts.port {
        return Err(Error::Rdma(RdmaError::Mismatch {
            what: format!(
                "{} routes through port {port} of {name}, not port {}",
                addr.ip(),
                opts.port
            ),
        }));
    }
    // SAFETY: all-zero is a valid port attribute block to be filled in.
    let mut pa: ibv_port_attr = unsafe { std::mem::zeroed() };
    // SAFETY: live context, out-pointer to a properly sized attribute block.
    verbs("ibv_query_port", unsafe {
        rdma_sys::___ibv_query_port(ctx, opts.port, &mut pa)
    })?;
    if pa.state != ibv_port_state::IBV_PORT_ACTIVE {
        return Err(Error::Rdma(RdmaError::Mismatch {
            what: format!(
                "port {} of {name} is not active (state {}); check `ibv_devinfo`",
                opts.port, pa.state
            ),
        }));
    }
    Ok(u64::from(pa.max_msg_sz))
}

/// Creates the RC queue pair on `id` in `pd`, clamped to the device. Returns the caps.
fn create_qp(id: *mut rdma_cm_id, pd: &Pd, opts: &RdmaOptions, max_msg: u64) -> Result<Caps> {
    // SAFETY: all-zero is a valid device attribute block to be filled in.
    let mut da: ibv_device_attr = unsafe { std::mem::zeroed() };
    // SAFETY: `id` is live and resolved, so its context is live.
    verbs("ibv_query_device", unsafe {
        ibv_query_device((*id).verbs, &mut da)
    })?;
    // SAFETY: all-zero is a valid init attribute block (null CQs: rdma_cm creates them).
    let mut attr: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
    attr.qp_type = ibv_qp_type::IBV_QPT_RC;
    attr.sq_sig_all = 0;
    let asked = opts.send_queue.clamp(2, da.max_qp_wr.max(2) as u32);
    attr.cap.max_send_wr = asked;
    attr.cap.max_recv_wr = RECV_DEPTH as u32;
    attr.cap.max_send_sge = opts.max_sge.clamp(1, da.max_sge.max(1) as u32);
    attr.cap.max_recv_sge = 1;
    // SAFETY: live id and PD of its device; attr is initialized and receives the caps.
    cm("rdma_create_qp", unsafe {
        rdma_create_qp(id, pd.0, &mut attr)
    })?;
    Ok(Caps {
        max_sge: attr.cap.max_send_sge as usize,
        // The provider may round the queue up, but rdma_cm sized the send CQ for what was
        // asked: never keep more in flight than that.
        max_send_wr: attr.cap.max_send_wr.min(asked) as usize,
        max_msg: if max_msg == 0 { 1 << 30 } else { max_msg },
        recv_len: 0,
        wide_keys: false,
    })
}

/// The listening rdma_cm id and the registered receive region.
#[derive(Debug)]
struct Listen {
    id: *mut rdma_cm_id,
    pd: Arc<Pd>,
    region_mr: Mr,
    _region: Arc<Region>,
}

impl Drop for Listen {
    fn drop(&mut self) {
        // SAFETY: created by rdma_create_ep, destroyed once; connections made from it
        // hold an Arc of this, so it outlives them.
        unsafe { rdma_destroy_ep(self.id) };
    }
}

// SAFETY: the verbs and rdma_cm objects are usable from any thread (libibverbs and
// librdmacm lock internally); the raw pointers are only dereferenced through them.
unsafe impl Send for Listen {}
// SAFETY: as for Send. Shared (`&`) access only reads the immutable keys; the one call
// that changes the listening id (rdma_get_request) goes through `&mut RdmaListener`, the
// only handle that can make it.
unsafe impl Sync for Listen {}

/// The receiving side's rdma_cm listener with the RAM cache registered for remote write.
#[derive(Debug)]
pub struct RdmaListener {
    listen: Arc<Listen>,
    desc: RegionDesc,
    opts: RdmaOptions,
}

impl RdmaListener {
    /// Listens on `addr` (the IP of an RDMA netdev; port 0 picks one) and registers
    /// `region` with local and remote write access only.
    ///
    /// # Errors
    /// [`Error::Rdma`]: no such device/port, a wildcard address, a registration refused by
    /// the locked-memory limit (with the fix), or a failed rdma_cm call.
    pub fn bind(
        addr: SocketAddr,
        region: Arc<Region>,
        page_size: u32,
        opts: &RdmaOptions,
    ) -> Result<Self> {
        let info = addrinfo(addr, true, None)?;
        let mut id = ptr::null_mut();
        // SAFETY: `info` is a live addrinfo; no PD or QP attributes: a passive id.
        cm("rdma_create_ep", unsafe {
            rdma_create_ep(&mut id, info.0, ptr::null_mut(), ptr::null_mut())
        })?;
        let guard = IdGuard(id);
        check_route(id, opts, addr)?;
        // SAFETY: `id` is live and bound to a device.
        cm("rdma_listen", unsafe { rdma_listen(id, 1) })?;
        // SAFETY: the bound id's context is live.
        let pd = unsafe { ibv_alloc_pd((*id).verbs) };
        if pd.is_null() {
            return Err(call_error("ibv_alloc_pd"));
        }
        let pd = Arc::new(Pd(pd));
        // Remote write (which needs local write) and nothing else: never remote read.
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        let region_mr = Mr::register(&pd, &region, access)?;
        // SAFETY: `id` is live and listening.
        let port = u16::from_be(unsafe { rdma_get_src_port(id) });
        let desc = RegionDesc {
            addr: region.as_ptr() as u64,
            key: u64::from(region_mr.rkey()),
            len: region.len() as u64,
            page_size,
            port,
            name: crate::push::EndpointName::EMPTY,
        };
        std::mem::forget(guard);
        Ok(Self {
            listen: Arc::new(Listen {
                id,
                pd,
                region_mr,
                _region: region,
            }),
            desc,
            opts: opts.clone(),
        })
    }

    /// The region as the sender needs it (send it over the control channel).
    pub fn desc(&self) -> &RegionDesc {
        &self.desc
    }

    /// Waits up to `timeout` for the sender to connect, and accepts it.
    ///
    /// # Errors
    /// [`Error::Timeout`], or a failed verbs/rdma_cm call.
    pub fn accept(&mut self, timeout: Duration) -> Result<VerbsReceiver<RdmaEndpoint>> {
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
    pub fn accept_endpoint(&mut self, timeout: Duration) -> Result<RdmaEndpoint> {
        // SAFETY: the listening id has a live event channel.
        let fd = unsafe { (*(*self.listen.id).channel).fd };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = c_int::try_from(left.as_millis()).unwrap_or(c_int::MAX);
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 {
                break;
            }
            if n == 0 {
                return Err(Error::Timeout(timeout, "the RDMA sender to connect"));
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return Err(call_error("poll"));
            }
        }
        let mut id = ptr::null_mut();
        // SAFETY: the listening id is live; the channel is readable, so this does not block.
        cm("rdma_get_request", unsafe {
            rdma_get_request(self.listen.id, &mut id)
        })?;
        let guard = IdGuard(id);
        let max_msg = check_route(id, &self.opts, SocketAddr::new(IpAddr::from([0u8; 4]), 0))?;
        let caps = create_qp(id, &self.listen.pd, &self.opts, max_msg)?;
        let recv_len = message::commit_len(self.desc.bitmap_words());
        let ep = RdmaEndpoint::new(
            guard,
            Arc::clone(&self.listen.pd),
            caps,
            (recv_len, message::HEADER_LEN),
            None,
            Some(Arc::clone(&self.listen)),
        )?;
        let mut param = conn_param();
        // SAFETY: the id has its QP and posted receives.
        cm("rdma_accept", unsafe { rdma_accept(ep.id.0, &mut param) })?;
        tracing::info!(
            device = %device_name(self.listen_ctx()),
            rkey = self.listen.region_mr.rkey(),
            "RDMA push connection accepted"
        );
        Ok(ep)
    }

    fn listen_ctx(&self) -> *mut ibv_context {
        // SAFETY: the listening id is live.
        unsafe { (*self.listen.id).verbs }
    }
}

/// Destroys an id on an early return.
struct IdGuard(*mut rdma_cm_id);

impl Drop for IdGuard {
    fn drop(&mut self) {
        // SAFETY: an id not yet handed to an owner; destroyed once.
        unsafe { rdma_destroy_ep(self.0) };
    }
}

fn conn_param() -> rdma_conn_param {
    // SAFETY: all-zero is a valid connection parameter block.
    let mut p: rdma_conn_param = unsafe { std::mem::zeroed() };
    p.responder_resources = 1;
    p.initiator_depth = 1;
    p.retry_count = 7;
    p.rnr_retry_count = 7;
    p
}

/// The IP address in GID table entry `index` of `device` (or the first device), port
/// `port`: RoCE GIDs carry the netdev's address.
fn gid_address(device: Option<&str>, port: u8, index: u8) -> Result<IpAddr> {
    let name = super::select_device(device)?;
    let mut n = 0;
    // SAFETY: `n` is a valid out-pointer; the list is freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Err(call_error("ibv_get_device_list"));
    }
    let mut ctx = ptr::null_mut();
    for i in 0..n.max(0) as usize {
        // SAFETY: the list holds `n` device pointers.
        let dev = unsafe { *list.add(i) };
        // SAFETY: a listed device has a NUL-terminated name.
        let this = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) };
        if this.to_string_lossy() == name {
            // SAFETY: a listed device, opened once and closed below.
            ctx = unsafe { ibv_open_device(dev) };
            break;
        }
    }
    // SAFETY: freed once; the opened context does not depend on the list.
    unsafe { ibv_free_device_list(list) };
    if ctx.is_null() {
        return Err(call_error("ibv_open_device"));
    }
    // SAFETY: all-zero is a valid GID to be filled in.
    let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
    // SAFETY: live context, out-pointer to a GID.
    let rc = unsafe { ibv_query_gid(ctx, port, c_int::from(index), &mut gid) };
    // ibv_query_gid returns -1 and sets errno: read it before closing the device.
    let queried = cm("ibv_query_gid", rc);
    // SAFETY: opened above, closed once.
    unsafe { ibv_close_device(ctx) };
    queried?;
    // SAFETY: every bit pattern of the union is a valid byte array.
    let raw = unsafe { gid.raw };
    if raw == [0; 16] {
        return Err(Error::Rdma(RdmaError::Mismatch {
            what: format!("GID index {index} of {name} port {port} is empty"),
        }));
    }
    let v6 = std::net::Ipv6Addr::from(raw);
    Ok(match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    })
}

/// Connects to the receiver at `addr` (its control-channel address's IP, and the port of
/// `remote`), registers `source` (or bounce buffers), and returns the sending pipeline
/// whose first epoch is 1.
///
/// # Errors
/// [`Error::Rdma`] for a device, port, GID, registration or connection failure (a
/// locked-memory limit too small even for the bounce buffers says how to raise it), or
/// [`Error::Protocol`] for an unusable remote descriptor.
pub fn connect(
    addr: IpAddr,
    remote: RegionDesc,
    source: Arc<Region>,
    opts: &RdmaOptions,
    vopts: VerbsOptions,
) -> Result<VerbsSender<RdmaEndpoint>> {
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
    opts: &RdmaOptions,
) -> Result<RdmaEndpoint> {
    let target = SocketAddr::new(addr, remote.port);
    let src = match opts.gid_index {
        Some(index) => {
            let ip = gid_address(opts.device.as_deref(), opts.port, index)?;
            let usable = match ip {
                IpAddr::V4(_) => addr.is_ipv4(),
                IpAddr::V6(v6) => addr.is_ipv6() && (v6.segments()[0] & 0xffc0) != 0xfe80,
            };
            if !usable {
                return Err(Error::Rdma(RdmaError::Mismatch {
                    what: format!(
                        "GID index {index} holds {ip}, which cannot reach {addr} (another \
                         address family, or link-local); pick a RoCE v2 entry with the \
                         netdev's routable address"
                    ),
                }));
            }
            tracing::info!(%ip, gid_index = index, "RDMA source address from the GID table");
            Some(socket_addr(ip))
        }
        None => None,
    };
    let info = addrinfo(target, false, src.as_ref())?;
    let mut id = ptr::null_mut();
    // SAFETY: live addrinfo; no PD or QP yet (created below in our own PD).
    let rc = unsafe { rdma_create_ep(&mut id, info.0, ptr::null_mut(), ptr::null_mut()) };
    cm("rdma_create_ep", rc)?;
    drop(info);
    let resolved = IdGuard(id);
    let max_msg = check_route(id, opts, target)?;
    // SAFETY: the resolved id's context is live.
    let pd = unsafe { ibv_alloc_pd((*id).verbs) };
    if pd.is_null() {
        return Err(call_error("ibv_alloc_pd"));
    }
    let pd = Arc::new(Pd(pd));
    // Declared after the PD, so on an early return the id (and its QP) goes first.
    let guard = resolved;
    let caps = create_qp(id, &pd, opts, max_msg)?;
    // The source is only read by the device: no access flags beyond local read.
    let local = match Mr::register(&pd, &source, 0) {
        Ok(mr) => Local::Source(mr),
        Err(e) => {
            tracing::warn!(
                error = %e,
                bounce_bytes = opts.bounce_len,
                "cannot register guest memory; pushing through registered bounce buffers"
            );
            Local::Bounce(Buf::new(
                &pd,
                opts.bounce_len,
                ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
            )?)
        }
    };
    let send_len = message::commit_len(remote.bitmap_words());
    let ep = RdmaEndpoint::new(
        guard,
        pd,
        caps,
        (message::HEADER_LEN, send_len),
        Some((local, source)),
        None,
    )?;
    let mut param = conn_param();
    // SAFETY: the id has its QP and posted receives.
    cm("rdma_connect", unsafe { rdma_connect(ep.id.0, &mut param) })?;
    tracing::info!(
        device = %device_name(ep.ctx()),
        max_sge = caps.max_sge,
        send_queue = caps.max_send_wr,
        "RDMA push connection established"
    );
    Ok(ep)
}

fn socket_addr(ip: IpAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match ip {
        IpAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            unsafe { ptr::write(ptr::from_mut(&mut ss).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in6.
            unsafe { ptr::write(ptr::from_mut(&mut ss).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as u32)
}

/// The sender's local memory for RDMA WRITE sources.
#[derive(Debug)]
enum Local {
    Source(Mr),
    Bounce(Buf),
}

/// One connected RC queue pair. Fields drop in order: the id (with its QP and CQs)
/// first, then the registrations, then the PD.
pub struct RdmaEndpoint {
    id: IdGuard,
    caps: Caps,
    /// The sender's source registration and region.
    local: Option<(Local, Arc<Region>)>,
    send: Buf,
    recv: Buf,
    recv_len: usize,
    sges: Vec<ibv_sge>,
    wrs: Vec<ibv_send_wr>,
    wcs: Vec<ibv_wc>,
    /// Dropped after the id: the PD outlives the QP.
    _pd: Arc<Pd>,
    _listen: Option<Arc<Listen>>,
}

// SAFETY: the verbs objects behind the raw pointers may be used from any thread; the
// endpoint is used through `&mut` by one thread at a time.
unsafe impl Send for RdmaEndpoint {}

impl std::fmt::Debug for RdmaEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaEndpoint")
            .field("device", &device_name(self.ctx()))
            .field("caps", &self.caps)
            .field("bounce", &self.bounce().is_some())
            .finish_non_exhaustive()
    }
}

impl RdmaEndpoint {
    /// Takes ownership of the id (destroyed once, by this endpoint, whatever happens).
    /// `lens` is (receive buffer, send buffer) in bytes.
    fn new(
        id: IdGuard,
        pd: Arc<Pd>,
        mut caps: Caps,
        (recv_len, send_len): (usize, usize),
        local: Option<(Local, Arc<Region>)>,
        listen: Option<Arc<Listen>>,
    ) -> Result<Self> {
        // max_msg stays the port's limit: it bounds RDMA WRITEs. The send buffer is sized
        // for the largest message this side sends, and post_send checks against it.
        caps.recv_len = recv_len;
        let lw = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        let send = Buf::new(&pd, send_len, lw)?;
        let recv = Buf::new(&pd, recv_len * RECV_DEPTH, lw)?;
        let mut ep = Self {
            id,
            caps,
            local,
            send,
            recv,
            recv_len,
            sges: Vec::new(),
            wrs: Vec::new(),
            // SAFETY: all-zero work completions are valid placeholders to be filled in.
            wcs: (0..POLL_BATCH)
                .map(|_| unsafe { std::mem::zeroed() })
                .collect(),
            _pd: pd,
            _listen: listen,
        };
        for slot in 0..RECV_DEPTH {
            ep.post_recv(slot)?;
        }
        Ok(ep)
    }

    fn ctx(&self) -> *mut ibv_context {
        // SAFETY: the id is live while the endpoint is.
        unsafe { (*self.id.0).verbs }
    }

    fn post_recv(&mut self, slot: usize) -> Result<()> {
        let mut sge = self
            .recv
            .sge((slot * self.recv_len) as u64, self.recv_len as u32)?;
        let mut wr = ibv_recv_wr {
            wr_id: slot as u64,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is live; wr and its SGE are valid for the call (the device copies
        // them); the buffer is registered and outlives the QP.
        let rc = unsafe { ibv_post_recv((*self.id.0).qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(Error::Post(format!(
                "ibv_post_recv: {}",
                io::Error::from_raw_os_error(rc.abs())
            )));
        }
        Ok(())
    }

    fn local_sge(&self, s: &Sge) -> Result<ibv_sge> {
        let Some((local, source)) = &self.local else {
            return Err(Error::Post("this endpoint has no source memory".into()));
        };
        match (s.mr, local) {
            (LocalMr::Source, Local::Source(mr)) => Ok(ibv_sge {
                addr: source.ptr_at(s.offset, u64::from(s.len))? as u64,
                length: s.len,
                lkey: mr.lkey(),
            }),
            (LocalMr::Bounce, Local::Bounce(b)) => b.sge(s.offset, s.len),
            _ => Err(Error::Post(format!(
                "an SGE reads {:?} memory, which is not registered here",
                s.mr
            ))),
        }
    }

    /// Polls `cq` for at most `max` (≤ [`POLL_BATCH`]) completions until at least one
    /// arrives or the timeout passes; returns how many are in `wcs`.
    fn poll(&mut self, cq: *mut rdma_sys::ibv_cq, max: usize, timeout: Duration) -> Result<usize> {
        let max = max.clamp(1, POLL_BATCH);
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            // SAFETY: the CQ is live; `wcs` has room for POLL_BATCH ≥ max completions.
            let n = unsafe { ibv_poll_cq(cq, max as c_int, self.wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(Error::Rdma(RdmaError::Call {
                    call: "ibv_poll_cq",
                    source: io::Error::from_raw_os_error(-n),
                }));
            }
            if n > 0 || start.elapsed() >= timeout {
                return Ok(n as usize);
            }
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}

fn status_of(s: ibv_wc_status::Type) -> WcStatus {
    use ibv_wc_status as w;
    match s {
        w::IBV_WC_SUCCESS => WcStatus::Success,
        w::IBV_WC_LOC_LEN_ERR => WcStatus::LocalLength,
        w::IBV_WC_LOC_PROT_ERR => WcStatus::LocalProtection,
        w::IBV_WC_WR_FLUSH_ERR => WcStatus::Flushed,
        w::IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccess,
        w::IBV_WC_REM_INV_REQ_ERR => WcStatus::RemoteInvalidRequest,
        w::IBV_WC_REM_OP_ERR => WcStatus::RemoteOperation,
        w::IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExceeded,
        w::IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExceeded,
        other => WcStatus::Other(other),
    }
}

impl Endpoint for RdmaEndpoint {
    fn caps(&self) -> Caps {
        self.caps
    }

    fn bounce(&self) -> Option<&Region> {
        match &self.local {
            Some((Local::Bounce(b), _)) => Some(&b.mem),
            _ => None,
        }
    }

    fn post_writes(&mut self, wrs: &[WriteWr], sges: &[Sge]) -> Result<()> {
        if wrs.is_empty() {
            return Ok(());
        }
        let mut list = std::mem::take(&mut self.sges);
        list.clear();
        for s in sges {
            list.push(self.local_sge(s)?);
        }
        self.wrs.clear();
        let list_base = list.as_mut_ptr();
        for w in wrs {
            if w.first_sge + w.num_sge > list.len() || w.num_sge > self.caps.max_sge {
                self.sges = list;
                return Err(Error::Post(format!(
                    "a request of {} SGEs (the queue pair allows {})",
                    w.num_sge, self.caps.max_sge
                )));
            }
            // SAFETY: all-zero is a valid send work request to be filled in.
            let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = w.wr_id;
            // SAFETY: first_sge is within `list` (checked above); the pointer is used only
            // by the post below, before `list` changes.
            wr.sg_list = unsafe { list_base.add(w.first_sge) };
            wr.num_sge = w.num_sge as c_int;
            wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
            wr.send_flags = if w.signaled {
                ibv_send_flags::IBV_SEND_SIGNALED.0
            } else {
                0
            };
            wr.wr.rdma = rdma_t {
                remote_addr: w.remote_addr,
                // The sender checked the key against a verbs rkey (no wide keys here).
                rkey: u32::try_from(w.rkey).map_err(|_| {
                    Error::Post(format!(
                        "remote key {:#x} is wider than a verbs rkey",
                        w.rkey
                    ))
                })?,
            };
            self.wrs.push(wr);
        }
        // Link the chain now that the vector no longer moves.
        let base = self.wrs.as_mut_ptr();
        for i in 0..self.wrs.len() - 1 {
            // SAFETY: i and i + 1 are within the vector, which does not move until the post.
            unsafe { (*base.add(i)).next = base.add(i + 1) };
        }
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is live; the chain and its SGE lists are valid for the call (the
        // device copies them); every SGE lies in registered memory (checked above).
        let rc = unsafe { ibv_post_send((*self.id.0).qp, base, &mut bad) };
        self.sges = list;
        if rc != 0 {
            return Err(Error::Post(format!(
                "ibv_post_send: {}",
                io::Error::from_raw_os_error(rc.abs())
            )));
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
        let mut sge = self.send.sge(0, msg.len() as u32)?;
        // SAFETY: all-zero is a valid send work request to be filled in.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        let mut bad = ptr::null_mut();
        // SAFETY: live QP; wr and its SGE are valid for the call; the buffer is registered.
        let rc = unsafe { ibv_post_send((*self.id.0).qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(Error::Post(format!(
                "ibv_post_send: {}",
                io::Error::from_raw_os_error(rc.abs())
            )));
        }
        Ok(())
    }

    fn poll_send(&mut self, out: &mut Vec<Wc>, timeout: Duration) -> Result<()> {
        // SAFETY: the id is live; rdma_cm created its send CQ with the QP.
        let cq = unsafe { (*self.id.0).send_cq };
        let n = self.poll(cq, POLL_BATCH, timeout)?;
        for wc in &self.wcs[..n] {
            out.push(Wc {
                wr_id: wc.wr_id,
                status: status_of(wc.status),
            });
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut Vec<u8>, timeout: Duration) -> Result<u32> {
        // SAFETY: the id is live; rdma_cm created its receive CQ with the QP.
        let cq = unsafe { (*self.id.0).recv_cq };
        // Take one completion at a time so none is lost between calls.
        if self.poll(cq, 1, timeout)? == 0 {
            return Err(Error::Timeout(timeout, "a message on the queue pair"));
        }
        let wc = &self.wcs[0];
        let status = status_of(wc.status);
        if status != WcStatus::Success {
            return Err(status.into_error("a posted receive"));
        }
        let slot = wc.wr_id as usize;
        let len = wc.byte_len as usize;
        let has_imm = wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
        // SAFETY: with IBV_WC_WITH_IMM the union holds the immediate data.
        let imm = u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data });
        if slot >= RECV_DEPTH || len > self.recv_len || !has_imm {
            return Err(Error::Protocol(format!(
                "a receive completion for slot {slot} of {len} bytes (immediate: {has_imm})"
            )));
        }
        buf.resize(len, 0);
        self.recv.mem.read_at((slot * self.recv_len) as u64, buf)?;
        self.post_recv(slot)?;
        Ok(imm)
    }
}
