//! Reading a metrics file: one checkpoint record per line, bad lines counted.

use std::path::Path;

use super::{Error, Result};
use crate::colo::metrics::EpochRecord;

/// The checkpoint records of a metrics file, and how many of its lines were not records.
#[derive(Debug, Default, Clone)]
pub struct Records {
    /// Every record, in file order.
    pub records: Vec<EpochRecord>,
    /// Lines that were not checkpoint records (blank lines are not counted).
    pub skipped: usize,
}

impl Records {
    /// Parses JSON lines: each line that is an [`EpochRecord`] is kept, every other
    /// non-blank line (bad JSON, bad UTF-8, a line cut short) is counted in `skipped`.
    pub fn parse(bytes: &[u8]) -> Self {
        let mut r = Records::default();
        for line in bytes.split(|b| *b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<EpochRecord>(line) {
                Ok(rec) => r.records.push(rec),
                Err(_) => r.skipped += 1,
            }
        }
        r
    }

    /// Reads and parses the metrics file at `path`.
    ///
    /// # Errors
    /// [`Error::Read`] if the file cannot be read, [`Error::Empty`] if it holds no
    /// checkpoint record.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let r = Self::parse(&bytes);
        if r.records.is_empty() {
            return Err(Error::Empty {
                path: path.to_owned(),
                skipped: r.skipped,
            });
        }
        Ok(r)
    }

    /// The sentence about skipped lines, if any were.
    pub fn skipped_note(&self) -> Option<String> {
        match self.skipped {
            0 => None,
            1 => Some("1 line was not a checkpoint record".into()),
            n => Some(format!("{n} lines were not checkpoint records")),
        }
    }
}
