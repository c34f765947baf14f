//! The TCP backend of the push model.
//!
//! The sender batches page runs into gather writes (`writev`: a header and run table, then
//! the runs' bytes straight from the source region) and spreads batches round-robin over
//! one or more streams, each driven by its own thread. The receiver checks the run table of
//! each batch against its region and then scatter-reads (`readv`) the bytes directly into
//! place: no intermediate buffer, no copy beyond the kernel's own.
//!
//! A fence and an epoch end are round trips on every stream, so when `fence` or `commit`
//! returns, every byte before it has landed.

mod io;
mod receiver;
mod sender;
pub mod wire;

pub use io::{MemStream, ScatterIo};
pub(crate) use receiver::{Shared, serve_stream};
pub use receiver::{TcpPushListener, TcpPushReceiver};
pub use sender::{TcpPushAbort, TcpPushOptions, TcpPushSender};
