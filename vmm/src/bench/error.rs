//! The one error type of the benchmarks.

use std::io;

/// Everything that can make a benchmark fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The arguments do not describe a benchmark that can run.
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    /// A transport operation failed.
    #[error("{what} failed")]
    Transport {
        /// What was being done.
        what: &'static str,
        /// The transport's error.
        #[source]
        source: colo_transport::Error,
    },
    /// An I/O operation (a socket, a pipe) failed.
    #[error("{what} failed")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The receiver process could not be started.
    #[error("cannot start the receiver process {exe}")]
    Spawn {
        /// The executable.
        exe: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The receiver process did something the benchmark did not expect (exited, said
    /// something unexpected, or went silent).
    #[error("receiver process: {0}")]
    Child(String),
    /// The control channel carried something other than what the benchmark expected.
    #[error("control channel: {0}")]
    Control(String),
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A plot could not be drawn.
    #[error("cannot draw {what}")]
    Plot {
        /// What was being drawn.
        what: &'static str,
        /// Plotters' error.
        #[source]
        source: crate::report::DrawError,
    },
    /// A run's `colo report` failed.
    #[error("cannot report a run's checkpoints")]
    Report(#[source] crate::report::Error),
    /// A guest or a component under test misbehaved.
    #[error("{0}")]
    Guest(String),
    /// Pages that landed in the receiver differ from the pages that were sent.
    #[error(
        "CHECKSUM MISMATCH in case {case} with {streams} stream(s), rep {rep} (epoch {epoch}): \
         source {expected:#018x} over {expected_pages} pages, destination {found:#018x} over \
         {found_pages} pages"
    )]
    ChecksumMismatch {
        /// The case's name.
        case: String,
        /// Streams of the push.
        streams: usize,
        /// Repetition (1-based).
        rep: u32,
        /// The pushed epoch.
        epoch: u64,
        /// Checksum of the source pages.
        expected: u64,
        /// Pages the source checksum covers.
        expected_pages: u64,
        /// Checksum the receiver computed.
        found: u64,
        /// Pages the receiver's checksum covers.
        found_pages: u64,
    },
}

impl Error {
    /// Wraps a KVM error with what was being done.
    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Self::Kvm { what, source }
    }

    /// The process exit code for this error: 2 for bad arguments (as clap uses), 1 else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::InvalidArgs(_) => 2,
            _ => 1,
        }
    }

    /// Wraps a transport error with what was being done.
    pub fn transport<E: Into<colo_transport::Error>>(what: &'static str) -> impl FnOnce(E) -> Self {
        move |source| Self::Transport {
            what,
            source: source.into(),
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { what, source }
    }
}

/// The result type of the benchmarks.
pub type Result<T> = std::result::Result<T, Error>;
