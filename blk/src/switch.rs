//! A block backend whose implementation can be replaced while the VM keeps its device: a
//! secondary that took over serves its disk through [`SecondaryDisk`](crate::SecondaryDisk)
//! and, to protect the VM again, becomes a primary whose writes go through a
//! [`PrimaryDisk`](crate::PrimaryDisk) to a new secondary. The VMM swaps the two with the
//! VM paused and no request in flight.

use std::sync::{Arc, RwLock};

use crate::{BlockBackend, Result};

/// A [`BlockBackend`] that forwards to the backend it currently holds.
pub struct SwitchableDisk {
    current: RwLock<Arc<dyn BlockBackend>>,
}

impl SwitchableDisk {
    /// Starts with `backend`.
    pub fn new(backend: Arc<dyn BlockBackend>) -> Self {
        Self {
            current: RwLock::new(backend),
        }
    }

    /// Makes `backend` serve every later request and returns the one it replaces. The
    /// caller keeps requests from running meanwhile (the VM paused, its disk idle): a
    /// request already running finishes on the old backend.
    ///
    /// # Panics
    /// Never: a poisoned lock still holds a valid backend.
    pub fn replace(&self, backend: Arc<dyn BlockBackend>) -> Arc<dyn BlockBackend> {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *cur, backend)
    }

    fn get(&self) -> Arc<dyn BlockBackend> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }
}

impl BlockBackend for SwitchableDisk {
    fn len(&self) -> u64 {
        self.get().len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.get().read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.get().write_at(offset, data)
    }
    fn flush(&self) -> Result<()> {
        self.get().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Disk, PlainDisk};

    fn disk(dir: &std::path::Path, name: &str, fill: u8) -> Arc<dyn BlockBackend> {
        let p = dir.join(name);
        std::fs::write(&p, vec![fill; 4096]).unwrap();
        Arc::new(PlainDisk::new(Disk::open(&p).unwrap()))
    }

    #[test]
    fn requests_go_to_the_backend_held_at_the_time() {
        let dir = std::env::temp_dir().join(format!("colo-switch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = SwitchableDisk::new(disk(&dir, "a", 0xaa));
        let mut b = [0u8; 512];
        s.read_at(0, &mut b).unwrap();
        assert_eq!(b, [0xaa; 512]);
        let old = s.replace(disk(&dir, "b", 0xbb));
        s.write_at(512, &[0x11; 512]).unwrap();
        s.read_at(0, &mut b).unwrap();
        assert_eq!(b, [0xbb; 512]);
        // The write reached the new backend only.
        old.read_at(512, &mut b).unwrap();
        assert_eq!(b, [0xaa; 512]);
        s.read_at(512, &mut b).unwrap();
        assert_eq!(b, [0x11; 512]);
        assert_eq!(s.len(), 4096);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
