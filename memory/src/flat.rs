//! Guest memory of several regions laid end to end in one memory file, with a flat view.
//!
//! A guest with more RAM than fits below the 32-bit hole has two regions (below 3 GiB and
//! from 4 GiB). The push path and the RAM cache number pages flat ([`GuestLayout`]): region
//! 0's pages first, then region 1's. Anonymous mappings for each region would leave the
//! push sender two sources to split every run between. Instead, the regions are consecutive
//! spans of one `memfd`: each guest region maps its span (shared), and a third mapping of
//! the whole file is the flat view, in which byte `flat_offset(gpa)` *is* the guest byte at
//! `gpa`. All three mappings see the same pages, so the push sender reads what the guest
//! wrote, and a RAM cache commit into the view lands in guest memory.
//!
//! A guest of one region does not need this: its single anonymous mapping is already flat,
//! and keeps transparent huge pages (a memfd gets them only where the system enables shmem
//! huge pages).
//!
//! [`GuestLayout`]: crate::GuestLayout

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, MmapRegion};

use crate::error::{Error, Result};
use crate::{GuestMemory, Region};

/// Guest memory with regions at `ranges` (guest-physical base, length; sorted, not
/// overlapping), each a consecutive span of one memory file in the given order, and a
/// [`Region`] over the whole file: the flat view.
///
/// # Errors
/// [`Error::Layout`] for no ranges or an empty one, [`Error::Map`] if the file cannot be
/// created, sized or mapped.
pub fn in_one_file(ranges: &[(u64, u64)]) -> Result<(GuestMemory, Region)> {
    if ranges.is_empty() || ranges.iter().any(|r| r.1 == 0) {
        return Err(Error::Layout(format!(
            "guest memory needs non-empty ranges, got {ranges:x?}"
        )));
    }
    let total = ranges
        .iter()
        .try_fold(0u64, |t, r| t.checked_add(r.1))
        .ok_or_else(|| Error::Layout(format!("ranges {ranges:x?} overflow")))?;
    let map_err = |source: std::io::Error| Error::Map {
        len: total as usize,
        source,
    };
    let file = Arc::new(memfd(total).map_err(map_err)?);
    let mut spans = Vec::with_capacity(ranges.len());
    let mut offset = 0;
    for &(gpa, len) in ranges {
        spans.push((
            GuestAddress(gpa),
            len as usize,
            Some(FileOffset::from_arc(Arc::clone(&file), offset)),
        ));
        offset += len;
    }
    let mem = GuestMemory::from_ranges_with_files(&spans)
        .map_err(|e| map_err(std::io::Error::other(e)))?;
    let flat = MmapRegion::<()>::from_file(FileOffset::from_arc(file, 0), total as usize)
        .map_err(|e| map_err(std::io::Error::other(e)))?;
    Ok((mem, Region::of(Arc::new(flat))))
}

/// A new anonymous memory file of `len` bytes (zero-filled, pages allocated on first
/// touch), closed on exec.
fn memfd(len: u64) -> std::io::Result<File> {
    // SAFETY: a NUL-terminated name and valid flags; the call creates a new descriptor and
    // touches no memory of ours.
    let fd = unsafe { libc::memfd_create(c"colo-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::GuestLayout;

    #[test]
    fn the_flat_view_is_the_guest_memory_in_layout_order() {
        let ranges = [(0, 8 * 4096), (1 << 32, 4 * 4096)];
        let (mem, flat) = in_one_file(&ranges).unwrap();
        let layout = GuestLayout::from_ranges(4096, &ranges).unwrap();
        assert_eq!(flat.len() as u64, layout.bytes());
        // A guest write in each region shows in the view at its flat offset...
        mem.write_slice(b"low", GuestAddress(3 * 4096 + 5)).unwrap();
        mem.write_slice(b"high", GuestAddress((1 << 32) + 4096))
            .unwrap();
        let mut b = [0u8; 4];
        flat.read_at(3 * 4096 + 5, &mut b[..3]).unwrap();
        assert_eq!(&b[..3], b"low");
        let high = layout.flat_offset((1 << 32) + 4096).unwrap();
        assert_eq!(high, 9 * 4096);
        flat.read_at(high, &mut b).unwrap();
        assert_eq!(&b, b"high");
        // ...and a write into the view (a RAM cache commit) lands in guest memory.
        flat.write_at(8 * 4096, b"commit").unwrap();
        let mut c = [0u8; 6];
        mem.read_slice(&mut c, GuestAddress(1 << 32)).unwrap();
        assert_eq!(&c, b"commit");
    }

    #[test]
    fn the_view_keeps_the_memory_when_the_guest_goes() {
        let (mem, flat) = in_one_file(&[(0, 4096), (1 << 20, 4096)]).unwrap();
        mem.write_slice(b"kept", GuestAddress(1 << 20)).unwrap();
        drop(mem);
        let mut b = [0u8; 4];
        flat.read_at(4096, &mut b).unwrap();
        assert_eq!(&b, b"kept");
    }

    #[test]
    fn empty_ranges_are_refused() {
        assert!(matches!(in_one_file(&[]), Err(Error::Layout(_))));
        assert!(matches!(
            in_one_file(&[(0, 4096), (1 << 20, 0)]),
            Err(Error::Layout(_))
        ));
    }
}
