//! The page-push transport of a run: TCP streams, verbs RDMA (feature `rdma`), or a
//! libfabric provider (feature `ofi`).
//!
//! Both sides agree on it out of band (the same `--transport` on both); the secondary
//! binds its push listener and sends the region descriptor over the control channel, and
//! the primary connects to it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use colo_memory::Region;
use colo_transport::push::{PushReceiver, PushSender, RegionDesc};
use colo_transport::tcp::{TcpPushListener, TcpPushOptions, TcpPushSender};

use super::{ColoError, Result};

/// The page-push transport chosen for this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushTransport {
    /// Parallel TCP streams.
    Tcp {
        /// Streams.
        streams: usize,
    },
    /// One-sided RDMA WRITEs into the secondary's registered RAM cache.
    #[cfg(feature = "rdma")]
    Rdma(colo_transport::rdma::RdmaOptions),
    /// One-sided RMA writes through a libfabric provider.
    #[cfg(feature = "ofi")]
    Ofi(colo_transport::ofi::OfiOptions),
}

impl std::fmt::Display for PushTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp { streams } => write!(f, "tcp ({streams} streams)"),
            #[cfg(feature = "rdma")]
            Self::Rdma(o) => write!(
                f,
                "rdma (device {}, port {})",
                o.device.as_deref().unwrap_or("by address"),
                o.port
            ),
            #[cfg(feature = "ofi")]
            Self::Ofi(o) => write!(
                f,
                "ofi (provider {})",
                o.provider.as_deref().unwrap_or("any")
            ),
        }
    }
}

/// Ends a push sender's transport from another thread (see [`connect`]).
pub type Abort = Box<dyn Fn() + Send + Sync>;

/// The secondary's push listener.
pub enum PushListener {
    /// TCP.
    Tcp(TcpPushListener),
    /// RDMA.
    #[cfg(feature = "rdma")]
    Rdma(colo_transport::rdma::RdmaListener),
    /// libfabric.
    #[cfg(feature = "ofi")]
    Ofi(colo_transport::ofi::OfiListener),
}

impl PushListener {
    /// Binds on `ip` (port chosen by the system) with `region` as the receive region.
    ///
    /// # Errors
    /// [`ColoError::Transport`] when the listener cannot be set up (for RDMA: no device
    /// behind `ip`, or registration refused by the locked-memory limit).
    pub fn bind(
        t: &PushTransport,
        ip: IpAddr,
        region: Arc<Region>,
        page: u32,
        creds: &colo_auth::Credentials,
    ) -> Result<Self> {
        match t {
            PushTransport::Tcp { .. } => {
                TcpPushListener::bind(&format!("{ip}:0"), region, page, creds.clone())
                    .map(Self::Tcp)
                    .map_err(ColoError::transport("bind the push listener"))
            }
            #[cfg(feature = "rdma")]
            PushTransport::Rdma(o) => {
                colo_transport::rdma::RdmaListener::bind(SocketAddr::new(ip, 0), region, page, o)
                    .map(Self::Rdma)
                    .map_err(ColoError::transport("set up the RDMA push listener"))
            }
            #[cfg(feature = "ofi")]
            PushTransport::Ofi(o) => {
                colo_transport::ofi::OfiListener::bind(SocketAddr::new(ip, 0), region, page, o)
                    .map(Self::Ofi)
                    .map_err(ColoError::transport("set up the libfabric push listener"))
            }
        }
    }

    /// The region as the primary needs it.
    pub fn desc(&self) -> RegionDesc {
        match self {
            Self::Tcp(l) => *l.desc(),
            #[cfg(feature = "rdma")]
            Self::Rdma(l) => *l.desc(),
            #[cfg(feature = "ofi")]
            Self::Ofi(l) => *l.desc(),
        }
    }

    /// Waits for the primary's push connection.
    ///
    /// # Errors
    /// [`ColoError::Transport`] on a timeout or a failed accept.
    pub fn accept(self, timeout: Duration) -> Result<Box<dyn PushReceiver>> {
        match self {
            Self::Tcp(l) => Ok(Box::new(
                l.accept(timeout)
                    .map_err(ColoError::transport("accept the push streams"))?,
            )),
            #[cfg(feature = "rdma")]
            Self::Rdma(mut l) => Ok(Box::new(
                l.accept(timeout)
                    .map_err(ColoError::transport("accept the RDMA push connection"))?,
            )),
            #[cfg(feature = "ofi")]
            Self::Ofi(mut l) => Ok(Box::new(
                l.accept(timeout)
                    .map_err(ColoError::transport("accept the libfabric push connection"))?,
            )),
        }
    }
}

/// Connects the primary's push sender to the secondary at `host` for `desc`, reading
/// `ram`. Also returns what ends the sender's transport from another thread (the
/// heartbeat's verdict calls it).
///
/// # Errors
/// [`ColoError::Transport`] when the connection fails.
pub fn connect(
    t: &PushTransport,
    host: IpAddr,
    desc: RegionDesc,
    ram: Arc<Region>,
    creds: &colo_auth::Credentials,
) -> Result<(Box<dyn PushSender>, Abort)> {
    match t {
        PushTransport::Tcp { streams } => {
            let s = TcpPushSender::connect(
                SocketAddr::new(host, desc.port),
                desc,
                ram,
                creds,
                TcpPushOptions {
                    streams: *streams,
                    ..TcpPushOptions::default()
                },
            )
            .map_err(ColoError::transport("connect the push streams"))?;
            let abort = s.abort_handle();
            Ok((Box::new(s), Box::new(move || abort.abort())))
        }
        #[cfg(feature = "rdma")]
        PushTransport::Rdma(o) => {
            let s = colo_transport::rdma::connect(
                host,
                desc,
                ram,
                o,
                colo_transport::verbs::VerbsOptions::default(),
            )
            .map_err(ColoError::transport("connect the RDMA push path"))?;
            let abort = s.abort_handle();
            Ok((Box::new(s), Box::new(move || abort.abort())))
        }
        #[cfg(feature = "ofi")]
        PushTransport::Ofi(o) => {
            let s = colo_transport::ofi::connect(
                host,
                desc,
                ram,
                o,
                colo_transport::verbs::VerbsOptions::default(),
            )
            .map_err(ColoError::transport("connect the libfabric push path"))?;
            let abort = s.abort_handle();
            Ok((Box::new(s), Box::new(move || abort.abort())))
        }
    }
}
