//! The libfabric (OFI) backend (feature `ofi`): an [`Endpoint`] on a libfabric endpoint of
//! any provider that offers RMA, driven by the same pipeline as the verbs device
//! ([`crate::verbs`]): a connected `FI_EP_MSG` endpoint where the provider offers RMA on
//! one, else a reliable datagram `FI_EP_RDM` one ([`EndpointKind`]).
//!
//! libfabric is the portable one-sided API of HPC fabrics: its `verbs` provider drives
//! InfiniBand and RoCE, `efa` AWS EFA, `cxi` HPE Slingshot, and its `tcp` and `shm`
//! providers do the same RMA writes in user space, so the one-sided pipeline also runs on
//! a machine without RDMA hardware (the test command runs it over `tcp`, `tcp;ofi_rxm` and
//! `shm`).
//!
//! - Bindings: generated with bindgen from the installed headers (`ofi/shim.h`), since
//!   libfabric's own Rust binding (`ofi-libfabric-sys` 0.1) needs libfabric 2.x headers
//!   (`fi_profile.h`) and Debian 12 ships 1.17. Most `fi_*` calls are `static inline`;
//!   `ofi/shim.c` gives each a real symbol.
//! - Connection, connected: the receiver listens on a passive endpoint ([`OfiListener`]);
//!   the sender connects to the address of the control channel's peer and the port
//!   published in the [`RegionDesc`]. Connection events come from an event queue read
//!   with a blocking wait.
//! - Reliable datagram: the receiver publishes its endpoint's name in the [`RegionDesc`];
//!   the sender puts it in an address vector and sends its own name as its first message
//!   (the push protocol's address message). Every write asks delivery completion, and
//!   completions retire in the order of their posts, as a queue pair's do. The sender
//!   ends with the push protocol's close message.
//! - Registration: the receiver registers its RAM cache for remote write only. The key
//!   (random and as wide as the provider's keys, or the provider's under
//!   `FI_MR_PROV_KEY`) and the base address (the virtual address under `FI_MR_VIRT_ADDR`,
//!   else 0: offsets) go in the descriptor. The sender registers its source for local
//!   reads; where that fails it registers bounce buffers, as the verbs device does. Under
//!   `FI_MR_ENDPOINT` (reliable datagram only) registrations are bound to the endpoint.
//! - Work: consecutive RDMA WRITE work requests go in one `fi_writemsg` up to the
//!   provider's iov limits (a chain passes `FI_MORE` to all but its last); on a connected
//!   endpoint completions come only where the pipeline signals one
//!   (`FI_SELECTIVE_COMPLETION`); the epoch message is a send with remote CQ data (the
//!   immediate). Completion queues with a file descriptor are read with `fi_cq_sread`,
//!   which blocks in the provider (and drives its progress), so an idle side does not
//!   spin; those without one (`shm`) are polled with short naps.
//!
//! [`Endpoint`]: crate::verbs::Endpoint
//! [`RegionDesc`]: crate::push::RegionDesc

mod endpoint;
mod sys;

pub use endpoint::{OfiEndpoint, OfiListener, connect, connect_endpoint, probe, providers};

impl EndpointKind {
    /// How the kinds read in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Any => "connected (FI_EP_MSG) or reliable datagram (FI_EP_RDM)",
            Self::Msg => "connected (FI_EP_MSG)",
            Self::Rdm => "reliable datagram (FI_EP_RDM)",
        }
    }
}

/// The kind of libfabric endpoint the push runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointKind {
    /// Connected (`FI_EP_MSG`) where the provider offers RMA on it, else reliable datagram.
    #[default]
    Any,
    /// Connected (`FI_EP_MSG`): a listener and a port, like TCP (tcp, verbs).
    Msg,
    /// Reliable datagram (`FI_EP_RDM`): an address vector and endpoint names exchanged
    /// over the control channel (efa, cxi, shm; tcp through `ofi_rxm`).
    Rdm,
}

/// Which provider and how big the queues are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfiOptions {
    /// The provider (`tcp`, `verbs`, `efa`, `cxi`, `shm`, ...); `None` lets libfabric pick
    /// the first that offers RMA.
    pub provider: Option<String>,
    /// Connected or reliable datagram endpoints.
    pub endpoint: EndpointKind,
    /// Send queue depth asked for (clamped to the provider's).
    pub send_queue: u32,
    /// Scatter-gather entries per write asked for (clamped to the provider's).
    pub max_sge: u32,
    /// Bytes of bounce buffers registered where the source cannot be.
    pub bounce_len: usize,
}

impl Default for OfiOptions {
    fn default() -> Self {
        Self {
            provider: None,
            endpoint: EndpointKind::Any,
            send_queue: 256,
            max_sge: 16,
            bounce_len: 32 << 20,
        }
    }
}

/// Errors of the libfabric backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OfiError {
    /// libfabric knows no provider of that name on this machine.
    #[error(
        "libfabric has no provider {wanted:?} here; present: {present:?} (`fi_info -l` lists \
         them; a provider may need its package or hardware)"
    )]
    UnknownProvider {
        /// The provider asked for.
        wanted: String,
        /// The providers libfabric lists.
        present: Vec<String>,
    },
    /// The provider exists but offers no endpoint of the kinds asked with RMA writes under
    /// the memory registration modes colo handles.
    #[error(
        "libfabric provider {provider:?} offers no {kinds} endpoint with RMA writes and remote \
         CQ data under the MR modes colo handles (local, virtual address, allocated, provider \
         keys, and endpoint-bound on reliable datagram endpoints){hint}"
    )]
    NoRma {
        /// The provider (or "any").
        provider: String,
        /// The endpoint kinds looked for.
        kinds: &'static str,
        /// What to try instead.
        hint: &'static str,
    },
    /// A libfabric call failed.
    #[error("{call} failed: {message} ({code})")]
    Call {
        /// The call.
        call: &'static str,
        /// libfabric's error code (positive).
        code: i32,
        /// `fi_strerror` of it.
        message: String,
    },
    /// Memory registration failed, likely under the locked-memory limit.
    #[error(
        "cannot register {len} bytes with libfabric: {message}; the locked-memory limit \
         (ulimit -l) is {limit}. Raise it: `ulimit -l unlimited` in the shell that starts \
         colo, `LimitMEMLOCK=infinity` in a systemd unit, or a memlock line in \
         /etc/security/limits.conf"
    )]
    Memlock {
        /// Bytes that could not be registered.
        len: usize,
        /// The current soft limit, readable.
        limit: String,
        /// libfabric's message.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn opts(provider: &str) -> OfiOptions {
        OfiOptions {
            provider: Some(provider.into()),
            ..OfiOptions::default()
        }
    }

    #[test]
    fn tcp_offers_what_colo_needs() {
        assert_eq!(
            probe(&opts("tcp")).unwrap(),
            ("tcp".to_string(), EndpointKind::Msg)
        );
        assert!(providers().iter().any(|p| p == "tcp"));
    }

    #[test]
    fn shm_and_tcp_offer_reliable_datagram_endpoints() {
        // shm has no connected endpoint, so any kind finds its RDM one.
        assert_eq!(
            probe(&opts("shm")).unwrap(),
            ("shm".into(), EndpointKind::Rdm)
        );
        let rdm = OfiOptions {
            endpoint: EndpointKind::Rdm,
            ..opts("tcp")
        };
        let (name, kind) = probe(&rdm).unwrap();
        assert_eq!(kind, EndpointKind::Rdm);
        assert!(name.starts_with("tcp"), "{name}");
    }

    #[test]
    fn an_unknown_provider_is_refused_naming_those_present() {
        match probe(&opts("no-such-provider")) {
            Err(Error::Ofi(OfiError::UnknownProvider { wanted, present })) => {
                assert_eq!(wanted, "no-such-provider");
                assert!(present.iter().any(|p| p == "tcp"), "{present:?}");
            }
            other => panic!("expected an unknown provider, got {other:?}"),
        }
    }

    #[test]
    fn a_provider_without_connected_rma_is_refused_with_a_hint() {
        // shm offers RMA on reliable datagram endpoints only.
        let msg = OfiOptions {
            endpoint: EndpointKind::Msg,
            ..opts("shm")
        };
        match probe(&msg) {
            Err(e @ Error::Ofi(OfiError::NoRma { .. })) => {
                let text = e.to_string();
                assert!(text.contains("--ofi-endpoint rdm"), "{text}");
                assert!(text.contains("FI_EP_MSG"), "{text}");
            }
            other => panic!("expected no RMA, got {other:?}"),
        }
    }
}
