//! Driving one epoch through any [`PushSender`]: post the runs in batches, then commit
//! (which fences).

use colo_memory::PageBitmap;

use super::{PushSender, WriteRun};
use crate::error::Result;

/// Runs handed to the backend per `post` call.
const POST_CHUNK: usize = 256;

/// What one pushed epoch moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpochStats {
    /// The committed epoch.
    pub epoch: u64,
    /// Runs posted.
    pub runs: u64,
    /// Bytes posted.
    pub bytes: u64,
}

/// Pushes one whole epoch: posts `runs` in chunks and commits with `bitmap`.
///
/// The receiver learns of the epoch only when this returns `Ok`. If it returns an error,
/// the epoch is incomplete and the receiver never commits it.
///
/// # Errors
/// The first error of the backend's `post`, `fence` or `commit`.
pub fn push_epoch<S, I>(sender: &mut S, runs: I, bitmap: &PageBitmap) -> Result<EpochStats>
where
    S: PushSender + ?Sized,
    I: IntoIterator<Item = WriteRun>,
{
    let stats = start_epoch(sender, runs, bitmap)?;
    sender.finish_commit()?;
    Ok(stats)
}

/// As [`push_epoch`], but only starts the commit
/// ([`PushSender::start_commit`]): the caller overlaps the receiver's acknowledgement with
/// other work and takes it with [`PushSender::finish_commit`] before the source pages may
/// change.
///
/// # Errors
/// The first error of the backend's `post` or `start_commit`.
pub fn start_epoch<S, I>(sender: &mut S, runs: I, bitmap: &PageBitmap) -> Result<EpochStats>
where
    S: PushSender + ?Sized,
    I: IntoIterator<Item = WriteRun>,
{
    // Check the bitmap before anything is sent, so a bad bitmap costs no transfer.
    sender.remote().check_bitmap(bitmap)?;
    let mut stats = EpochStats::default();
    let mut chunk = Vec::with_capacity(POST_CHUNK);
    for run in runs {
        stats.runs += 1;
        stats.bytes += run.len;
        chunk.push(run);
        if chunk.len() == POST_CHUNK {
            sender.post(&chunk)?;
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        sender.post(&chunk)?;
    }
    stats.epoch = sender.start_commit(bitmap)?;
    Ok(stats)
}
