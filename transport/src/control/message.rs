//! The COLO control messages and their encoding into frames.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::frame::{ControlFields, FrameHeader, HEADER_LEN, Kind};
use super::handshake::{Hello, MAX_HELLO_LEN};
use crate::error::{Error, Result};
use crate::framing;
use crate::push::{EndpointName, RegionDesc};

/// Longest reason text a Reject may carry.
pub const MAX_REJECT_LEN: usize = 4096;

/// Default cap on the device state a VmstateSize frame may carry (64 MiB).
pub const DEFAULT_MAX_STATE: u32 = 64 << 20;

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Handshake announcement.
    Hello(Hello),
    /// Handshake refused; the text says why.
    Reject(String),
    /// Secondary: ready for checkpoints.
    CheckpointReady,
    /// Primary: checkpoint `epoch` starts; pause the SVM.
    CheckpointRequest {
        /// The epoch being checkpointed.
        epoch: u64,
    },
    /// Secondary: the SVM is paused for `epoch`.
    CheckpointReply {
        /// The epoch being checkpointed.
        epoch: u64,
    },
    /// Primary: the device state of `epoch` follows.
    VmstateSend {
        /// The epoch whose state follows.
        epoch: u64,
    },
    /// The device and vCPU state: its size in the header argument, its bytes as payload.
    VmstateSize {
        /// The serialized state.
        state: Vec<u8>,
    },
    /// Secondary: the state of `epoch` is buffered whole.
    VmstateReceived {
        /// The epoch whose state arrived.
        epoch: u64,
    },
    /// Secondary: `epoch` is applied and the SVM runs again.
    VmstateLoaded {
        /// The epoch that was applied.
        epoch: u64,
    },
    /// Liveness probe or answer.
    Heartbeat {
        /// Sender's sequence number.
        seq: u64,
    },
    /// The answer to a heartbeat: its sequence number, echoed.
    HeartbeatAck {
        /// The heartbeat's sequence number.
        seq: u64,
    },
    /// The sender is failing over (or leaving COLO).
    Failover,
    /// Orderly close.
    Goodbye,
    /// The receive region of the page-push path.
    Region(RegionDesc),
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RegionWire {
    addr: U64,
    key: U64,
    len: U64,
    page_size: U32,
    port: U16,
    /// Bytes of the endpoint name that follow.
    name_len: U16,
}

/// A region's fixed part; its endpoint name (up to [`EndpointName::MAX`] bytes) follows.
const REGION_LEN: usize = size_of::<RegionWire>();

impl Message {
    /// The frame type of this message.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Hello(_) => Kind::Hello,
            Self::Reject(_) => Kind::Reject,
            Self::CheckpointReady => Kind::CheckpointReady,
            Self::CheckpointRequest { .. } => Kind::CheckpointRequest,
            Self::CheckpointReply { .. } => Kind::CheckpointReply,
            Self::VmstateSend { .. } => Kind::VmstateSend,
            Self::VmstateSize { .. } => Kind::VmstateSize,
            Self::VmstateReceived { .. } => Kind::VmstateReceived,
            Self::VmstateLoaded { .. } => Kind::VmstateLoaded,
            Self::Heartbeat { .. } => Kind::Heartbeat,
            Self::HeartbeatAck { .. } => Kind::HeartbeatAck,
            Self::Failover => Kind::Failover,
            Self::Goodbye => Kind::Goodbye,
            Self::Region(_) => Kind::Region,
        }
    }

    /// The checkpoint epoch the message names, for the messages that carry one.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Self::CheckpointRequest { epoch }
            | Self::CheckpointReply { epoch }
            | Self::VmstateSend { epoch }
            | Self::VmstateReceived { epoch }
            | Self::VmstateLoaded { epoch } => Some(*epoch),
            _ => None,
        }
    }

    /// Encodes the message as one frame: header then payload.
    ///
    /// # Errors
    /// [`framing::Error::TooLarge`] if a payload does not fit its length field.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let (arg, payload): (u64, std::borrow::Cow<'_, [u8]>) = match self {
            Self::Hello(h) => (0, h.encode().into()),
            Self::Reject(text) => {
                let mut t = text.as_bytes();
                if t.len() > MAX_REJECT_LEN {
                    t = &t[..MAX_REJECT_LEN];
                }
                (0, t.into())
            }
            Self::CheckpointRequest { epoch }
            | Self::CheckpointReply { epoch }
            | Self::VmstateSend { epoch }
            | Self::VmstateReceived { epoch }
            | Self::VmstateLoaded { epoch } => (*epoch, (&[][..]).into()),
            Self::Heartbeat { seq } | Self::HeartbeatAck { seq } => (*seq, (&[][..]).into()),
            Self::VmstateSize { state } => (state.len() as u64, state.as_slice().into()),
            Self::CheckpointReady | Self::Failover | Self::Goodbye => (0, (&[][..]).into()),
            Self::Region(d) => {
                let w = RegionWire {
                    addr: d.addr.into(),
                    key: d.key.into(),
                    len: d.len.into(),
                    page_size: d.page_size.into(),
                    port: d.port.into(),
                    name_len: (d.name.as_bytes().len() as u16).into(),
                };
                let mut p = w.as_bytes().to_vec();
                p.extend_from_slice(d.name.as_bytes());
                (0, p.into())
            }
        };
        let len = u32::try_from(payload.len()).map_err(|_| framing::Error::TooLarge {
            what: "payload",
            len: payload.len() as u64,
            max: u32::MAX.into(),
        })?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(
            &FrameHeader::new(self.kind(), ControlFields::new(arg, len)).to_bytes(),
        );
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// The most payload bytes a frame of `kind` may announce, given the state cap.
    pub fn max_payload(kind: Kind, max_state: u32) -> u32 {
        match kind {
            Kind::Hello => MAX_HELLO_LEN as u32,
            Kind::Reject => MAX_REJECT_LEN as u32,
            Kind::VmstateSize => max_state,
            Kind::Region => (REGION_LEN + EndpointName::MAX) as u32,
            _ => 0,
        }
    }

    /// Builds a message from a validated header and its payload.
    ///
    /// # Errors
    /// [`Error::Protocol`] if the payload does not fit the message type, or the decoding
    /// error of the payload.
    pub fn decode(kind: Kind, arg: u64, payload: Vec<u8>) -> Result<Self> {
        let no_payload = |m: Message| {
            if payload.is_empty() {
                Ok(m)
            } else {
                Err(Error::Protocol(format!(
                    "{kind:?} carries {} unexpected payload bytes",
                    payload.len()
                )))
            }
        };
        match kind {
            Kind::Hello => Ok(Self::Hello(Hello::decode(&payload)?)),
            Kind::Reject => Ok(Self::Reject(String::from_utf8_lossy(&payload).into_owned())),
            Kind::CheckpointReady => no_payload(Self::CheckpointReady),
            Kind::CheckpointRequest => no_payload(Self::CheckpointRequest { epoch: arg }),
            Kind::CheckpointReply => no_payload(Self::CheckpointReply { epoch: arg }),
            Kind::VmstateSend => no_payload(Self::VmstateSend { epoch: arg }),
            Kind::VmstateReceived => no_payload(Self::VmstateReceived { epoch: arg }),
            Kind::VmstateLoaded => no_payload(Self::VmstateLoaded { epoch: arg }),
            Kind::Heartbeat => no_payload(Self::Heartbeat { seq: arg }),
            Kind::HeartbeatAck => no_payload(Self::HeartbeatAck { seq: arg }),
            Kind::Failover => no_payload(Self::Failover),
            Kind::Goodbye => no_payload(Self::Goodbye),
            Kind::VmstateSize => {
                if arg != payload.len() as u64 {
                    return Err(Error::Protocol(format!(
                        "vmstate-size says {arg} bytes but carries {}",
                        payload.len()
                    )));
                }
                Ok(Self::VmstateSize { state: payload })
            }
            Kind::Region => {
                let (w, name) = RegionWire::read_from_prefix(&payload).map_err(|_| {
                    Error::Protocol(format!(
                        "region payload is {} bytes, under the {REGION_LEN} of its fixed part",
                        payload.len()
                    ))
                })?;
                if name.len() != usize::from(w.name_len.get()) {
                    return Err(Error::Protocol(format!(
                        "region says its endpoint name has {} bytes but {} follow",
                        w.name_len.get(),
                        name.len()
                    )));
                }
                Ok(Self::Region(RegionDesc {
                    addr: w.addr.get(),
                    key: w.key.get(),
                    len: w.len.get(),
                    page_size: w.page_size.get(),
                    port: w.port.get(),
                    name: EndpointName::new(name)?,
                }))
            }
        }
    }
}
