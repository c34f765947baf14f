//! The TCP backend of the push model.
//!
//! The sender batches page runs into gather writes (a header and run table, then the runs'
//! bytes straight from the source region) and spreads batches round-robin over one or more
//! streams, each driven by its own thread. On a plain stream the runs' bytes are spliced
//! (`vmsplice` into a pipe, `splice` into the socket: see `splice`), so the kernel sends
//! the source pages by reference instead of copying them; a sealed stream, or
//! [`TcpPushOptions::splice`] off, writes them with `writev`. The receiver checks the run table of
//! each batch against its region and then scatter-reads (`readv`) the bytes directly into
//! place: no intermediate buffer, no copy beyond the kernel's own.
//!
//! A fence and an epoch end are round trips on every stream, so when `fence` or `commit`
//! returns, every byte before it has landed.

mod io;
mod receiver;
mod sender;
mod splice;
pub mod wire;

pub use io::{MemStream, ScatterIo};
pub(crate) use receiver::{Shared, serve_stream};
pub use receiver::{TcpPushListener, TcpPushReceiver};
pub use sender::{TcpPushAbort, TcpPushOptions, TcpPushSender};
