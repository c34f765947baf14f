//! Framing shared by every colo wire protocol: one checked header prefix, one way to read
//! a frame off a byte stream, one error type for what can go wrong doing either.
//!
//! A protocol is the `#[repr(u16)]` enum of its frame types, implementing [`Protocol`]:
//! it names its magic, its version and the fixed fields that follow the type. Every frame
//! of it starts with a [`Header`] (little-endian):
//!
//! ```text
//!  0        4        6        8                            Header::<P>::LEN
//!  ├─ magic ─┼─ ver ──┼─ kind ─┼─ P::Fields (fixed size) ───────┤ then the payload
//! ```
//!
//! [`Header::parse`] refuses a wrong magic, another version, and a kind the enum does not
//! list (zerocopy's [`TryFromBytes`](zerocopy::TryFromBytes) checks it against the enum's variants) before a
//! protocol looks at its own fields. [`read_full`] and [`read_result`] read a frame's
//! bytes and tell a clean end of stream before a frame from one inside it.
//!
//! The protocols built on it: the control channel (`colo_transport::control`, magic
//! `"COLO"`), the TCP page push (`colo_transport::tcp::wire`, `"CPSH"`), the verbs push
//! messages (`colo_transport::verbs::message`, `"CPSH"`) and the forwarded disk writes of
//! `colo_blk::wire` (`"CBLK"`).
//!
//! ```
//! use colo_transport::framing::{self, Header, Protocol};
//! use zerocopy::little_endian::U32;
//! use zerocopy::{Immutable, IntoBytes, KnownLayout, TryFromBytes, FromBytes, Unaligned};
//!
//! #[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromBytes, IntoBytes, KnownLayout, Immutable)]
//! #[repr(u16)]
//! enum Kind { Ping = 1, Pong = 2 }
//!
//! #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
//! #[repr(C)]
//! struct Fields { seq: U32 }
//!
//! impl Protocol for Kind {
//!     const NAME: &'static str = "echo";
//!     const MAGIC: u32 = u32::from_le_bytes(*b"ECHO");
//!     const VERSION: u16 = 1;
//!     type Fields = Fields;
//! }
//!
//! let h = Header::<Kind>::new(Kind::Pong, Fields { seq: 7.into() });
//! assert_eq!(h.as_bytes(), b"ECHO\x01\x00\x02\x00\x07\x00\x00\x00");
//! let (kind, fields) = Header::<Kind>::parse(h.as_bytes())?;
//! assert_eq!((kind, fields.seq.get()), (Kind::Pong, 7));
//!
//! let mut unknown = h.as_bytes().to_vec();
//! unknown[6] = 3;
//! assert!(matches!(
//!     Header::<Kind>::parse(&unknown),
//!     Err(framing::Error::UnknownKind { kind: 3, .. })
//! ));
//! # Ok::<(), framing::Error>(())
//! ```

mod error;
mod header;
mod read;

pub use error::{Error, Result};
pub use header::{Header, Protocol};
pub use read::{read_full, read_result};
