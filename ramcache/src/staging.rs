//! What has arrived of the epoch being staged.

use std::fmt;

use colo_memory::PageBitmap;

/// One of the three things a checkpoint needs before it may touch the SVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// Every pushed page, sealed by the primary.
    Pages,
    /// The whole device and vCPU state.
    State,
    /// The disk's acknowledgement of every forwarded write.
    Disk,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pages => "the pages (no seal yet)",
            Self::State => "the device state",
            Self::Disk => "the disk acknowledgement",
        })
    }
}

/// A snapshot of the staging progress, for logs and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageStatus {
    /// The checkpoint being staged (1 for the first).
    pub checkpoint: u64,
    /// Push epochs landed for it.
    pub push_epochs: u64,
    /// Pages pushed for it so far (distinct).
    pub pages: u64,
    /// Whether the primary sealed the pages.
    pub sealed: bool,
    /// Bytes of device state staged, if it arrived.
    pub state_bytes: Option<usize>,
    /// Whether the disk acknowledged.
    pub disk_acked: bool,
}

/// The epoch being staged.
#[derive(Debug)]
pub(crate) struct Staging {
    /// Union of the bitmaps of every push epoch landed for this checkpoint.
    pub pushed: PageBitmap,
    /// Push epochs landed for this checkpoint.
    pub push_epochs: u64,
    pub sealed: bool,
    pub state: Option<Vec<u8>>,
    pub disk_acked: bool,
}

impl Staging {
    pub fn new(pages: u64) -> Self {
        Self {
            pushed: PageBitmap::new(pages),
            push_epochs: 0,
            sealed: false,
            state: None,
            disk_acked: false,
        }
    }

    /// Forgets everything staged; keeps the bitmap's memory.
    pub fn reset(&mut self) {
        self.pushed.clear_all();
        self.push_epochs = 0;
        self.sealed = false;
        self.state = None;
        self.disk_acked = false;
    }

    /// The first step still missing, if any.
    pub fn missing(&self) -> Option<Stage> {
        if !self.sealed {
            Some(Stage::Pages)
        } else if self.state.is_none() {
            Some(Stage::State)
        } else if !self.disk_acked {
            Some(Stage::Disk)
        } else {
            None
        }
    }
}
