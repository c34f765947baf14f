//! The errors of the RAM cache.

use crate::staging::Stage;

/// Errors of the RAM cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The guest layout and the SVM memory regions given do not match.
    #[error("SVM memory does not match the guest layout: {0}")]
    Layout(String),
    /// Mapping the cache failed, a bitmap that does not cover the guest, or a copy outside
    /// a region (a bug: runs come from bitmaps sized to the layout).
    #[error(transparent)]
    Memory(#[from] colo_memory::Error),
    /// A push epoch that does not follow the last one landed.
    #[error("push epoch {got} arrived after push epoch {last}")]
    PushOrder {
        /// The epoch that arrived.
        got: u64,
        /// The last epoch landed.
        last: u64,
    },
    /// The primary sealed the pages through a push epoch that has not landed.
    #[error("pages sealed through push epoch {through}, but the last landed is {landed}")]
    SealMismatch {
        /// The epoch named by the seal.
        through: u64,
        /// The last epoch landed.
        landed: u64,
    },
    /// A step of the epoch arrived twice, or after the pages were sealed.
    #[error("checkpoint {checkpoint}: {stage} staged twice")]
    Duplicate {
        /// The checkpoint being staged.
        checkpoint: u64,
        /// The step.
        stage: Stage,
    },
    /// Commit asked for before the whole epoch arrived. The SVM is untouched.
    #[error("checkpoint {checkpoint} is incomplete: {missing} missing; the SVM is untouched")]
    Incomplete {
        /// The checkpoint being staged.
        checkpoint: u64,
        /// The first missing step.
        missing: Stage,
    },
    /// The SVM-dirty bitmap given to commit does not cover exactly the guest's pages.
    #[error("SVM dirty bitmap covers {got} pages, the guest has {pages}")]
    DirtySize {
        /// Pages the bitmap covers.
        got: u64,
        /// Pages of the guest.
        pages: u64,
    },
    /// The landing thread could not start.
    #[error("cannot start the push landing thread")]
    Thread(#[source] std::io::Error),
    /// The landing of push epochs ended (the push path failed or closed, or it was
    /// interrupted) while a step waited for it.
    #[error("push landing ended: {0}")]
    Landing(crate::landing::LandingEnd),
    /// A push epoch did not land in time.
    #[error("push epoch {epoch} did not land in time (the last landed is {landed})")]
    LandTimeout {
        /// The epoch waited for.
        epoch: u64,
        /// The last epoch that landed.
        landed: u64,
    },
    /// An epoch was aborted: the cache holds pages that were never committed, so it no
    /// longer equals the primary's memory at any checkpoint. A new full sync is needed.
    #[error("the RAM cache was abandoned by an aborted epoch; a full resync is needed")]
    Abandoned,
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
