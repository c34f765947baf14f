//! # colo-netcmp
//!
//! The COLO proxy. It sits between the client network and the two VMs of a COLO pair:
//!
//! - Every frame from the client is mirrored to the primary and the secondary VM.
//! - Frames the VMs send are tracked per connection (5-tuple, both directions) and
//!   compared: TCP as a byte stream in sequence order (segmentation, retransmissions and
//!   ACK timing may differ; the secondary's sequence numbers are mapped onto the
//!   primary's), UDP and ICMP by payload, anything else by whole frame.
//! - Client frames for the secondary have their TCP acknowledgment numbers, SACK blocks
//!   and timestamp echoes translated into the secondary's spaces; after a failover the
//!   secondary's output is rewritten into the primary's (sequence numbers and TSval), as
//!   QEMU's filter-rewriter does for sequence numbers.
//! - Identical output is released to the client at once; bytes released are always the
//!   primary's.
//! - Different output makes the proxy ask the controller for a checkpoint and hold the
//!   primary's output until the controller says the checkpoint committed.
//! - A primary packet whose secondary counterpart does not come within `compare_timeout`
//!   is released and a checkpoint is requested; a queue going past `max_queue_size` forces
//!   a checkpoint.
//!
//! Two layers:
//! - [`Engine`] ([`compare`]): the sans-I/O engine. Feed it frames and the time, read an
//!   [`Output`] of frames to send and [`CheckpointRequest`]s.
//! - [`proxy`]: the engine on a thread, with [`io`] ports (tap devices, length-prefixed
//!   frames over Unix or TCP sockets as QEMU's chardev socket carries them, in-process
//!   channels), a [`proxy::Proxy`] handle for the controller and [`proxy::run`] for the
//!   `colo proxy` command.
//!
//! Frames are parsed with etherparse ([`wire`]); nothing in this crate reads packet bytes
//! by hand-written offsets, and a frame that does not parse is counted and forwarded or
//! dropped by policy, never a panic.

#![deny(unsafe_code)]

pub mod compare;
mod config;
mod error;
pub mod flow;
pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
mod metrics;
mod passthrough;
pub mod proxy;
mod ratelimit;
pub mod testing;
pub mod wire;

pub use compare::{CheckpointReason, CheckpointRequest, Engine, Mode, Output};
pub use config::{Config, MalformedPolicy};
pub use error::{Error, Result};
pub use flow::{FlowKey, Protocol, Side};
pub use metrics::{Metrics, MetricsSnapshot};
pub use passthrough::{PassthroughRule, RuleProtocol};
